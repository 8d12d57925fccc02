"""Planner table: planning time on DeepSeek-V3 shapes, and what balanced senders and alignment
buy on consecutive EPLB-style placements under drifting load.

    python bench/plan_table.py            # full table (about a minute on 2 CPU cores)
    python bench/plan_table.py --quick    # fewer steps / repeats

Prints a ``Machine:`` line and the tables, and writes ``bench/results/plan_table.json``.

Timing: median wall time of ``plan_rearrangement`` over ``--repeat`` runs (58 layers x 288
slots, 32 ranks), against two Python loops that compute the same vLLM-rule plan (checked
equal: same route and traffic on every layer): the plain per-expert loop (numpy look-ups per
expert, the structure of vLLM's implementation) and a tuned pure-Python loop over dicts.

Quality: for each scenario, ``--steps`` consecutive placements from
:func:`eplb_triton.testing.balancer.placement_sequence`; each step is planned

* ``vllm``: new placement as is, vLLM's sender rule (the baseline);
* ``balanced``: new placement as is, balanced senders;
* ``aligned``: :func:`align_placement` (default objective ``"copies_then_bottleneck"``) of
  the new placement against the current one, then balanced senders (with ``ranks_per_node``
  where the scenario has nodes); the runtime then continues from the aligned placement.
  ``aligned_c`` / ``aligned_b``: the same with ``objective="copies"`` / ``"bottleneck"``,
  each run as its own sequence.

``copies_bound``: a lower bound on the network copies of *any* relabelling that keeps every
rank's multiset of the new placement (each new rank's multiset placed on whichever old rank
suits it best, ranks reused freely); ``copies_bound_drop`` is the largest copies drop such
alignments could reach, so a copies target above it is out of reach without changing the
balancer's groups.

"bottleneck" is the per-layer largest number of experts any rank sends or receives over the
network, summed over layers and steps; "copies" counts network expert copies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

from eplb_triton import align_placement, plan_rearrangement
from eplb_triton.align import rank_costs
from eplb_triton.testing.balancer import placement_sequence
from eplb_triton.plan import compact_ids

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "plan_table.json")

# name, experts, redundant, ranks, ranks_per_node, groups (hierarchical balancer), layers
SCENARIOS = [
    ("deepseek-v3 256+32 / 32 ranks, 4 nodes, hierarchical", 256, 32, 32, 8, 8, 58),
    ("deepseek-v3 256+32 / 32 ranks, flat balancer", 256, 32, 32, None, None, 58),
    ("qwen3 128+16 / 8 ranks", 128, 16, 8, None, None, 48),
]


def python_loop_plan(old: np.ndarray, new: np.ndarray, ep_size: int):
    """Per-expert Python loop computing the vLLM-rule plan: ``(route, traffic)`` per layer."""
    out = []
    num_physical = old.shape[1]
    num_local = num_physical // ep_size
    for o, n in zip(old.tolist(), new.tolist()):
        best = {}  # (expert, rank) -> (score, slot): a row that keeps its expert first, then lowest
        for p in range(num_physical):
            e = o[p]
            if e < 0:
                continue
            key = (e, p // num_local)
            score = (0 if n[p] == e else 1, p)
            if key not in best or score < best[key]:
                best[key] = score
        holders = defaultdict(list)
        for e, r in sorted(best):
            holders[e].append(r)
        first = {}
        for p in range(num_physical):
            if n[p] >= 0 and n[p] != o[p]:
                first.setdefault((p // num_local, n[p]), p)
        receivers = defaultdict(list)
        source = {}
        for (r, e), p in sorted(first.items()):
            if (e, r) in best:
                source[(r, e)] = best[(e, r)][1]
            else:
                receivers[e].append(r)
        traffic = [[0] * ep_size for _ in range(ep_size)]
        for e, recv in receivers.items():
            hs = holders[e]
            q = len(recv) // len(hs)
            for k, r in enumerate(sorted(recv)):
                h = k // q if k < q * len(hs) else k - q * len(hs)
                source[(r, e)] = best[(e, hs[h])][1]
                traffic[hs[h]][r] += 1
        route = []
        for p in range(num_physical):
            if n[p] < 0:
                route.append(-1)
            elif n[p] == o[p]:
                route.append(p)
            else:
                route.append(source[(p // num_local, n[p])])
        for (r, e), p in first.items():
            if (e, r) in best:
                traffic[r][r] += 1
        for p in range(num_physical):  # duplicate fills count as local writes
            if n[p] >= 0 and n[p] != o[p] and first[(p // num_local, n[p])] != p:
                traffic[p // num_local][p // num_local] += 1
        out.append((np.array(route), np.array(traffic)))
    return out


def per_expert_loop_plan(old: np.ndarray, new: np.ndarray, ep_size: int):
    """The plain per-expert loop (vLLM's structure): for every layer and expert, find its
    holders and receivers with numpy and split receivers among holders. ``(route, traffic)``."""
    out = []
    num_physical = old.shape[1]
    num_local = num_physical // ep_size
    slots = np.arange(num_physical)
    for o, n in zip(old, new):
        route = np.where(n >= 0, slots, -1)
        traffic = np.zeros((ep_size, ep_size), dtype=np.int64)
        for e in np.unique(n[n >= 0]):
            held = np.flatnonzero(o == e)
            keeps = held[n[held] == e]  # rows that keep e are never overwritten: preferred
            holder_ranks = np.unique(held // num_local)
            source = {}
            for r in holder_ranks:
                mine = keeps[keeps // num_local == r]
                source[int(r)] = int(mine[0]) if mine.size else int(held[held // num_local == r][0])
            need = np.flatnonzero((n == e) & (o != e))
            receivers = []
            for r in np.unique(need // num_local):
                rows = need[need // num_local == r]
                if int(r) in source:
                    route[rows] = source[int(r)]
                    traffic[r, r] += rows.size
                else:
                    receivers.append((int(r), rows))
            q = len(receivers) // len(holder_ranks)
            for k, (r, rows) in enumerate(receivers):
                h = k // q if k < q * len(holder_ranks) else k - q * len(holder_ranks)
                sender = int(holder_ranks[h])
                route[rows] = source[sender]
                traffic[sender, r] += 1
                traffic[r, r] += rows.size - 1  # duplicate fills
        out.append((route, traffic))
    return out


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def timing(repeat: int) -> dict:
    seq = placement_sequence(2, 58, 256, 32, 32, seed=0, ranks_per_node=8, num_groups=8)
    old, new = seq[0], seq[1]
    ref = plan_rearrangement(old, new, 32, sender_policy="vllm")
    same = True
    for loop in (python_loop_plan, per_expert_loop_plan):
        out = loop(old, new, 32)
        same &= all(np.array_equal(r, l.route) and np.array_equal(t, l.traffic) for (r, t), l in zip(out, ref.layers))
    if not same:
        raise AssertionError("a Python loop reference disagrees with the vectorised vLLM-rule plan")
    rows = {
        "vllm rule": median_ms(lambda: plan_rearrangement(old, new, 32, sender_policy="vllm"), repeat),
        "balanced": median_ms(lambda: plan_rearrangement(old, new, 32), repeat),
        "balanced, ranks_per_node=8": median_ms(lambda: plan_rearrangement(old, new, 32, ranks_per_node=8), repeat),
        "balanced + rounds='pair'": median_ms(lambda: plan_rearrangement(old, new, 32, rounds="pair"), max(3, repeat // 5)),
        "balanced + rounds='expert'": median_ms(lambda: plan_rearrangement(old, new, 32, rounds="expert"), max(3, repeat // 5)),
        "per-expert loop, numpy per expert (vllm rule)": median_ms(lambda: per_expert_loop_plan(old, new, 32), 3),
        "pure-Python dict loop (vllm rule)": median_ms(lambda: python_loop_plan(old, new, 32), max(3, repeat // 5)),
        "align_placement, ranks_per_node=8": median_ms(lambda: align_placement(old, new, 32, ranks_per_node=8), max(3, repeat // 5)),
        "align_placement, ranks_per_node=8, objective='copies'": median_ms(
            lambda: align_placement(old, new, 32, ranks_per_node=8, objective="copies"), max(3, repeat // 5)
        ),
    }
    return {"shape": "58 layers x 288 slots, 32 ranks", "median_ms": rows, "loop_matches_vectorised": same}


def quality(name, experts, redundant, ranks, rpn, groups, layers, steps, seed, drift=0.15) -> dict:
    seq = placement_sequence(
        steps + 1, layers, experts, redundant, ranks, seed=seed, ranks_per_node=rpn, num_groups=groups, drift=drift
    )
    totals = defaultdict(int)
    worse_layers = 0
    objectives = {"aligned": "copies_then_bottleneck", "aligned_c": "copies", "aligned_b": "bottleneck"}
    current = dict.fromkeys(objectives, seq[0])
    inter = None if rpn is None else np.kron(1 - np.eye(ranks // rpn, dtype=np.int64), np.ones((rpn, rpn), dtype=np.int64))
    for t in range(1, steps + 1):
        vllm = plan_rearrangement(seq[t - 1], seq[t], ranks, sender_policy="vllm")
        balanced = plan_rearrangement(seq[t - 1], seq[t], ranks)
        plans = {"vllm": vllm, "balanced": balanced}
        for key, objective in objectives.items():  # each objective runs as its own sequence
            aligned_map = align_placement(current[key], seq[t], ranks, ranks_per_node=rpn, objective=objective)
            plans[key] = plan_rearrangement(current[key], aligned_map, ranks, ranks_per_node=rpn)
            if key == "aligned":
                totals["copies_bound"] += copies_lower_bound(current[key], seq[t], ranks)
            current[key] = aligned_map
        worse_layers += int((balanced.bottlenecks > vllm.bottlenecks).sum())
        for key, plan in plans.items():
            totals[f"{key}_bottleneck"] += int(plan.bottlenecks.sum())
            totals[f"{key}_copies"] += plan.network_copies
            if inter is not None:
                totals[f"{key}_inter_node_copies"] += int((plan.traffic * inter).sum())
    out = {"scenario": name, "seed": seed, "steps": steps, "layers": layers, "drift": drift, **totals}
    out["balanced_layers_worse_than_vllm"] = worse_layers
    out["balanced_bottleneck_ratio"] = totals["balanced_bottleneck"] / totals["vllm_bottleneck"]
    out["aligned_bottleneck_ratio"] = totals["aligned_bottleneck"] / totals["vllm_bottleneck"]
    out["aligned_copies_drop"] = 1 - totals["aligned_copies"] / totals["vllm_copies"]
    for key in ("aligned_c", "aligned_b"):
        out[f"{key}_bottleneck_ratio"] = totals[f"{key}_bottleneck"] / totals["vllm_bottleneck"]
        out[f"{key}_copies_drop"] = 1 - totals[f"{key}_copies"] / totals["vllm_copies"]
    out["copies_bound_drop"] = 1 - totals["copies_bound"] / totals["vllm_copies"]
    return out


def copies_lower_bound(old: np.ndarray, new: np.ndarray, ep_size: int) -> int:
    """Network copies no relabelling that keeps ``new``'s per-rank multisets can beat: every
    new rank's multiset on its best old rank, old ranks reused freely (a relaxation of the
    assignment that :func:`align_placement` solves exactly)."""
    o, n = compact_ids(np.asarray(old), np.asarray(new))
    _, moved, _ = rank_costs(o, n, ep_size)  # moved[l, r, q]: copies if old rank r takes new rank q
    return int(moved.min(axis=1).sum())


def rounds_summary() -> dict:
    """Rounds of the DeepSeek-V3 hierarchical scenario (one step, aligned and not): rounds per
    layer against the layer's peer degree, and the round "makespan" (sum over rounds of the
    largest pair in the round, in experts) against the bottleneck, its lower bound."""
    seq = placement_sequence(2, 58, 256, 32, 32, seed=0, ranks_per_node=8, num_groups=8)
    out = {}
    aligned = align_placement(seq[0], seq[1], 32, ranks_per_node=8)
    for name, new, kind in (
        ("unaligned, pair", seq[1], "pair"),
        ("unaligned, expert", seq[1], "expert"),
        ("aligned, pair", aligned, "pair"),
        ("aligned, expert", aligned, "expert"),
    ):
        plan = plan_rearrangement(seq[0], new, 32, ranks_per_node=8, rounds=kind)
        rounds, makespan = [], []
        for layer in plan.layers:
            n = layer.num_local
            rounds.append(len(layer.rounds))
            span = 0
            for r in layer.rounds:
                pair = (layer.src_slot[r] // n) * 32 + layer.dst_slot[r] // n
                span += int(np.bincount(pair).max())
            makespan.append(span)
        out[name] = {
            "mean_rounds": float(np.mean(rounds)),
            "mean_bottleneck": float(plan.bottlenecks.mean()),
            "mean_makespan": float(np.mean(makespan)),
            "makespan_over_bottleneck": float(np.sum(makespan) / plan.bottlenecks.sum()),
        }
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    repeat = args.repeat or (5 if args.quick else 30)
    steps = args.steps or (3 if args.quick else 8)
    seeds = args.seeds or (1 if args.quick else 3)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, python {sys.version.split()[0]}"
    print(f"Machine: {machine}")
    t = timing(repeat)
    print(f"\nPlanning all layers, {t['shape']} (median of {repeat} runs)")
    loop = t["median_ms"]["per-expert loop, numpy per expert (vllm rule)"]
    fast_loop = t["median_ms"]["pure-Python dict loop (vllm rule)"]
    print(f"  {'':<48} {'median':>12}   {'vs per-expert':>13}   {'vs dict loop':>12}")
    for key, ms in t["median_ms"].items():
        print(f"  {key:<48} {ms:9.2f} ms   {loop / ms:12.1f}x   {fast_loop / ms:11.1f}x")

    rows = []
    for scenario in SCENARIOS:
        for seed in range(seeds):
            rows.append(quality(*scenario, steps=steps, seed=seed))
    print(f"\nConsecutive placements ({steps} steps per seed, {seeds} seeds)")
    print("  bal = balanced senders, no alignment; 'worse' = layers where it is above vLLM's rule;")
    print("  aligned = align_placement (default objective copies_then_bottleneck) + balanced;")
    print("  -c = objective='copies', -b = objective='bottleneck'; bound = best copies drop of any relabelling")
    header = (
        f"  {'scenario':<54}{'seed':>5}{'bal/vllm':>10}{'worse':>7}{'aligned/vllm':>14}{'copies drop':>13}"
        f"{'inter-node drop':>17}{'-c/vllm':>9}{'-c drop':>9}{'-b/vllm':>9}{'-b drop':>9}{'bound':>8}"
    )
    print(header)
    for r in rows:
        inter = f"{'-':>17}"
        if "vllm_inter_node_copies" in r:
            inter = f"{1 - r['aligned_inter_node_copies'] / r['vllm_inter_node_copies']:17.3f}"
        print(
            f"  {r['scenario']:<54}{r['seed']:>5}{r['balanced_bottleneck_ratio']:10.3f}{r['balanced_layers_worse_than_vllm']:7d}"
            f"{r['aligned_bottleneck_ratio']:14.3f}{r['aligned_copies_drop']:13.3f}{inter}"
            f"{r['aligned_c_bottleneck_ratio']:9.3f}{r['aligned_c_copies_drop']:9.3f}"
            f"{r['aligned_b_bottleneck_ratio']:9.3f}{r['aligned_b_copies_drop']:9.3f}{r['copies_bound_drop']:8.3f}"
        )
    sweep = []
    for drift in (0.02, 0.05, 0.15, 0.3):
        for scenario in (SCENARIOS[0], SCENARIOS[2]):
            sweep.append(quality(*scenario, steps=steps, seed=0, drift=drift))
    print(f"\nDrift sensitivity (seed 0, {steps} steps; default drift 0.15 = 15% log-normal step per rebalance)")
    print(f"  {'scenario':<54}{'drift':>6}{'aligned/vllm':>14}{'copies drop':>13}")
    for r in sweep:
        print(f"  {r['scenario']:<54}{r['drift']:6.2f}{r['aligned_bottleneck_ratio']:14.3f}{r['aligned_copies_drop']:13.3f}")
    rs = rounds_summary()
    print("\nRounds (rounds=pair|expert), DeepSeek-V3 hierarchical, one step, ranks_per_node=8; per-layer means")
    print(f"  {'':<20}{'rounds':>8}{'bottleneck':>12}{'makespan':>10}{'makespan/bottleneck':>21}")
    for name, r in rs.items():
        print(f"  {name:<20}{r['mean_rounds']:8.2f}{r['mean_bottleneck']:12.2f}{r['mean_makespan']:10.2f}{r['makespan_over_bottleneck']:21.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "timing": t, "repeat": repeat, "quality": rows, "drift_sweep": sweep, "rounds": rs}, fh, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Link speed (issue 12): every method against one NCCL message of the same bytes, same run.

    # two GPUs, one process each (NVLink multicast stays off; multi_gpu.py sets it on import):
    python bench/link_speed.py --json $OUT/link_speed.json --profile-dir $OUT
    # CPU smoke run on gloo (shapes scaled down; the numbers mean nothing there):
    python bench/link_speed.py --backend gloo --quick

Per config (the four reference layers of ``bench/multi_gpu.py`` and the two presets' placements),
``--layers`` layers per call, median and min-max over ``--repeats`` calls after a warm-up, the
slowest rank's time per layer (whole calls, divided by the layers):

* ``floor``: one ``batch_isend_irecv`` per layer of exactly the bytes the library sends to and
  receives from each peer (what a perfect transfer costs on this link);
* ``torch-packed``: ``index_select`` per tensor + one ``batch_isend_irecv`` + ``index_copy_``;
* ``per-expert``: vLLM's scheme (:mod:`eplb_triton.testing.baseline`);
* ``blocking``: :func:`eplb_triton.rearrange_expert_weights_inplace`, the whole call
  (validation, agreement, planning, confirmation included);
* ``worker``: :class:`eplb_triton.TransferWorker`, ``submit`` then ``step()`` until done.

``--transport nccl p2p`` adds, next to the NCCL rows, ``floor-p2p`` (the same per-peer bytes
pulled by copy engines from a peer's symmetric buffer between two device barriers: what the p2p
transport costs at best), ``blocking-p2p`` and ``worker-p2p`` (both APIs with
``transport="p2p"``). ``--methods`` picks the rows to time (default: all).

Each method's result is checked bit for bit after its warm-up call; the timed calls are interleaved
(every method once per round, ``--repeats`` rounds), so no method owns a place in the order.
``--chunks`` (and ``--variants NAME=VALUE``) also time the
blocking path at other message-piece sizes (``EPLB_TRITON_CHUNK_BYTES``; a variant also times
``blocking-p2p`` under its setting when that row is asked for). ``--profile-dir``
writes a ``torch.profiler`` table of one blocking call per config (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_gpu as mg  # noqa: E402  (sets the NVLink-multicast-off variables first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb_triton import TransferWorker, plan_rearrangement, rearrange_expert_weights_inplace  # noqa: E402
from eplb_triton.testing.baseline import rearrange_per_expert  # noqa: E402
from eplb_triton.testing.balancer import make_placements  # noqa: E402
from eplb_triton.testing.machine import machine_line  # noqa: E402
from eplb_triton.testing.shapes import LAYER_CONFIGS, PRESETS, scaled  # noqa: E402
from eplb_triton.testing.launch import run_ranks  # noqa: E402
from eplb_triton.layout import ExpertLayout  # noqa: E402
from eplb_triton.testing.synthetic import fill_rank_weights, make_rank_weights, row_mismatches  # noqa: E402

METHODS = ("floor", "torch-packed", "per-expert", "blocking", "worker")
P2P_METHODS = ("floor-p2p", "blocking-p2p", "worker-p2p")  # with --transport p2p (NCCL groups only)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peer_bytes(plan, rank: int, expert_bytes: int) -> tuple[dict, dict]:
    """Bytes this rank sends to / receives from each peer in one layer (first layer's plan)."""
    traffic = plan.layers[0].traffic
    world = traffic.shape[0]
    sends = {p: int(traffic[rank, p]) * expert_bytes for p in range(world) if p != rank and traffic[rank, p]}
    recvs = {p: int(traffic[p, rank]) * expert_bytes for p in range(world) if p != rank and traffic[p, rank]}
    return sends, recvs


class _Floor:
    """One batch_isend_irecv of given per-peer bytes, per layer."""

    def __init__(self, sends: dict, recvs: dict, device: torch.device):
        self.out = {p: torch.empty(n, dtype=torch.uint8, device=device).random_() for p, n in sends.items()}
        self.into = {p: torch.empty(n, dtype=torch.uint8, device=device) for p, n in recvs.items()}

    def __call__(self, layers: int) -> None:
        for _ in range(layers):
            ops = [dist.P2POp(dist.irecv, t, p) for p, t in self.into.items()]
            ops += [dist.P2POp(dist.isend, t, p) for p, t in self.out.items()]
            for req in dist.batch_isend_irecv(ops) if ops else []:
                req.wait()


class _FloorP2P:
    """The p2p transport's floor: per layer, a device barrier, one copy-engine pull of each
    peer's bytes out of its symmetric buffer, a barrier (no pack, no plan, no library)."""

    def __init__(self, sends: dict, recvs: dict, device: torch.device, world: int):
        from eplb_triton.comm import Communicator
        from eplb_triton.p2p import P2PTransport

        size = max([sum(sends.values()), 1])
        sizes = torch.tensor([size], dtype=torch.int64, device=device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)  # symmetric: the same size everywhere
        self.transport = P2PTransport.create(Communicator.from_group(None), device, int(sizes.item()))
        self.transport.buffer.random_()
        rank = dist.get_rank()
        # where each sender's message to this rank lies: senders lay out messages by ascending receiver
        everyone = [None] * world
        dist.all_gather_object(everyone, sends)
        self.pulls = []
        for peer, nbytes in recvs.items():
            offset = sum(n for q, n in sorted(everyone[peer].items()) if q < rank)
            self.pulls.append((peer, offset, torch.empty(nbytes, dtype=torch.uint8, device=device)))

    def __call__(self, layers: int) -> None:
        t = self.transport
        for _ in range(layers):
            t.barrier()
            for peer, offset, dst in self.pulls:
                dst.copy_(t.peer_bytes(peer, offset, dst.numel()))
            t.barrier()

    def close(self) -> None:
        self.transport.close()


def _torch_packed(old, new, weights, rank: int, world: int) -> None:
    """index_select per tensor into one buffer per peer, one batch_isend_irecv, index_copy_
    (on byte views of the tensors, so any dtype works)."""
    plan = plan_rearrangement(old, new, world)
    for layer_plan, tensors in zip(plan.layers, weights):
        view = layer_plan.rank(rank)
        device = tensors[0].device
        rows = lambda r: torch.as_tensor(np.asarray(r, dtype=np.int64), device=device)  # noqa: E731
        byte_rows = [t.reshape(t.shape[0], -1).view(torch.uint8) for t in tensors]
        send = {p: torch.cat([b.index_select(0, rows(r)) for b in byte_rows], 1) for p, r in view.send_rows.items()}
        width = sum(b.shape[1] for b in byte_rows)
        recv = {p: torch.empty((len(r), width), dtype=torch.uint8, device=device) for p, r in view.recv_rows.items()}
        ops = [dist.P2POp(dist.irecv, b, p) for p, b in recv.items()] + [dist.P2POp(dist.isend, b, p) for p, b in send.items()]
        for req in dist.batch_isend_irecv(ops) if ops else []:
            req.wait()
        local = [b.index_select(0, rows(view.local_src_rows)) for b in byte_rows]
        for b, src in zip(byte_rows, local):
            b.index_copy_(0, rows(view.local_dst_rows), src)
        for p, buf in recv.items():
            offset = 0
            for b in byte_rows:
                b.index_copy_(0, rows(view.recv_rows[p]), buf[:, offset : offset + b.shape[1]])
                offset += b.shape[1]
        for b in byte_rows:
            b.index_copy_(0, rows(view.dup_dst_rows), b.index_select(0, rows(view.dup_src_rows)))


def send_bytes_per_row(tensors) -> int:
    return sum(t[0].numel() * t.element_size() for t in tensors)


def _worker_call(worker: TransferWorker, old, new) -> None:
    worker.submit(old, new)
    while worker.busy:
        worker.step()
    worker.wait()


def _budget_spec(spec: str) -> tuple[float, int | None]:
    """``"F"`` (a budget of F layers) or ``"F/K"`` (and at most K layers per exchange)."""
    factor, _, stacked = str(spec).partition("/")
    return float(factor), (int(stacked) if stacked else None)


def _with_env(variant: str, fn):
    """``fn`` run with the environment variable ``NAME=VALUE`` set, restored afterwards."""
    key, _, value = variant.partition("=")

    def call(*args):
        before = os.environ.get(key)
        os.environ[key] = value
        try:
            return fn(*args)
        finally:
            if before is None:
                os.environ.pop(key)
            else:
                os.environ[key] = before

    return call


def _configs(cfg: dict, world: int) -> list[tuple[str, np.ndarray, np.ndarray, list]]:
    out = []
    for name in cfg["configs"]:
        local, moved, specs = LAYER_CONFIGS[name]
        old, new = mg.ref_maps(cfg["layers"], world, local, moved)
        out.append((name, old, new, scaled(specs, cfg["scale"])))
    for name in cfg["presets"]:
        preset = PRESETS[name]
        old, new = make_placements(cfg["layers"], preset.num_logical, world, preset.redundant_per_rank, seed=5)
        out.append((f"{name} (preset)", old, new, preset.specs(cfg["preset_scale"])))
    return out


def _timed_call(fn, device) -> float:
    """Seconds of one call of ``fn``, the slowest rank's (ranks start together, the device idle)."""
    _sync(device)
    dist.barrier()
    _sync(device)
    begin = time.perf_counter()
    fn()
    _sync(device)
    elapsed = time.perf_counter() - begin
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, elapsed)
    return max(everyone)


def _rank_main(rank: int, world: int, cfg: dict) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if cfg["backend"] == "nccl" else torch.device("cpu")
    results = {"machine": machine_line(world_size=world, dist_backend=cfg["backend"]), "configs": {}}
    for name, old, new, specs in _configs(cfg, world):
        layers = old.shape[0]
        weights = make_rank_weights(specs, layers, old.shape[1] // world, device)
        expert_bytes = ExpertLayout(weights[0]).expert_bytes
        row_bytes = send_bytes_per_row(weights[0])
        plan = plan_rearrangement(old, new, world)
        sends, recvs = _peer_bytes(plan, rank, expert_bytes)
        floor = _Floor(sends, recvs, device)
        state = {"current": old, "target": new}
        bad = {}

        def flip():
            state["current"], state["target"] = state["target"], state["current"]

        def checked(method_name, run):
            def call(repeat):
                run(state["current"], state["target"])
                if repeat == 0:
                    _sync(device)
                    bad[method_name] = len(row_mismatches(weights, state["current"], state["target"], rank, 11))
                flip()
            return call

        fill_rank_weights(weights, old, rank, 11)
        entry = {"layers": layers, "expert_bytes": expert_bytes, "row_bytes": row_bytes,
                 "bytes_sent_per_layer": sum(sends.values()), "bytes_received_per_layer": sum(recvs.values()),
                 "methods": {}}
        methods = [m for m in METHODS if m in cfg["methods"]]
        p2p_on = "p2p" in cfg["transports"] and cfg["backend"] == "nccl"
        if p2p_on:  # each p2p row right after its NCCL counterpart
            methods = [x for m in methods for x in ([m, f"{m}-p2p"] if f"{m}-p2p" in P2P_METHODS else [m])]
        worker = TransferWorker(weights) if "worker" in methods else None  # made once, as a runtime does at start-up
        worker_p2p = TransferWorker(weights, transport="p2p") if "worker-p2p" in methods else None
        floor_p2p = _FloorP2P(sends, recvs, device, world) if "floor-p2p" in methods else None
        runs = {
            "floor": lambda repeat: floor(layers),
            "torch-packed": checked("torch-packed", lambda o, n: _torch_packed(o, n, weights, rank, world)),
            "per-expert": checked("per-expert", lambda o, n: rearrange_per_expert(o, n, weights)),
            "blocking": checked("blocking", lambda o, n: rearrange_expert_weights_inplace(o, n, weights)),
            "worker": checked("worker", lambda o, n: _worker_call(worker, o, n)),
            "floor-p2p": lambda repeat: floor_p2p(layers),
            "blocking-p2p": checked(
                "blocking-p2p", lambda o, n: rearrange_expert_weights_inplace(o, n, weights, transport="p2p")
            ),
            "worker-p2p": checked("worker-p2p", lambda o, n: _worker_call(worker_p2p, o, n)),
        }
        runs = {method: runs[method] for method in methods}  # the rows asked for, in table order
        extra_workers = []  # the worker with more staging buffers (--worker-ahead): rows worker[ahead=N]
        for ahead in cfg["worker_ahead"] if worker is not None else []:
            for suffix, kwargs in [("", {})] + ([("-p2p", {"transport": "p2p"})] if worker_p2p is not None else []):
                more = TransferWorker(weights, layers_ahead=ahead, **kwargs)
                extra_workers.append(more)
                label = f"worker{suffix}[ahead={ahead}]"
                runs[label] = checked(label, lambda o, n, w=more: _worker_call(w, o, n))
                if cfg["worker_unstacked"] and ahead >= 4:  # the same worker, one layer per exchange
                    label = f"worker{suffix}[ahead={ahead}, 1/exchange]"
                    runs[label] = checked(label, _with_env(
                        "EPLB_TRITON_LAYERS_PER_EXCHANGE=1", lambda o, n, w=more: _worker_call(w, o, n)))
        for variant in cfg["worker_variants"] if worker is not None else []:  # the default worker under a setting
            label = f"worker[{variant}]"
            runs[label] = checked(label, _with_env(variant, lambda o, n: _worker_call(worker, o, n)))
        variants = [f"EPLB_TRITON_CHUNK_BYTES={chunk}" for chunk in cfg["chunks"]] + list(cfg["variants"])
        for variant in variants:  # the blocking path again under one environment setting
            label = f"blocking[{variant}]"
            runs[label] = checked(label, _with_env(variant, lambda o, n: rearrange_expert_weights_inplace(o, n, weights)))
            if "blocking-p2p" in methods:  # and with transport="p2p"
                label = f"blocking-p2p[{variant}]"
                runs[label] = checked(label, _with_env(
                    variant, lambda o, n: rearrange_expert_weights_inplace(o, n, weights, transport="p2p")))
        for seconds in cfg["timeouts"]:  # the blocking path with a deadline (p2p: each barrier waited for)
            label = f"blocking[timeout_s={seconds:g}]"
            runs[label] = checked(label, lambda o, n, t=seconds: rearrange_expert_weights_inplace(o, n, weights, timeout_s=t))
            if "blocking-p2p" in methods:
                label = f"blocking-p2p[timeout_s={seconds:g}]"
                runs[label] = checked(label, lambda o, n, t=seconds: rearrange_expert_weights_inplace(
                    o, n, weights, transport="p2p", timeout_s=t))
        for spec in cfg["budgets"]:  # the blocking path with a staging budget of `factor` layers
            factor, stacked = _budget_spec(spec)
            budget = mg.budget_bytes(weights, factor)
            label = f"blocking[budget={factor:g} layers" + ("" if stacked is None else f", {stacked}/exchange") + "]"
            run = lambda o, n, b=budget: rearrange_expert_weights_inplace(o, n, weights, max_buffer_bytes=b)  # noqa: E731
            if stacked is not None:
                run = _with_env(f"EPLB_TRITON_LAYERS_PER_EXCHANGE={stacked}", run)
            runs[label] = checked(label, run)
            for variant in cfg["variants"]:  # the same budget under each environment setting
                label_variant = f"{label[:-1]}, {variant}]"
                runs[label_variant] = checked(label_variant, _with_env(variant, run))
            if "blocking-p2p" in methods:  # the same budget with transport="p2p"
                label_p2p = label.replace("blocking[", "blocking-p2p[")
                run_p2p = lambda o, n, b=budget: rearrange_expert_weights_inplace(  # noqa: E731
                    o, n, weights, max_buffer_bytes=b, transport="p2p"
                )
                if stacked is not None:
                    run_p2p = _with_env(f"EPLB_TRITON_LAYERS_PER_EXCHANGE={stacked}", run_p2p)
                runs[label_p2p] = checked(label_p2p, run_p2p)
        for method, run in runs.items():  # warm-up call of each method, checked bit for bit
            fill_rank_weights(weights, state["current"], rank, 11)
            _timed_call(lambda: run(0), device)
        # Timed calls interleaved (every method once per round): a method run right after another
        # was slower by up to 2x on the H200 hosts (blocking tiny-bf16 0.87 vs 0.41 ms per layer),
        # so no method owns a position in the order.
        times = {method: [] for method in runs}
        for repeat in range(1, cfg["repeats"] + 1):
            for method, run in runs.items():
                times[method].append(_timed_call(lambda: run(repeat), device))
        for method in runs:
            entry["methods"][method] = {"call_s": times[method]}
        if cfg["profile_dir"]:
            entry["profile"] = _profile(cfg, name, rank, device, weights, state)
        for closing in (worker, worker_p2p, floor_p2p, *extra_workers):
            if closing is not None:
                closing.close()
        if p2p_on:
            from eplb_triton.p2p import release_cached

            release_cached()  # the blocking rows' cached buffer: each config maps its own
        entry["bad_rows"] = bad
        results["configs"][name] = entry
        del weights, floor
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _profile(cfg, name, rank, device, weights, state) -> dict:
    """One blocking call under torch.profiler: GPU time per kernel family, host time of the call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    dist.barrier()
    with profile(activities=activities) as prof:
        begin = time.perf_counter()
        rearrange_expert_weights_inplace(state["current"], state["target"], weights)
        host = time.perf_counter() - begin
    state["current"], state["target"] = state["target"], state["current"]
    families = {"pack/unpack kernels": 0.0, "nccl": 0.0, "other gpu": 0.0}
    for event in prof.key_averages():
        gpu_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if not gpu_us or event.key.startswith("cuda") or "ProfilerStep" in event.key:
            continue
        key = event.key.lower()
        if "move_rows" in key:
            families["pack/unpack kernels"] += gpu_us
        elif "nccl" in key:
            families["nccl"] += gpu_us
        elif event.device_type is not None and "cuda" in str(event.device_type).lower():
            families["other gpu"] += gpu_us
    if rank == 0:
        safe = name.replace(" ", "_").replace("(", "").replace(")", "")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        Path(cfg["profile_dir"], f"profile-{safe}.txt").write_text(table)
    return {"host_call_us": host * 1e6, **{k: v for k, v in families.items()}}


def summarise(per_rank: list[dict]) -> dict:
    out = {"machine": per_rank[0]["machine"], "configs": {}}
    for name, entry in per_rank[0]["configs"].items():
        layers = entry["layers"]
        rows = {}
        floor = statistics.median(entry["methods"]["floor"]["call_s"]) / layers
        for method, m in entry["methods"].items():
            per_layer = [t / layers for t in m["call_s"]]
            med = statistics.median(per_layer)
            rows[method] = {
                "ms_per_layer": med * 1e3,
                "min_ms": min(per_layer) * 1e3,
                "max_ms": max(per_layer) * 1e3,
                "x_floor": med / floor if floor else None,
                "GBps": max(entry["bytes_sent_per_layer"], entry["bytes_received_per_layer"]) / med / 1e9,
            }
        out["configs"][name] = {
            "layers": layers,
            "MB_per_rank_per_layer": max(entry["bytes_sent_per_layer"], entry["bytes_received_per_layer"]) / 1e6,
            "methods": rows,
            "bad_rows": [r["configs"][name]["bad_rows"] for r in per_rank],
            "profile": [r["configs"][name].get("profile") for r in per_rank],
        }
    return out


def print_report(summary: dict) -> None:
    print(summary["machine"])
    print("per layer, slowest rank, median [min-max] over calls; x floor = / one batch_isend_irecv of the same bytes")
    header = f"{'config':28} {'MB/rank':>8} {'method':36} {'ms/layer':>9} {'[min-max]':>17} {'x floor':>8} {'GB/s':>7}"
    print(header)
    for name, c in summary["configs"].items():
        for i, (method, r) in enumerate(c["methods"].items()):
            label = name if i == 0 else ""
            mb = f"{c['MB_per_rank_per_layer']:.1f}" if i == 0 else ""
            spread = f"[{r['min_ms']:.3f}-{r['max_ms']:.3f}]"
            print(f"{label:28} {mb:>8} {method:36} {r['ms_per_layer']:9.3f} {spread:>17} {r['x_floor']:8.2f} {r['GBps']:7.1f}")
        bad = [b for ranks in c["bad_rows"] for b in ranks.values()]
        print(f"{'':28} bit-exact: {'yes' if not any(bad) else 'NO: ' + str(c['bad_rows'])}")


def markdown(summary: dict) -> str:
    """The README's table: every config and method, median [min-max] ms per layer and x floor."""
    lines = [f"`{summary['machine']}`", "",
             "| config | MB/rank/layer | method | ms/layer, median [min-max] | x floor | GB/s |",
             "|---|---|---|---|---|---|"]
    for name, c in summary["configs"].items():
        for i, (method, r) in enumerate(c["methods"].items()):
            lines.append(
                f"| {name if i == 0 else ''} | {c['MB_per_rank_per_layer']:.1f} | {method} | "
                f"{r['ms_per_layer']:.3f} [{r['min_ms']:.3f}-{r['max_ms']:.3f}] | {r['x_floor']:.2f} | {r['GBps']:.0f} |"
            )
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    """Bars: each method's time per layer as a multiple of the floor (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(summary["configs"])
    first = summary["configs"][configs[0]]["methods"]
    # environment variants stay out of the chart; other staging budgets are shown
    methods = [m for m in first if m != "floor" and ("[" not in m or "[budget=" in m)]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(configs))]
        ys = [summary["configs"][c]["methods"][method]["x_floor"] for c in configs]
        bars = ax.bar(xs, ys, width, label=method)
        for bar, y in zip(bars, ys):
            ax.text(bar.get_x() + bar.get_width() / 2, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.text(-0.45, 1.03, "floor = 1: one batch_isend_irecv of the same bytes", ha="left", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{c}\n{summary['configs'][c]['MB_per_rank_per_layer']:.0f} MB/rank" for c in configs], fontsize=8)
    ax.set_ylabel("time per layer / floor (log scale, lower is better)")
    ax.set_title(f"Rebalance speed per layer, median of calls\n{summary['machine']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--chunks", type=int, nargs="*", default=[], help="extra message-piece sizes (bytes; 0 = whole)")
    parser.add_argument("--variants", nargs="*", default=[], metavar="NAME=VALUE",
                        help="also time the blocking path (and each --budgets row) with this environment variable set "
                             "(e.g. EPLB_TRITON_DIRECT_POST=0)")
    parser.add_argument("--worker-ahead", type=int, nargs="*", default=[], metavar="N",
                        help="also time the worker with N staging buffers (TransferWorker(layers_ahead=N); default 2)")
    parser.add_argument("--worker-variants", nargs="*", default=[], metavar="NAME=VALUE",
                        help="also time the default worker with this environment variable set at each submit "
                        "(e.g. EPLB_TRITON_WORKER_PASS_LAYERS=1)")
    parser.add_argument("--worker-unstacked", action="store_true",
                        help="with --worker-ahead N >= 4: also time that worker with one layer per exchange "
                        "(EPLB_TRITON_LAYERS_PER_EXCHANGE=1 at each submit)")
    parser.add_argument("--timeouts", type=float, nargs="*", default=[], metavar="SECONDS",
                        help="also time the blocking path (and blocking-p2p) with timeout_s=SECONDS")
    parser.add_argument("--budgets", nargs="*", default=[], metavar="LAYERS[/K]",
                        help="also time the blocking path with max_buffer_bytes of this many layers' local rows "
                        "(the default budget is 1: a layer that needs more staging runs in several passes); "
                        "LAYERS/K: with at most K layers per exchange (EPLB_TRITON_LAYERS_PER_EXCHANGE)")
    parser.add_argument("--configs", nargs="*", default=list(LAYER_CONFIGS))
    parser.add_argument("--presets", nargs="*", default=list(mg.PRESET_NAMES))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="rows to time")
    parser.add_argument(
        "--transport", nargs="*", default=["nccl"], choices=("nccl", "p2p"),
        help="p2p: add floor-p2p / blocking-p2p / worker-p2p rows next to the NCCL ones (NCCL groups only)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile-dir", default=None)
    parser.add_argument("--plot", default=None, help="PNG: each method as a multiple of the floor")
    parser.add_argument("--markdown", default=None, help="write the README table here")
    parser.add_argument("--from-json", default=None, help="re-print / re-plot a saved --json run, no ranks")
    args = parser.parse_args(argv)
    if args.from_json:
        summary = json.loads(Path(args.from_json).read_text())["summary"]
        print_report(summary)
        if args.plot:
            plot(summary, args.plot)
        if args.markdown:
            Path(args.markdown).write_text(markdown(summary) + "\n")
        return 0
    world = args.world_size or (torch.cuda.device_count() if args.backend == "nccl" else 2)
    cfg = {
        "backend": args.backend,
        "layers": args.layers,
        "repeats": args.repeats,
        "configs": args.configs,
        "presets": args.presets,
        "scale": 16 if args.quick else 1,
        "preset_scale": 64 if args.quick else 1,
        "chunks": args.chunks,
        "variants": args.variants,
        "worker_ahead": args.worker_ahead,
        "worker_unstacked": args.worker_unstacked,
        "worker_variants": args.worker_variants,
        "budgets": args.budgets,
        "timeouts": args.timeouts,
        "profile_dir": args.profile_dir,
        "methods": args.methods,
        "transports": args.transport,
    }
    if "floor" not in args.methods:
        parser.error("--methods must include floor (every row is reported as a multiple of it)")
    if "p2p" in args.transport and args.backend != "nccl":
        print("--transport p2p needs the NCCL backend (GPUs of one node): the p2p rows are skipped", file=sys.stderr)
    per_rank = run_ranks(world, _rank_main, cfg, backend=args.backend, timeout_s=3000.0, group_timeout_s=600.0)
    summary = summarise(per_rank)
    print_report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "raw": per_rank}, indent=1, default=float))
    if args.plot:
        plot(summary, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(markdown(summary) + "\n")
    return 0 if not any(b for c in summary["configs"].values() for r in c["bad_rows"] for b in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

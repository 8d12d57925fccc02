"""Pacing (issue 19): how much a background rebalance slows serving, and how long it takes.

    # two GPUs, one process each, NCCL (NVLink multicast stays off: set here for every rank):
    python bench/pacing.py --out $OUT
    # CPU smoke run on gloo (tiny shapes; the numbers mean nothing there):
    python bench/pacing.py --device cpu --world 2 --quick --out /tmp/pacing

The serving loop is ``bench/multi_gpu.py``'s background phase: per iteration four bf16
matmuls of ``n x n`` (4096 on GPUs) on the main stream plus an ``all_reduce`` of 8M elements on a
process group the worker does not use, then a device sync; ``step()`` once per iteration. A
:class:`~eplb_triton.TransferWorker` (on the run's shared transfer group, agreements on a gloo
group) moves ``--layers`` layers (24) of ``--config`` (``qwen3-30b-a3b-bf16``: 16 local experts
per rank, 8 of them received per layer, as in ``multi_gpu.py``), alternating between the two
maps, once per setting and repeat.

Measured, per setting (unpaced, ``layers_per_step`` 4/2/1, ``bytes_per_step`` at 2.5 and 1.5
layers' gate bytes, ``steps_per_layer`` 2/4/8/16), each repeat preceded by the loop alone:

* the serving iteration time alone and during the transfer: median, p10, p90 (the rank with
  the slowest median during the transfer, all repeats pooled);
* the slowdown: per repeat, the worst rank's median iteration during the transfer over its
  median alone right before it; the median over repeats;
* the transfer time: ``submit`` until the last layer is swapped (slowest rank), and as a
  multiple of the unpaced setting's;
* every layer checked bit for bit after each transfer (``row_mismatches``).

Prints a ``Machine:`` line and a table; writes ``pacing.json``, ``pacing.md`` (the table) and
``pacing.png`` (slowdown vs transfer time, one labelled point per setting) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# NVLink multicast must stay off on the shared multi-GPU hosts: set before torch / NCCL load,
# inherited by every rank this script starts.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_gpu as mg  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb_triton import TransferWorker, plan_rearrangement  # noqa: E402
from eplb_triton.testing.launch import run_ranks  # noqa: E402
from eplb_triton.testing.machine import machine_line  # noqa: E402
from eplb_triton.testing.shapes import LAYER_CONFIGS, scaled  # noqa: E402
from eplb_triton.layout import ExpertLayout  # noqa: E402
from eplb_triton.pacing import layer_gate_bytes  # noqa: E402
from eplb_triton.testing.synthetic import fill_rank_weights, make_rank_weights, row_mismatches  # noqa: E402

def parse_settings(names: list[str] | None) -> list[tuple[str, dict]]:
    """``SETTINGS``, or ``unpaced`` plus each ``knob=value`` asked for."""
    if names is None:
        return list(SETTINGS)
    out = [("unpaced", {})]
    for name in names:
        knob, _, value = name.partition("=")
        if knob not in ("layers_per_step", "steps_per_layer", "bytes_per_step") or not value:
            raise SystemExit(f"--settings: expected layers_per_step=N, steps_per_layer=N or bytes_per_step=X, got {name!r}")
        number = float(value) if knob == "bytes_per_step" else int(value)
        label = f"bytes_per_step={value} layers" if knob == "bytes_per_step" else name
        out.append((label, {knob: number}))
    return out


#: (name, knobs); ``bytes_per_step`` is given in layers' gate bytes here and converted per run
SETTINGS = [
    ("unpaced", {}),
    ("layers_per_step=4", {"layers_per_step": 4}),
    ("layers_per_step=2", {"layers_per_step": 2}),
    ("layers_per_step=1", {"layers_per_step": 1}),
    ("bytes_per_step=2.5 layers", {"bytes_per_step": 2.5}),
    ("bytes_per_step=1.5 layers", {"bytes_per_step": 1.5}),
    ("steps_per_layer=2", {"steps_per_layer": 2}),
    ("steps_per_layer=4", {"steps_per_layer": 4}),
    ("steps_per_layer=8", {"steps_per_layer": 8}),
    ("steps_per_layer=16", {"steps_per_layer": 16}),
]
TARGET_SLOWDOWN, TARGET_TIME_X = 1.05, 5.0  # issue 19's target: <= 1.05x slower, <= 5x the unpaced time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(samples: list[float]) -> dict:
    if not samples:
        return {"median_ms": None, "p10_ms": None, "p90_ms": None, "n": 0}
    ms = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "n": len(samples)}


def _knobs(knobs: dict, layer_bytes: int) -> dict:
    out = dict(knobs)
    if "bytes_per_step" in out:  # given in layers here
        out["bytes_per_step"] = max(1, int(out["bytes_per_step"] * layer_bytes))
    return out


def _rank_main(rank: int, world: int, cfg: dict) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if cfg["device"] == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    mg._make_groups(world, backend, device)
    groups = mg._worker_groups()
    local, moved, specs = LAYER_CONFIGS[cfg["config"]]
    old, new = mg.ref_maps(cfg["layers"], world, local, moved)
    weights = make_rank_weights(scaled(specs, cfg["scale"]), cfg["layers"], local, device)
    fill_rank_weights(weights, old, rank, seed=7)
    eb = ExpertLayout(weights[0]).expert_bytes
    plan = plan_rearrangement(old, new, world)
    layer_bytes = int(np.mean([layer_gate_bytes(l.traffic, eb) for l in plan.layers]))

    iteration = mg.serving_loop(device, cfg["matmul"], cfg["allreduce_elems"])  # the same loop as multi_gpu.py's

    state = {"current": old, "target": new}

    def transfer(knobs: dict) -> dict:
        current, target = state["current"], state["target"]
        loaded, steps_with_swaps = [], 0
        with TransferWorker(weights, **groups, **knobs, transport=cfg["transport"]) as worker:
            _sync(device)
            dist.barrier()
            begin = time.perf_counter()
            worker.submit(current, target)
            while worker.busy:  # busy is agreed: the same number of iterations on every rank
                loaded.append(iteration())
                if worker.step():
                    steps_with_swaps += 1
            transfer_s = time.perf_counter() - begin
            progress = worker.progress
        bad = len(row_mismatches(weights, current, target, rank, seed=7))
        state["current"], state["target"] = target, current
        return {"loaded": loaded, "transfer_s": transfer_s, "iterations": len(loaded), "steps_with_swaps": steps_with_swaps,
                "bad_rows": bad, "bytes_moved": progress.bytes_moved, "layers_done": progress.layers_done}

    for _ in range(3):  # warm-up: kernels, NCCL connections, the allocator
        iteration()
    transfer({})
    out = {"machine": machine_line(world_size=world, dist_backend="nccl" if cfg["device"] == "cuda" else "gloo") if rank == 0 else None, "layer_gate_bytes": layer_bytes, "expert_bytes": eb,
           "settings": {}}
    for name, knobs in cfg["settings"]:
        knobs = _knobs(knobs, layer_bytes)
        runs = []
        for _ in range(cfg["repeats"]):
            dist.barrier()
            base = [iteration() for _ in range(cfg["base_iters"])]
            run = transfer(knobs)
            run["base"] = base
            runs.append(run)
        out["settings"][name] = {"knobs": knobs, "runs": runs}
    return out


def summarise(per_rank: list[dict], cfg: dict, machine: str) -> dict:
    rows = []
    for name, _ in cfg["settings"]:
        ranks = [r["settings"][name] for r in per_rank]
        base = [_percentiles([t for run in r["runs"] for t in run["base"]]) for r in ranks]
        loaded = [_percentiles([t for run in r["runs"] for t in run["loaded"]]) for r in ranks]
        # per repeat: the worst rank's median during / median alone right before it
        slowdowns = [
            max(statistics.median(r["runs"][i]["loaded"]) / statistics.median(r["runs"][i]["base"]) for r in ranks)
            for i in range(len(ranks[0]["runs"]))
            if all(r["runs"][i]["loaded"] for r in ranks)
        ]
        transfer = [max(r["runs"][i]["transfer_s"] for r in ranks) for i in range(len(ranks[0]["runs"]))]
        worst = max(range(len(ranks)), key=lambda k: loaded[k]["median_ms"] or 0)
        rows.append({
            "setting": name,
            "knobs": ranks[0]["knobs"],
            "base_ms": base[worst],
            "loaded_ms": loaded[worst],
            "slowdown": statistics.median(slowdowns) if slowdowns else None,  # median over repeats
            "slowdown_per_repeat": slowdowns,
            "slowdown_pooled": (loaded[worst]["median_ms"] / base[worst]["median_ms"]) if loaded[worst]["median_ms"] else None,
            "transfer_ms": 1e3 * statistics.median(transfer),
            "transfer_ms_all": [1e3 * t for t in transfer],
            "iterations": statistics.median([run["iterations"] for run in ranks[0]["runs"]]),
            "bad_rows": sum(run["bad_rows"] for r in ranks for run in r["runs"]),
            "layers_done": min(run["layers_done"] for r in ranks for run in r["runs"]),
            "bytes_moved_per_rank": [r["runs"][0]["bytes_moved"] for r in ranks],
        })
    unpaced = rows[0]["transfer_ms"]
    for row in rows:
        row["transfer_x_unpaced"] = row["transfer_ms"] / unpaced if unpaced else None
        row["meets_target"] = (row["slowdown"] is not None and row["slowdown"] <= TARGET_SLOWDOWN
                               and row["transfer_x_unpaced"] is not None and row["transfer_x_unpaced"] <= TARGET_TIME_X)
    return {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": cfg,
        "environment": {k: os.environ.get(k) for k in MULTICAST_OFF},
        "layer_gate_bytes": per_rank[0]["layer_gate_bytes"],
        "rows": rows,
        "raw": {name: [r["settings"][name]["runs"] for r in per_rank] for name, _ in cfg["settings"]},  # [rank][repeat]
        "all_correct": all(r["bad_rows"] == 0 and r["layers_done"] == cfg["layers"] for r in rows),
        "target": {"slowdown_at_most": TARGET_SLOWDOWN, "transfer_x_unpaced_at_most": TARGET_TIME_X,
                   "met_by": [r["setting"] for r in rows if r["meets_target"]]},
    }


def table(summary: dict) -> str:
    c = summary["config"]
    lines = [
        f"`{summary['machine']}`",
        "",
        f"{c['layers']} layers of {c['config']} (scale 1/{c['scale']}, {summary['layer_gate_bytes'] / 1e6:.1f} MB per layer "
        f"on the busiest rank) moved by a TransferWorker (transport {c.get('transport', 'auto')}) while serving runs 4 matmuls {c['matmul']}^2 + all_reduce"
        f"({c['allreduce_elems']}) per iteration; step() once per iteration; {c['repeats']} repeats per setting.",
        "",
        "| setting | serving alone ms, median [p10-p90] | during transfer ms, median [p10-p90] | slowdown | transfer ms | x unpaced | iterations |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        b, l_ = r["base_ms"], r["loaded_ms"]
        loaded = "-" if l_["median_ms"] is None else f"{l_['median_ms']:.3f} [{l_['p10_ms']:.3f}-{l_['p90_ms']:.3f}]"
        slowdown = "-" if r["slowdown"] is None else f"{r['slowdown']:.3f}"
        lines.append(
            f"| {r['setting']} | {b['median_ms']:.3f} [{b['p10_ms']:.3f}-{b['p90_ms']:.3f}] | {loaded} | {slowdown} | "
            f"{r['transfer_ms']:.1f} | {r['transfer_x_unpaced']:.2f} | {r['iterations']:.0f} |"
        )
    met = summary["target"]["met_by"]
    lines += ["", f"Target (slowdown <= {TARGET_SLOWDOWN}x and transfer <= {TARGET_TIME_X:g}x unpaced): "
              + (f"met by {', '.join(met)}" if met else "not met by any setting")]
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in summary["rows"] if r["slowdown"] is not None]
    ax.plot([r["transfer_ms"] for r in rows], [r["slowdown"] for r in rows], "o", color="tab:blue")
    # numbers at the points and the settings in a key: names next to clustered points overlapped
    for i, r in enumerate(rows, 1):
        ax.annotate(str(i), (r["transfer_ms"], r["slowdown"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    key = "\n".join(f"{i}  {r['setting']}" for i, r in enumerate(rows, 1))
    ax.text(0.99, 0.98, key, transform=ax.transAxes, ha="right", va="top", multialignment="left", fontsize=7, family="monospace",
            bbox={"facecolor": "white", "edgecolor": "0.8"})
    ax.axhline(TARGET_SLOWDOWN, color="tab:green", linestyle="--", linewidth=0.8)
    ax.axvline(TARGET_TIME_X * summary["rows"][0]["transfer_ms"], color="tab:green", linestyle=":", linewidth=0.8)
    ax.text(0.99, 0.02, f"target: slowdown <= {TARGET_SLOWDOWN}x, transfer <= {TARGET_TIME_X:g}x unpaced",
            transform=ax.transAxes, ha="right", fontsize=7, color="tab:green")
    ax.set_xscale("log")
    ax.set_xlabel("transfer time, ms (submit to last swap, slowest rank; log scale)")
    ax.set_ylabel("serving slowdown (median iteration during / alone)")
    transport = summary["config"].get("transport", "auto")
    ax.set_title(f"Pacing ({transport} transport): serving slowdown vs transfer time\n{summary['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_config(args: argparse.Namespace) -> dict:
    gpu = args.device == "cuda"
    return {
        "device": args.device,
        "world": args.world,
        "config": args.config,
        "layers": args.layers or (24 if gpu else (4 if args.quick else 8)),
        "scale": args.scale or (1 if gpu else 16),
        "matmul": args.matmul or (4096 if gpu else 64),
        "allreduce_elems": (8 << 20) if gpu else (1 << 12),
        "base_iters": args.base_iters or (40 if gpu else 5),
        "repeats": args.repeats or (3 if gpu else 1),
        "settings": parse_settings(getattr(args, "settings", None)),
        "transport": getattr(args, "transport", "auto"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world", type=int, default=2, help="ranks (one GPU each on cuda)")
    parser.add_argument("--config", choices=list(LAYER_CONFIGS), default="qwen3-30b-a3b-bf16")
    parser.add_argument("--layers", type=int, default=None, help="layers moved (default 24 on GPUs)")
    parser.add_argument("--scale", type=int, default=None, help="divide tensor dims (default 1 cuda, 16 cpu)")
    parser.add_argument("--matmul", type=int, default=None, help="serving matmul size (default 4096 cuda, 64 cpu)")
    parser.add_argument("--base-iters", type=int, default=None, help="serving iterations alone before each transfer")
    parser.add_argument("--repeats", type=int, default=None, help="transfers per setting (default 3 cuda, 1 cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer layers (CPU smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="write pacing.json/.md/.png here (default $OUT)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before stuck ranks are killed")
    parser.add_argument("--transport", choices=("auto", "nccl", "p2p"), default="auto",
                        help="the worker's transport (issue 17); p2p files are named pacing-p2p.*")
    parser.add_argument("--settings", nargs="*", default=None, metavar="KNOB=VALUE",
                        help="settings to run instead of the default list (unpaced always runs first), e.g. "
                        "steps_per_layer=6 layers_per_step=1 (bytes_per_step in layers' gate bytes)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda needs GPUs; use --device cpu (gloo)")
        if args.world > torch.cuda.device_count():
            parser.error(f"--world {args.world} > {torch.cuda.device_count()} GPUs: NCCL needs one GPU per process")
    if args.world < 2:
        parser.error("--world must be >= 2 (the worker's traffic crosses ranks)")
    cfg = build_config(args)
    backend = "nccl" if args.device == "cuda" else "gloo"
    timeout = args.timeout or (300.0 if args.device == "cuda" else 120.0)
    begin = time.perf_counter()
    per_rank = run_ranks(args.world, _rank_main, cfg, backend=backend, timeout_s=timeout, group_timeout_s=min(timeout, 120.0))
    summary = summarise(per_rank, cfg, per_rank[0]["machine"])
    summary["wall_s"] = time.perf_counter() - begin
    text = table(summary)
    print(summary["machine"])
    print(text)
    print(f"bit-exact: {'yes' if summary['all_correct'] else 'NO'}; wall {summary['wall_s']:.1f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "pacing" if cfg["transport"] != "p2p" else "pacing-p2p"
        (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
        (out / f"{stem}.md").write_text(text + "\n")
        try:
            plot(summary, str(out / f"{stem}.png"))
        except ImportError:
            print(f"matplotlib is not installed: no {stem}.png (pip install -e '.[bench]')")
        print(f"wrote {out}/{stem}.json, {stem}.md, {stem}.png")
    return 0 if summary["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())

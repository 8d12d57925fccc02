"""End-to-end benchmark: ``python -m eplb_triton bench``.

On the same placements and the same ranks, times per layer:

* ``eplb_triton``: this library (Triton pack/unpack on GPUs, torch ops on CPU);
* ``per-expert``: the vLLM/SGLang-style baseline (one isend/irecv per expert per tensor);
* ``packed-torch``: packed buffers with torch ops instead of Triton (GPU only; on CPU it is
  what ``eplb_triton`` runs anyway).

Each method runs old -> new -> old ... ``--repeats`` times; every pass is verified bit for bit.
Prints a ``Machine:`` line and a table, writes JSON (``--json``) and a PNG (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.distributed as dist

from .baseline import rearrange_per_expert
from .demo import PRESETS, make_placements
from .launch import run_ranks
from .synthetic import fill_rank_weights, make_rank_weights, row_mismatches
from .transfer import rearrange_expert_weights_inplace

__all__ = ["machine_line", "main"]


def machine_line() -> str:
    import triton

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.machine()} x{os.cpu_count()}"
    return f"Machine: {device}, torch {torch.__version__}, triton {triton.__version__}"


def _methods(device: torch.device) -> dict:
    methods = {
        "eplb_triton": lambda o, n, w: rearrange_expert_weights_inplace(o, n, w),
        "per-expert": lambda o, n, w: rearrange_per_expert(o, n, w),
    }
    if device.type == "cuda":
        methods["packed-torch"] = lambda o, n, w: rearrange_expert_weights_inplace(o, n, w, backend="torch")
    return methods


def _rank_bench(rank: int, world_size: int, cfg: dict):
    device = torch.device("cuda", torch.cuda.current_device()) if cfg["backend"] == "nccl" else torch.device("cpu")
    preset = PRESETS[cfg["preset"]]
    old, new = make_placements(cfg["layers"], preset.num_logical, world_size, preset.redundant_per_rank, cfg["seed"])
    num_local = old.shape[1] // world_size
    weights = make_rank_weights(preset.specs(cfg["scale"]), old.shape[0], num_local, device)
    row_bytes = sum(t[0].numel() * t.element_size() for t in weights[0])
    out = {}
    for name, method in _methods(device).items():
        fill_rank_weights(weights, old, rank, cfg["seed"])
        layer_times, bad, stats_list = [], 0, []
        current, target = old, new
        for repeat in range(cfg["repeats"] + 1):  # the first pass warms up (Triton compiles, NCCL connects)
            dist.barrier()
            stats = method(current, target, weights)
            bad += len(row_mismatches(weights, current, target, rank, cfg["seed"]))
            if repeat:
                layer_times.extend(stats.layer_times_s)
                stats_list.append(stats)
            current, target = target, current
        s = stats_list[-1]
        out[name] = {
            "layer_times_s": layer_times,
            "bytes_sent": int(np.mean([x.total_bytes_sent for x in stats_list])),
            "bytes_received": int(np.mean([x.total_bytes_received for x in stats_list])),
            "p2p_ops": int(np.mean([x.p2p_ops for x in stats_list])),
            # bytes this rank writes into its weights: received rows plus local moves/duplicates
            "bytes_written": int(np.mean([x.total_bytes_received + x.local_copies * row_bytes for x in stats_list])),
            "peak_staging_bytes": int(s.peak_staging_bytes),
            "bad_rows": bad,
        }
    return out


def run_bench(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    layers = args.layers or (preset.num_layers if args.backend == "nccl" else min(preset.num_layers, 4))
    scale = args.scale or (1 if args.backend == "nccl" or args.preset == "tiny" else 16)
    cfg = {"preset": args.preset, "backend": args.backend, "layers": layers, "scale": scale, "seed": args.seed, "repeats": args.repeats}
    world = args.world_size or (torch.cuda.device_count() if args.backend == "nccl" else 2)
    begin = time.perf_counter()
    per_rank = run_ranks(world, _rank_bench, cfg, backend=args.backend, timeout_s=args.timeout)
    machine = machine_line()
    rows = []
    for name in per_rank[0]:
        ranks = [r[name] for r in per_rank]
        # a layer is done when its slowest rank is: per layer, max over ranks, then median
        layer_time = float(np.median(np.max([r["layer_times_s"] for r in ranks], axis=0)))
        busiest = max(max(r["bytes_sent"], r["bytes_received"]) for r in ranks) / layers
        written = max(r["bytes_written"] for r in ranks) / layers
        rows.append(
            {
                "method": name,
                "time_per_layer_ms": layer_time * 1e3,
                "busiest_rank_GBps": busiest / layer_time / 1e9 if layer_time > 0 else 0.0,
                "busiest_rank_MB_per_layer": busiest / 1e6,
                "written_MB_per_layer": written / 1e6,
                "written_GBps": written / layer_time / 1e9 if layer_time > 0 else 0.0,
                "p2p_ops_per_layer": sum(r["p2p_ops"] for r in ranks) / world / layers,
                "peak_staging_MB": max(r["peak_staging_bytes"] for r in ranks) / 1e6,
                "bad_rows": sum(r["bad_rows"] for r in ranks),
            }
        )
    base = next(r for r in rows if r["method"] == "per-expert")
    for row in rows:
        row["speedup_vs_per_expert"] = base["time_per_layer_ms"] / row["time_per_layer_ms"]
    result = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "config": {**cfg, "world_size": world},
        "wall_s": time.perf_counter() - begin,
        "rows": rows,
    }
    print(machine)
    print(f"preset={args.preset} world={world} backend={args.backend} layers={layers} scale=1/{scale} repeats={args.repeats}")
    header = (
        f"{'method':<14} {'ms/layer':>9} {'net GB/s':>8} {'net MB':>8} {'written GB/s':>12} {'written MB':>10} "
        f"{'ops/layer':>9} {'staging MB':>10} {'x per-expert':>12} {'bad':>4}"
    )
    print("net = busiest rank's network bytes per layer; written = busiest rank's bytes written into its weights")
    print(header)
    for r in rows:
        print(
            f"{r['method']:<14} {r['time_per_layer_ms']:>9.3f} {r['busiest_rank_GBps']:>8.3f} {r['busiest_rank_MB_per_layer']:>8.3f} "
            f"{r['written_GBps']:>12.3f} {r['written_MB_per_layer']:>10.3f} "
            f"{r['p2p_ops_per_layer']:>9.1f} {r['peak_staging_MB']:>10.3f} {r['speedup_vs_per_expert']:>12.2f} {r['bad_rows']:>4}"
        )
    return result


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["method"] for r in rows], [r["time_per_layer_ms"] for r in rows], color=["#2a9d8f", "#e76f51", "#8ab17d"][: len(rows)])
    cfg = result["config"]
    ax.set_ylabel("time per layer (ms)")
    ax.set_title(f"{cfg['preset']}, world {cfg['world_size']}, {cfg['backend']}\n{result['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eplb_triton bench", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default 2 on gloo, one per GPU on nccl)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--scale", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart here (needs matplotlib)")
    args = parser.parse_args(argv)
    result = run_bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        _plot(result, args.plot)
    return 0 if all(r["bad_rows"] == 0 for r in result["rows"]) else 1

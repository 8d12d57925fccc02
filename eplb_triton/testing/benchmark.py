"""End-to-end benchmark: the body of ``eplb-triton bench`` (or ``python -m eplb_triton bench``).

Times this library against the per-expert baseline (what vLLM and SGLang do) on the same
placements, plan and ranks; see ``DESCRIPTION`` below for the methods and the statistics.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import numpy as np
import torch
import torch.distributed as dist

from .. import _cli
from ..transfer import rearrange_expert_weights_inplace
from .balancer import make_placements
from .baseline import rearrange_per_expert
from .launch import run_ranks
from .machine import machine_line
from .shapes import PRESETS
from .synthetic import fill_rank_weights, make_rank_weights, row_mismatches

__all__ = ["add_arguments", "run", "run_bench", "summarise"]


def _methods(device: torch.device) -> dict:
    methods = {
        "eplb_triton": lambda o, n, w: rearrange_expert_weights_inplace(o, n, w),
        "per-expert": lambda o, n, w: rearrange_per_expert(o, n, w),
    }
    if device.type == "cuda":
        methods["packed-torch"] = lambda o, n, w: rearrange_expert_weights_inplace(o, n, w, backend="torch")
    return methods


def _rank_bench(rank: int, world_size: int, cfg: dict):
    begin = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg["dist_backend"] == "nccl" else torch.device("cpu")
    preset = PRESETS[cfg["preset"]]
    old, new = make_placements(cfg["layers"], preset.num_logical, world_size, preset.redundant_per_rank, cfg["seed"])
    num_local = old.shape[1] // world_size
    weights = make_rank_weights(preset.specs(cfg["scale"]), old.shape[0], num_local, device)
    row_bytes = sum(t[0].numel() * t.element_size() for t in weights[0])
    methods = _methods(device)
    passes = cfg["repeats"] + 1  # the first pass warms up (Triton compiles, NCCL connects)
    out = {}
    with _cli.Progress(rank == 0 and cfg["progress"] or "off", len(methods) * passes, "bench", "pass") as progress:
        megabytes = sum(t.numel() * t.element_size() for layer in weights for t in layer) / 1e6
        progress.note(f"weights ready: {megabytes:.1f} MB per rank in {time.perf_counter() - begin:.1f} s")
        for name, method in methods.items():
            fill_rank_weights(weights, old, rank, cfg["seed"])
            repeat_times, bad, stats_list = [], 0, []
            current, target = old, new
            for repeat in range(passes):
                dist.barrier()
                stats = method(current, target, weights)
                bad += len(row_mismatches(weights, current, target, rank, cfg["seed"]))
                if repeat:
                    repeat_times.append(list(stats.layer_times_s))
                    stats_list.append(stats)
                current, target = target, current
                progress.update()
                which = f"repeat {repeat}/{cfg['repeats']}" if repeat else "warm-up"
                progress.note(f"{name} {which}: {np.mean(stats.layer_times_s) * 1e3:.3f} ms/layer on rank 0")
            s = stats_list[-1]
            out[name] = {
                "repeat_layer_times_s": repeat_times,  # (repeats, layers)
                "bytes_sent": int(np.mean([x.total_bytes_sent for x in stats_list])),
                "bytes_received": int(np.mean([x.total_bytes_received for x in stats_list])),
                "p2p_ops": int(np.mean([x.p2p_ops for x in stats_list])),
                # bytes this rank writes into its weights: received rows plus local moves/duplicates
                "bytes_written": int(np.mean([x.total_bytes_received + x.local_copies * row_bytes for x in stats_list])),
                "peak_staging_bytes": int(s.peak_staging_bytes),
                "bad_rows": bad,
            }
    return out


def _spread(samples_ms: np.ndarray) -> dict:
    """Median, min, max and interquartile range of per-repeat times."""
    q1, median, q3 = np.percentile(samples_ms, [25, 50, 75])
    return {
        "time_per_layer_ms": float(median),
        "time_per_layer_ms_min": float(samples_ms.min()),
        "time_per_layer_ms_max": float(samples_ms.max()),
        "time_per_layer_ms_iqr": [float(q1), float(q3)],
        "time_per_layer_ms_repeats": [float(x) for x in samples_ms],
    }


def summarise(per_rank: list[dict], layers: int) -> list[dict]:
    """One row per method, over ranks and repeats.

    A layer is done when its slowest rank is: per repeat and layer the max over ranks; a
    repeat's time is the mean of those over layers; the row holds the median over repeats with
    its spread (min-max, IQR) and every repeat's value.
    """
    world = len(per_rank)
    rows = []
    for name in per_rank[0]:
        ranks = [r[name] for r in per_rank]
        times = np.max([r["repeat_layer_times_s"] for r in ranks], axis=0)  # (repeats, layers)
        row = {"method": name, **_spread(times.mean(axis=1) * 1e3)}
        seconds = row["time_per_layer_ms"] / 1e3
        busiest = max(max(r["bytes_sent"], r["bytes_received"]) for r in ranks) / layers
        written = max(r["bytes_written"] for r in ranks) / layers
        row.update(
            {
                "busiest_rank_GBps": busiest / seconds / 1e9 if seconds > 0 else 0.0,
                "busiest_rank_MB_per_layer": busiest / 1e6,
                "written_MB_per_layer": written / 1e6,
                "written_GBps": written / seconds / 1e9 if seconds > 0 else 0.0,
                "p2p_ops_per_layer": sum(r["p2p_ops"] for r in ranks) / world / layers,
                "peak_staging_MB": max(r["peak_staging_bytes"] for r in ranks) / 1e6,
                "bad_rows": sum(r["bad_rows"] for r in ranks),
            }
        )
        rows.append(row)
    base = next(r for r in rows if r["method"] == "per-expert")
    for row in rows:
        row["speedup_vs_per_expert"] = base["time_per_layer_ms"] / row["time_per_layer_ms"]
        # the widest the ratio can be from the two spreads: slowest of one against fastest of the other
        row["speedup_min_max"] = [
            base["time_per_layer_ms_min"] / row["time_per_layer_ms_max"],
            base["time_per_layer_ms_max"] / row["time_per_layer_ms_min"],
        ]
    base["speedup_min_max"] = None  # against itself the range says nothing
    return rows


# (header, key, format, meaning): the table's columns and the legend printed under it
COLUMNS = [
    ("method", "method", "<", "see bench --help"),
    ("ms/layer", "time_per_layer_ms", ".3f", "time to move one layer, slowest rank, median over the timed passes"),
    ("min-max ms", "min_max_ms", "", "fastest and slowest timed pass"),
    ("net GB/s", "busiest_rank_GBps", ".3f", "the busiest rank's network bytes per layer / ms/layer"),
    ("net MB", "busiest_rank_MB_per_layer", ".3f", "the busiest rank's network bytes per layer (sent or received)"),
    ("written GB/s", "written_GBps", ".3f", "the busiest rank's bytes written into its weights / ms/layer"),
    ("written MB", "written_MB_per_layer", ".3f", "bytes written per layer: received rows plus local moves"),
    ("ops/layer", "p2p_ops_per_layer", ".1f", "isend + irecv calls per rank per layer"),
    ("staging MB", "peak_staging_MB", ".3f", "peak send/receive buffer memory on one rank"),
    ("x per-expert", "speedup_vs_per_expert", ".2f", "speed-up over the per-expert baseline (medians; above 1 = faster)"),
    ("x range", "speedup_range", "", "speed-up from the two min-max ranges, worst to best case"),
    ("bad", "bad_rows", "d", "rows holding wrong bytes after any pass (must be 0)"),
]


def run_bench(args: argparse.Namespace, world: int) -> dict:
    """Run every method on ``world`` local ranks; print and return the results."""
    preset = PRESETS[args.preset]
    nccl = args.dist_backend == "nccl"
    layers = args.layers if args.layers is not None else (preset.num_layers if nccl else min(preset.num_layers, 4))
    scale = args.scale if args.scale is not None else (1 if nccl or args.preset == "tiny" else 16)
    cfg = {
        "preset": args.preset,
        "dist_backend": args.dist_backend,
        "layers": layers,
        "scale": scale,
        "seed": args.seed,
        "repeats": args.repeats,
        "progress": _cli.progress_mode(not args.no_progress),
    }
    machine = machine_line()
    # flush before the ranks fork: their progress lines must come after these
    print(machine)
    print(
        f"preset={args.preset} world={world} dist-backend={args.dist_backend} layers={layers} scale=1/{scale} "
        f"repeats={args.repeats} (+1 warm-up)",
        flush=True,
    )
    begin = time.perf_counter()
    per_rank = run_ranks(world, _rank_bench, cfg, backend=args.dist_backend, timeout_s=args.timeout)
    rows = summarise(per_rank, layers)
    config = {k: v for k, v in cfg.items() if k != "progress"}
    result = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "config": {**config, "backend": args.dist_backend, "world_size": world},
        "wall_s": time.perf_counter() - begin,
        "rows": rows,
    }
    shown = [
        {
            **r,
            "min_max_ms": f"{r['time_per_layer_ms_min']:.3f}-{r['time_per_layer_ms_max']:.3f}",
            "speedup_range": "-" if r["speedup_min_max"] is None else "{:.2f}-{:.2f}".format(*r["speedup_min_max"]),
        }
        for r in rows
    ]
    print("\n".join(_cli.format_table([c[:3] for c in COLUMNS], shown)))
    print("columns:")
    print("\n".join(_cli.format_legend([(c[0], c[3]) for c in COLUMNS[1:]])))
    return result


def plot(result: dict, path: str) -> None:
    """A bar chart of the median time per layer, min-max whiskers, values and speed-ups on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cfg = result["config"]
    names = [r["method"] for r in rows]
    medians = np.array([r["time_per_layer_ms"] for r in rows])
    low = medians - np.array([r["time_per_layer_ms_min"] for r in rows])
    high = np.array([r["time_per_layer_ms_max"] for r in rows]) - medians
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"eplb_triton": "#2a9d8f", "per-expert": "#e76f51", "packed-torch": "#8ab17d"}
    bars = ax.bar(names, medians, yerr=[low, high], capsize=6, color=[colors.get(n, "#999999") for n in names],
                  error_kw={"elinewidth": 1, "ecolor": "#333333"})
    # values above the whiskers, so neither hides the other
    for bar, median, top, row in zip(bars, medians, medians + high, rows):
        ratio = "baseline" if row["method"] == "per-expert" else f"{row['speedup_vs_per_expert']:.2f}x vs per-expert"
        ax.annotate(f"{median:.3g} ms\n{ratio}", (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 4),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("time per layer, ms (lower is better)")
    ax.set_ylim(0, max(medians + high) * 1.25)
    scale = "tensors at the preset's size" if cfg["scale"] == 1 else f"tensor dims 1/{cfg['scale']} of the preset's"
    layers = f"{cfg['layers']} layer{'s' if cfg['layers'] > 1 else ''}"
    ax.set_title(
        f"{cfg['preset']}: {layers}, {scale}, world {cfg['world_size']} ({cfg['dist_backend']})",
        fontsize=10,
    )
    fig.text(
        0.01, 0.01,
        f"bar: median of {cfg['repeats']} timed pass{'es' if cfg['repeats'] > 1 else ''}; whiskers: fastest and slowest pass; "
        f"linear axis from 0\n{result['machine']}, {result['date']}",
        fontsize=7, color="#555555", va="bottom",
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


DESCRIPTION = """\
Time this library against the per-expert baseline on the same placements, plan and ranks.

methods:
  eplb_triton    this library: one packed buffer per peer, Triton pack/unpack on GPUs
                 (torch ops on CPU)
  per-expert     the vLLM/SGLang-style baseline: one isend/irecv per expert per tensor
  packed-torch   packed buffers moved by torch ops instead of Triton (GPUs only; on CPU it
                 is what eplb_triton runs anyway)

Each method moves the layers old -> new -> old ...: one warm-up pass, then --repeats timed
passes, every pass verified bit for bit. A layer's time is its slowest rank's; the table shows
the median over repeats and the fastest and slowest repeat. Prints a Machine: line and a
table; --json writes every number, --plot a bar chart."""

EPILOG = """\
examples:
  two CPU ranks, tiny preset, JSON and a chart:
    %(prog)s --world-size 2 --json out.json --plot out.png
  DeepSeek-V3 shapes at 1/16 size on 4 CPU ranks:
    %(prog)s --preset deepseek-v3 --world-size 4
  one rank per GPU, full-size Qwen3-30B-A3B tensors:
    %(prog)s --dist-backend nccl --preset qwen3-30b-a3b --layers 8"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _cli.add_model_arguments(
        parser, default_world="2", layers_help="MoE layers (default: the preset's count on nccl, at most 4 on gloo)"
    )
    parser.add_argument("--repeats", type=_cli.positive_int, default=5, metavar="N", help="timed passes per method, after one warm-up")
    parser.add_argument("--seed", type=_cli.nonnegative_int, default=0, metavar="N", help="seed of the placements")
    parser.add_argument("--timeout", type=_cli.positive_float, default=600.0, metavar="SECONDS", help="seconds before stuck ranks are killed")
    parser.add_argument("--json", type=_cli.writable_path, default=None, metavar="PATH", help="write the results as JSON to this file")
    parser.add_argument(
        "--plot", type=_cli.writable_path, default=None, metavar="PATH", help="write a PNG bar chart to this file (needs matplotlib)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check the arguments (errors exit with status 2 before any rank starts), then bench."""
    world = _cli.check_dist_backend(parser, args, default_world=2)
    _cli.check_kernel_backend(parser, None, args.dist_backend)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib (or the bench extra, eplb-triton[bench])")
    result = run_bench(args, world)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r["bad_rows"] == 0 for r in result["rows"]) else 1


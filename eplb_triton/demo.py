"""The demo rebalance: ``eplb-triton demo`` (or ``python -m eplb_triton demo``).

Spawns local ranks (gloo on CPU, or one process per GPU with NCCL), builds a synthetic MoE
model shaped like a real one (a preset, scaled down on CPU) whose expert rows carry a byte
pattern naming their expert, and runs several rebalances: an EPLB-style balancer turns drifting
synthetic loads into new placements, the TransferWorker moves the layers in the background while
the main thread keeps "serving" and swaps finished layers in step(). Every row is verified bit
for bit after each rebalance, and a table shows what moved and what it cost.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from . import _cli
from .testing.balancer import placement_maps
from .testing.launch import run_ranks
from .testing.shapes import PRESETS
from .testing.synthetic import fill_rank_weights, make_rank_weights, row_mismatches
from .transfer import rearrange_expert_weights_inplace
from .worker import TransferWorker

__all__ = ["add_arguments", "main", "run"]


def _serve_a_little(weights, layer: int, device: torch.device) -> None:
    """Stand-in for a forward pass: read one layer's weights (and give the worker the GIL)."""
    weights[layer][0].view(-1)[:4096].view(torch.uint8).sum()
    if device.type == "cpu":
        time.sleep(0.001)


def _rank_main(rank: int, world_size: int, args: dict):
    """One rank: several rebalances through the TransferWorker (or the blocking API)."""
    device = torch.device("cuda", torch.cuda.current_device()) if args["dist_backend"] == "nccl" else torch.device("cpu")
    preset = PRESETS[args["preset"]]
    maps = placement_maps(
        args["layers"], preset.num_logical, world_size, preset.redundant_per_rank, args["rebalances"], args["seed"]
    )
    num_layers, num_local = maps.shape[1], maps.shape[2] // world_size
    weights = make_rank_weights(preset.specs(args["scale"]), num_layers, num_local, device)
    fill_rank_weights(weights, maps[0], rank, args["seed"])
    row_bytes = sum(t[0].numel() * t.element_size() for t in weights[0])
    progress = _cli.Progress(
        args["progress"] if rank == 0 else "off",
        total=args["rebalances"] * num_layers,
        desc="layers moved" if args["sync"] else "layers swapped",
        unit="layer",
    )
    reports = []
    worker = None if args["sync"] else TransferWorker(weights, backend=args["kernel_backend"])
    try:
        for step in range(1, args["rebalances"] + 1):
            old, new = maps[step - 1], maps[step]
            begin = time.perf_counter()
            stalls = []  # host seconds of step() calls that swapped layers, and how many
            if worker is None:
                stats = rearrange_expert_weights_inplace(old, new, weights, backend=args["kernel_backend"])
                progress.update(num_layers)
            else:
                worker.submit(old, new)
                tick = 0
                while worker.busy:
                    _serve_a_little(weights, tick % num_layers, device)
                    tick += 1
                    t0 = time.perf_counter()
                    swapped = worker.step()
                    if swapped:
                        stalls.append((time.perf_counter() - t0, len(swapped)))
                        progress.update(len(swapped))
                stats = worker.wait()
            if device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            elapsed = time.perf_counter() - begin
            bad_rows = len(row_mismatches(weights, old, new, rank, args["seed"]))
            progress.note(
                f"rebalance {step}/{args['rebalances']}: {num_layers} layers in {elapsed:.3f} s (rank 0), "
                f"{'verified' if bad_rows == 0 else f'{bad_rows} BAD ROWS'}"
            )
            reports.append(
                {
                    "step": step,
                    "elapsed_s": elapsed,
                    "layer_times_s": list(stats.layer_times_s),
                    "bytes_sent": stats.total_bytes_sent,
                    "bytes_received": stats.total_bytes_received,
                    "bytes_local": stats.local_copies * row_bytes,
                    "p2p_ops": stats.p2p_ops,
                    "peak_staging_bytes": stats.peak_staging_bytes,
                    "stall_s_per_layer": sum(t for t, _ in stalls) / max(1, sum(n for _, n in stalls)) if stalls else 0.0,
                    "bad_rows": bad_rows,
                }
            )
    finally:
        if worker is not None:
            worker.close()
        progress.close()
    return {"reports": reports, "local_bytes": sum(t.numel() * t.element_size() for layer in weights for t in layer)}


def _summarise(results: list[dict], num_layers: int) -> list[dict]:
    """One row per rebalance, aggregated over ranks (times: the slowest rank)."""
    rows = []
    for k in range(len(results[0]["reports"])):
        per_rank = [r["reports"][k] for r in results]
        layer_time = max(np.mean(r["layer_times_s"]) if r["layer_times_s"] else 0.0 for r in per_rank)
        busiest = max(max(r["bytes_sent"], r["bytes_received"]) for r in per_rank)
        rows.append(
            {
                "step": k + 1,
                "network_MB": sum(r["bytes_sent"] for r in per_rank) / 1e6,
                "local_MB": sum(r["bytes_local"] for r in per_rank) / 1e6,
                "elapsed_s": max(r["elapsed_s"] for r in per_rank),
                "ms_per_layer": layer_time * 1e3,
                "busiest_GBps": busiest / num_layers / layer_time / 1e9 if layer_time else 0.0,
                "p2p_ops": sum(r["p2p_ops"] for r in per_rank),
                "peak_staging_MB": max(r["peak_staging_bytes"] for r in per_rank) / 1e6,
                "stall_ms_per_layer": max(r["stall_s_per_layer"] for r in per_rank) * 1e3,
                "bad_rows": sum(r["bad_rows"] for r in per_rank),
            }
        )
    return rows


# (header, key, format, meaning): the table's columns and the legend printed under it
COLUMNS = [
    ("rebalance", "step", "d", "which rebalance (each moves every layer from the last placement to the next)"),
    ("time s", "elapsed_s", ".3f", "wall time of the whole rebalance on the slowest rank, start to last layer in place"),
    ("ms/layer", "ms_per_layer", ".3f", "transfer time per layer (pack, exchange, unpack), slowest rank"),
    ("network MB", "network_MB", ".3f", "bytes sent between ranks, all ranks together"),
    ("local MB", "local_MB", ".3f", "bytes copied within a rank (experts it already held), all ranks together"),
    ("GB/s", "busiest_GBps", ".3f", "the busiest rank's network bytes per layer / ms/layer"),
    ("p2p ops", "p2p_ops", "d", "isend + irecv calls, all ranks together (one pair per peer per layer or round)"),
    ("staging MB", "peak_staging_MB", ".3f", "peak send/receive buffer memory on one rank"),
    ("stall ms/layer", "stall_ms_per_layer", ".3f",
     "serving thread's time inside a step() that swapped layers in, per layer (what serving waits)"),
    ("bad rows", "bad_rows", "d", "rows whose bytes differ from their new expert after the rebalance (must be 0)"),
]


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check the arguments (errors exit with status 2 before any rank starts), then run the demo."""
    preset = PRESETS[args.preset]
    world = _cli.check_dist_backend(parser, args, default_world=4)
    _cli.check_kernel_backend(parser, args.kernel_backend, args.dist_backend)
    scale = args.scale if args.scale is not None else (1 if args.dist_backend == "nccl" or args.preset == "tiny" else 16)
    layers = args.layers
    if layers is None:
        # full layer counts of real models are slow on CPU; 4 layers show the same
        layers = 4 if args.preset != "tiny" and args.dist_backend == "gloo" else preset.num_layers
    config = {
        "preset": args.preset,
        "dist_backend": args.dist_backend,
        "scale": scale,
        "seed": args.seed,
        "layers": layers,
        "rebalances": args.rebalances,
        "sync": args.sync,
        "progress": _cli.progress_mode(not args.no_progress),
        "kernel_backend": args.kernel_backend,
    }
    mode = "the blocking rearrange_expert_weights_inplace" if args.sync else "TransferWorker (background thread, swaps in step())"
    # flush before the ranks fork: their progress lines must come after this one
    print(
        f"eplb_triton demo: preset={args.preset} layers={layers} world={world} dist-backend={args.dist_backend} "
        f"scale=1/{scale} rebalances={args.rebalances} via {mode}",
        flush=True,
    )
    results = run_ranks(world, _rank_main, config, backend=args.dist_backend, timeout_s=args.timeout)
    rows = _summarise(results, layers)
    columns = [c for c in COLUMNS if not (args.sync and c[1] == "stall_ms_per_layer")]
    print("\n".join(_cli.format_table([c[:3] for c in columns], rows)))
    print("columns:")
    print("\n".join(_cli.format_legend([(c[0], c[3]) for c in columns])))
    print(f"weights per rank: {results[0]['local_bytes'] / 1e6:.3f} MB")
    bad = sum(r["bad_rows"] for r in rows)
    print("verified: every row holds its new expert, bit for bit" if bad == 0 else f"FAILED: {bad} rows hold wrong bytes")
    return 0 if bad == 0 else 1


DESCRIPTION = """\
Rebalance a synthetic MoE model several times on local ranks and verify every row.

Each rank holds a model shaped like the preset (tensor dimensions divided by --scale), whose
rows carry a byte pattern naming their expert. An EPLB-style balancer turns drifting load
into new placements; the TransferWorker moves the layers on a background thread while the
main thread keeps serving and swaps finished layers in with step() (--sync: the blocking
rearrange_expert_weights_inplace instead). A table shows what moved and what it cost."""

EPILOG = """\
examples:
  tiny preset, 4 CPU ranks:
    %(prog)s
  Qwen3-30B-A3B shapes at 1/16 size through the blocking API:
    %(prog)s --preset qwen3-30b-a3b --sync
  one rank per GPU, full-size DeepSeek-V3 tensors, 2 layers:
    %(prog)s --dist-backend nccl --preset deepseek-v3 --layers 2"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _cli.add_model_arguments(
        parser, default_world="4", layers_help="MoE layers (default: the preset's count; 4 for the large presets on gloo)"
    )
    parser.add_argument("--rebalances", type=_cli.positive_int, default=3, metavar="N", help="consecutive rebalances under drifting load")
    parser.add_argument("--sync", action="store_true", help="use the blocking API instead of the TransferWorker")
    parser.add_argument(
        "--kernel-backend", choices=["auto", "triton", "torch"], default=None,
        help="pack/unpack kernels: auto = Triton on GPUs, torch ops on CPU; triton on CPU needs TRITON_INTERPRET=1 "
        "(default: $EPLB_TRITON_BACKEND, else auto)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--seed", type=_cli.nonnegative_int, default=0, metavar="N", help="seed of the loads and placements")
    parser.add_argument("--timeout", type=_cli.positive_float, default=600.0, metavar="SECONDS", help="seconds before stuck ranks are killed")


def main(argv: list[str] | None = None) -> int:
    """``eplb-triton demo [options]`` (kept for callers of ``eplb_triton.demo.main``)."""
    from .__main__ import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])

"""The demo rebalance: ``python -m eplb_triton demo``.

Spawns ``--world-size`` local ranks (gloo on CPU by default, ``--backend nccl`` for one
process per GPU), builds a synthetic MoE model shaped like a real one (``--preset``, scaled
down on CPU by ``--scale``) whose expert rows carry a byte pattern naming their expert, and runs
several rebalances: a simple EPLB-style balancer turns drifting synthetic loads into new
placements, the :class:`~eplb_triton.TransferWorker` moves the layers in the background while
the main thread keeps "serving" and swaps finished layers in ``step()``. Every row is verified
bit for bit after each rebalance, and a summary table shows what moved and what it cost.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .balancer import placement_sequence
from .launch import run_ranks
from .worker import TransferWorker
from .synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from .transfer import rearrange_expert_weights_inplace

__all__ = ["PRESETS", "Preset", "main", "make_placements"]


@dataclass(frozen=True)
class Preset:
    """A model's MoE shape: full-size tensors per expert; ``scale`` divides their dimensions."""

    num_layers: int
    num_logical: int
    redundant_per_rank: int
    tensors: tuple[TensorSpec, ...]

    def specs(self, scale: int) -> list[TensorSpec]:
        out = []
        for spec in self.tensors:
            shape = tuple(max(1, d // scale) for d in spec.shape) if len(spec.shape) > 1 or spec.shape[0] > 64 else spec.shape
            out.append(TensorSpec(shape, spec.dtype))
        return out


FP8 = torch.float8_e4m3fn
PRESETS: dict[str, Preset] = {
    # hidden 2048, moe_intermediate 768: w13 (2*768, 2048), w2 (2048, 768), bf16
    "qwen3-30b-a3b": Preset(48, 128, 2, (TensorSpec((1536, 2048), torch.bfloat16), TensorSpec((2048, 768), torch.bfloat16))),
    # hidden 7168, moe_intermediate 2048, fp8 with 128x128 block scales
    "deepseek-v3": Preset(
        58,
        256,
        1,
        (
            TensorSpec((4096, 7168), FP8),
            TensorSpec((32, 56), torch.float32),
            TensorSpec((7168, 2048), FP8),
            TensorSpec((56, 16), torch.float32),
        ),
    ),
    # hidden 4096, intermediate 14336, bf16
    "mixtral-8x7b": Preset(32, 8, 1, (TensorSpec((28672, 4096), torch.bfloat16), TensorSpec((4096, 14336), torch.bfloat16))),
    # small and mixed: odd row sizes, a 3-D tensor and a per-expert int32 scale
    "tiny": Preset(
        6,
        16,
        1,
        (
            TensorSpec((48, 33), torch.bfloat16),
            TensorSpec((3, 5, 7), torch.float16),
            TensorSpec((40, 24), torch.uint8),
            TensorSpec((3,), torch.int32),
        ),
    ),
}


def num_local_experts(num_logical: int, world_size: int, redundant_per_rank: int) -> int:
    """Rows per rank: the logical experts spread evenly, plus ``redundant_per_rank`` replicas."""
    return -(-num_logical // world_size) + redundant_per_rank


def placement_maps(num_layers: int, num_logical: int, world_size: int, redundant_per_rank: int, steps: int, seed: int):
    """``(steps + 1, num_layers, num_physical)`` consecutive EPLB-style placements under
    drifting synthetic load (:func:`eplb_triton.balancer.placement_sequence`)."""
    num_physical = num_local_experts(num_logical, world_size, redundant_per_rank) * world_size
    return placement_sequence(steps + 1, num_layers, num_logical, num_physical - num_logical, world_size, seed=seed)


def make_placements(num_layers: int, num_logical: int, world_size: int, redundant_per_rank: int, seed: int):
    """One rebalance: the old and the new placement, ``(num_layers, num_physical)`` each."""
    maps = placement_maps(num_layers, num_logical, world_size, redundant_per_rank, 1, seed)
    return maps[0], maps[1]


def _serve_a_little(weights, layer: int, device: torch.device) -> None:
    """Stand-in for a forward pass: read one layer's weights (and give the worker the GIL)."""
    weights[layer][0].view(-1)[:4096].view(torch.uint8).sum()
    if device.type == "cpu":
        time.sleep(0.001)


def _rank_main(rank: int, world_size: int, args: dict):
    """One rank: several rebalances through the TransferWorker (or the blocking API)."""
    device = torch.device("cuda", torch.cuda.current_device()) if args["backend"] == "nccl" else torch.device("cpu")
    preset = PRESETS[args["preset"]]
    maps = placement_maps(
        args["layers"], preset.num_logical, world_size, preset.redundant_per_rank, args["rebalances"], args["seed"]
    )
    num_layers, num_local = maps.shape[1], maps.shape[2] // world_size
    weights = make_rank_weights(preset.specs(args["scale"]), num_layers, num_local, device)
    fill_rank_weights(weights, maps[0], rank, args["seed"])
    row_bytes = sum(t[0].numel() * t.element_size() for t in weights[0])
    show = rank == 0 and args["progress"]
    bar = tqdm(total=args["rebalances"] * num_layers, desc="layers swapped", unit="layer", disable=not show, leave=False)
    reports = []
    worker = None if args["sync"] else TransferWorker(weights, backend=args["kernel_backend"])
    try:
        for step in range(1, args["rebalances"] + 1):
            old, new = maps[step - 1], maps[step]
            begin = time.perf_counter()
            stalls = []  # host seconds of step() calls that swapped layers, and how many
            if worker is None:
                stats = rearrange_expert_weights_inplace(old, new, weights, backend=args["kernel_backend"])
                bar.update(num_layers)
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
                        bar.update(len(swapped))
                stats = worker.wait()
            if device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            elapsed = time.perf_counter() - begin
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
                    "bad_rows": len(row_mismatches(weights, old, new, rank, args["seed"])),
                }
            )
    finally:
        if worker is not None:
            worker.close()
        bar.close()
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


def run_demo(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    world = args.world_size
    if args.backend == "nccl" and not world:
        world = torch.cuda.device_count()
    config = {
        "preset": args.preset,
        "backend": args.backend,
        "scale": args.scale,
        "seed": args.seed,
        "layers": args.layers or preset.num_layers,
        "rebalances": args.rebalances,
        "sync": args.sync,
        "progress": not args.no_progress,
        "kernel_backend": args.kernel_backend,
    }
    mode = "blocking rearrange_expert_weights_inplace" if args.sync else "TransferWorker (background thread, swaps in step())"
    print(
        f"eplb_triton demo: preset={args.preset} layers={config['layers']} world={world} backend={args.backend} "
        f"scale=1/{args.scale} rebalances={args.rebalances} via {mode}"
    )
    results = run_ranks(world, _rank_main, config, backend=args.backend, timeout_s=args.timeout)
    rows = _summarise(results, config["layers"])
    print(
        f"{'step':>4} {'network MB':>10} {'local MB':>9} {'time s':>7} {'ms/layer':>9} {'GB/s':>7} {'p2p ops':>7} "
        f"{'staging MB':>10} {'stall ms/layer':>14} {'bad rows':>8}"
    )
    for r in rows:
        print(
            f"{r['step']:>4} {r['network_MB']:>10.3f} {r['local_MB']:>9.3f} {r['elapsed_s']:>7.3f} {r['ms_per_layer']:>9.3f} "
            f"{r['busiest_GBps']:>7.3f} {r['p2p_ops']:>7} {r['peak_staging_MB']:>10.3f} {r['stall_ms_per_layer']:>14.3f} "
            f"{r['bad_rows']:>8}"
        )
    print(
        "ms/layer: the worker's transfer time per layer (slowest rank); GB/s: the busiest rank's network bytes per "
        "layer over that time; stall: host time of a step() that swapped, per layer swapped"
    )
    print(f"weights per rank: {results[0]['local_bytes'] / 1e6:.3f} MB")
    bad = sum(r["bad_rows"] for r in rows)
    print("verified: every row holds its new expert, bit for bit" if bad == 0 else f"FAILED: {bad} rows hold wrong bytes")
    return 0 if bad == 0 else 1


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default 4 on gloo, one per GPU on nccl)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--scale", type=int, default=None, help="divide tensor dimensions (default 16 on gloo, 1 on nccl)")
    parser.add_argument("--rebalances", type=int, default=3, help="consecutive rebalances under drifting load")
    parser.add_argument("--sync", action="store_true", help="use the blocking API instead of the TransferWorker")
    parser.add_argument("--kernel-backend", choices=["auto", "triton", "torch"], default=None, help="pack/unpack backend")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before stuck ranks are killed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eplb_triton demo", description=__doc__)
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    if args.world_size is None and args.backend == "gloo":
        args.world_size = 4
    if args.scale is None:
        args.scale = 1 if args.backend == "nccl" or args.preset == "tiny" else 16
    if args.preset != "tiny" and args.backend == "gloo" and args.layers is None:
        args.layers = 4  # full layer counts of real models are slow on CPU; 4 layers show the same
    return run_demo(args)

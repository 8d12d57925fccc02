"""The demo rebalance: ``python -m eplb_triton demo``.

Spawns ``--world-size`` local ranks (gloo on CPU by default, ``--backend nccl`` for one
process per GPU), builds a synthetic MoE model whose expert rows carry a byte pattern naming
their expert, rebalances it to a new placement, verifies every row bit for bit and prints what
moved.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from .launch import run_ranks
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


def make_placements(num_layers: int, num_logical: int, world_size: int, redundant_per_rank: int, seed: int):
    """An initial placement and a load-driven new one, ``(num_layers, num_physical)`` each.

    Initial: experts round-robin, spare slots hold replicas of the first experts. New: synthetic
    skewed loads; the hottest experts get the spare slots, then slots are dealt to ranks
    greedily by load so each rank carries about the same traffic.
    """
    num_local = -(-num_logical // world_size) + redundant_per_rank
    num_physical = num_local * world_size
    spare = num_physical - num_logical
    rng = np.random.default_rng(seed)
    old = np.concatenate([np.arange(num_logical), np.arange(spare) % num_logical])
    old = np.tile(old, (num_layers, 1))
    new = np.empty_like(old)
    for layer in range(num_layers):
        load = rng.zipf(1.6, num_logical).astype(np.float64) * rng.uniform(0.5, 1.5, num_logical)
        replicas = np.ones(num_logical, dtype=np.int64)
        for _ in range(spare):  # give a spare slot to the expert with the highest load per replica
            replicas[np.argmax(load / replicas)] += 1
        experts = np.repeat(np.arange(num_logical), replicas)
        share = np.repeat(load / replicas, replicas)
        rank_load, rank_fill = np.zeros(world_size), np.zeros(world_size, dtype=np.int64)
        placement = np.full((world_size, num_local), -1, dtype=np.int64)
        for idx in np.argsort(-share, kind="stable"):
            open_ranks = np.flatnonzero(rank_fill < num_local)
            rank = open_ranks[np.argmin(rank_load[open_ranks])]
            placement[rank, rank_fill[rank]] = experts[idx]
            rank_fill[rank] += 1
            rank_load[rank] += share[idx]
        new[layer] = placement.reshape(-1)
    return old, new


def _rank_main(rank: int, world_size: int, args: dict):
    device = torch.device("cuda", torch.cuda.current_device()) if args["backend"] == "nccl" else torch.device("cpu")
    preset = PRESETS[args["preset"]]
    old, new = make_placements(args["layers"], preset.num_logical, world_size, preset.redundant_per_rank, args["seed"])
    num_local = old.shape[1] // world_size
    weights = make_rank_weights(preset.specs(args["scale"]), old.shape[0], num_local, device)
    fill_rank_weights(weights, old, rank, args["seed"])
    begin = time.perf_counter()
    stats = rearrange_expert_weights_inplace(old, new, weights)
    elapsed = time.perf_counter() - begin
    bad = row_mismatches(weights, old, new, rank, args["seed"])
    local_bytes = sum(t.numel() * t.element_size() for layer in weights for t in layer)
    return {"stats": stats, "elapsed": elapsed, "bad_rows": bad, "local_bytes": local_bytes}


def run_demo(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    config = {
        "preset": args.preset,
        "backend": args.backend,
        "scale": args.scale,
        "seed": args.seed,
        "layers": args.layers or preset.num_layers,
    }
    world = args.world_size
    if args.backend == "nccl":
        world = world or torch.cuda.device_count()
    print(
        f"eplb_triton demo: preset={args.preset} layers={config['layers']} world={world} backend={args.backend} "
        f"scale=1/{args.scale}"
    )
    results = run_ranks(world, _rank_main, config, backend=args.backend, timeout_s=args.timeout)
    bad = sum(len(r["bad_rows"]) for r in results)
    sent = sum(r["stats"].total_bytes_sent for r in results)
    ops = sum(r["stats"].p2p_ops for r in results)
    local = sum(r["stats"].local_copies for r in results)
    slowest = max(r["elapsed"] for r in results)
    peak = max(r["stats"].peak_staging_bytes for r in results)
    weights = results[0]["local_bytes"]
    print(f"{'rank':>4} {'sent MB':>9} {'recv MB':>9} {'p2p ops':>8} {'local':>6} {'rounds':>6} {'time s':>8} {'bad rows':>8}")
    for rank, r in enumerate(results):
        s = r["stats"]
        print(
            f"{rank:>4} {s.total_bytes_sent / 1e6:>9.3f} {s.total_bytes_received / 1e6:>9.3f} {s.p2p_ops:>8} "
            f"{s.local_copies:>6} {s.rounds:>6} {r['elapsed']:>8.3f} {len(r['bad_rows']):>8}"
        )
    print(
        f"moved {sent / 1e6:.3f} MB over the network in {ops} p2p ops, {local} local copies; "
        f"slowest rank {slowest:.3f} s ({sent / max(slowest, 1e-9) / 1e9:.3f} GB/s aggregate); "
        f"peak staging {peak / 1e6:.3f} MB per rank ({weights / 1e6:.3f} MB of weights per rank)"
    )
    print("verified: every row holds its new expert, bit for bit" if bad == 0 else f"FAILED: {bad} rows hold wrong bytes")
    return 0 if bad == 0 else 1


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--world-size", type=int, default=4, help="ranks (default 4; with nccl: one per GPU)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--scale", type=int, default=None, help="divide tensor dimensions (default 16 on gloo, 1 on nccl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before stuck ranks are killed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eplb_triton demo", description=__doc__)
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    if args.scale is None:
        args.scale = 1 if args.backend == "nccl" or args.preset == "tiny" else 16
    if args.preset != "tiny" and args.backend == "gloo" and args.layers is None:
        args.layers = 4  # full layer counts of real models are slow on CPU; 4 layers show the same
    return run_demo(args)

"""An EPLB-style placement generator for tests, benchmarks and demos (not a production balancer).

Given per-layer expert loads it does what DeepSeek's EPLB does in spirit: give redundant
slots to the experts with the highest load per replica, then pack the replicas onto ranks
heaviest first, each onto the least-loaded rank that still has a free row. Consecutive
placements under drifting load therefore reshuffle most ranks, which is what
:func:`eplb_triton.align_placement` and the balanced planner are measured against.

Deterministic (ties go to the lowest expert / rank), numpy only, vectorised over layers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["drifting_loads", "eplb_placement", "placement_sequence", "replicate_experts"]


def replicate_experts(load: np.ndarray, num_slots: int) -> np.ndarray:
    """``(num_layers, num_experts)`` replica counts: each extra slot goes to the expert with
    the largest load per replica (lowest id on ties)."""
    load = np.atleast_2d(np.asarray(load, dtype=np.float64))
    num_layers, num_experts = load.shape
    if num_slots < num_experts:
        raise ValueError(f"num_slots={num_slots} must be >= num_experts={num_experts}")
    counts = np.ones((num_layers, num_experts), dtype=np.int64)
    rows = np.arange(num_layers)
    for _ in range(num_slots - num_experts):
        counts[rows, np.argmax(load / counts, axis=1)] += 1
    return counts


def eplb_placement(load: np.ndarray, num_slots: int, ep_size: int) -> np.ndarray:
    """``(num_layers, num_slots)`` map slot -> expert for the given ``(num_layers, num_experts)`` loads.

    Replicas (see :func:`replicate_experts`) carry ``load / count`` each; they are placed
    heaviest first on the least-loaded rank with a free row, rows filled in order.
    """
    load = np.atleast_2d(np.asarray(load, dtype=np.float64))
    num_layers, num_experts = load.shape
    if num_slots % ep_size:
        raise ValueError(f"num_slots={num_slots} must be a multiple of ep_size={ep_size}")
    num_local = num_slots // ep_size
    counts = replicate_experts(load, num_slots)
    # Replica list per layer (num_slots entries each), heaviest first.
    expert = np.stack([np.repeat(np.arange(num_experts), c) for c in counts])
    weight = np.take_along_axis(load / counts, expert, axis=1)
    order = np.lexsort((expert, -weight), axis=1)
    expert = np.take_along_axis(expert, order, axis=1)
    weight = np.take_along_axis(weight, order, axis=1)

    rank_load = np.zeros((num_layers, ep_size))
    rank_fill = np.zeros((num_layers, ep_size), dtype=np.int64)
    placement = np.full((num_layers, num_slots), -1, dtype=np.int64)
    rows = np.arange(num_layers)
    for i in range(num_slots):
        masked = np.where(rank_fill < num_local, rank_load, np.inf)
        rank = np.argmin(masked, axis=1)
        placement[rows, rank * num_local + rank_fill[rows, rank]] = expert[:, i]
        rank_load[rows, rank] += weight[:, i]
        rank_fill[rows, rank] += 1
    return placement


def drifting_loads(
    num_steps: int, num_layers: int, num_experts: int, *, drift: float = 0.15, skew: float = 1.0, seed: int = 0
) -> np.ndarray:
    """``(num_steps, num_layers, num_experts)`` expert loads: log-normal popularity (``skew``)
    times a multiplicative random walk with step ``drift`` (log scale)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, skew, size=(num_layers, num_experts))
    walk = np.cumsum(rng.normal(0.0, drift, size=(num_steps, num_layers, num_experts)), axis=0)
    return np.exp(base[None] + walk) * 1000.0


def placement_sequence(
    num_steps: int,
    num_layers: int,
    num_experts: int,
    num_redundant: int,
    ep_size: int,
    *,
    drift: float = 0.15,
    seed: int = 0,
) -> np.ndarray:
    """``(num_steps, num_layers, num_experts + num_redundant)`` consecutive EPLB-style placements."""
    loads = drifting_loads(num_steps, num_layers, num_experts, drift=drift, seed=seed)
    return np.stack([eplb_placement(loads[t], num_experts + num_redundant, ep_size) for t in range(num_steps)])

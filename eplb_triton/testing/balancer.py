"""An EPLB-style placement generator for tests, benchmarks and demos (not a production balancer).

Given per-layer expert loads it does what DeepSeek's EPLB does in spirit: give redundant
slots to the experts with the highest load per replica, then pack the replicas onto ranks
heaviest first, each onto the least-loaded rank that still has a free row. Consecutive
placements under drifting load therefore reshuffle most ranks, which is what
:func:`eplb_triton.align_placement` and the balanced planner are measured against.

Deterministic (ties go to the lowest expert / rank), numpy only, vectorised over layers.
:func:`placement_maps` and :func:`make_placements` give a model preset's consecutive placements.

Test and benchmark support, not part of the runtime API.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "drifting_loads",
    "eplb_placement",
    "make_placements",
    "num_local_experts",
    "placement_maps",
    "placement_sequence",
    "replicate_experts",
]


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


def eplb_placement(
    load: np.ndarray, num_slots: int, ep_size: int, *, ranks_per_node: int | None = None, num_groups: int | None = None
) -> np.ndarray:
    """``(num_layers, num_slots)`` map slot -> expert for the given ``(num_layers, num_experts)`` loads.

    Flat (default): replicas (see :func:`replicate_experts`) carry ``load / count`` each;
    they are placed heaviest first on the least-loaded rank with a free row, rows filled in
    order. Hierarchical (``ranks_per_node`` and ``num_groups`` given, like EPLB's
    group-limited policy): the experts' ``num_groups`` contiguous groups are packed onto
    nodes by group load (equal numbers of groups per node), then every node replicates and
    packs its own experts over its ranks as above; experts never leave their node's group.
    """
    load = np.atleast_2d(np.asarray(load, dtype=np.float64))
    if ranks_per_node is not None or num_groups is not None:
        return _hierarchical(load, num_slots, ep_size, ranks_per_node, num_groups)
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


def _pack_equal(weight: np.ndarray, bins: int) -> np.ndarray:
    """``(batch, items)`` -> bin of each item: heaviest first onto the lightest bin that still
    has room (every bin gets ``items // bins`` items)."""
    batch, items = weight.shape
    cap = items // bins
    order = np.lexsort((np.broadcast_to(np.arange(items), weight.shape), -weight), axis=1)
    bin_load = np.zeros((batch, bins))
    bin_fill = np.zeros((batch, bins), dtype=np.int64)
    out = np.empty((batch, items), dtype=np.int64)
    rows = np.arange(batch)
    for i in range(items):
        item = order[:, i]
        b = np.argmin(np.where(bin_fill < cap, bin_load, np.inf), axis=1)
        out[rows, item] = b
        bin_load[rows, b] += weight[rows, item]
        bin_fill[rows, b] += 1
    return out


def _hierarchical(load: np.ndarray, num_slots: int, ep_size: int, ranks_per_node, num_groups) -> np.ndarray:
    num_layers, num_experts = load.shape
    if ranks_per_node is None or num_groups is None:
        raise ValueError("the hierarchical policy needs both ranks_per_node and num_groups")
    nodes = ep_size // ranks_per_node
    if ep_size % ranks_per_node or num_groups % nodes or num_experts % num_groups or num_slots % ep_size:
        raise ValueError(
            f"hierarchical placement needs ranks_per_node | ep_size, nodes | num_groups, num_groups | num_experts "
            f"and ep_size | num_slots (got {ranks_per_node=}, {ep_size=}, {num_groups=}, {num_experts=}, {num_slots=})"
        )
    group_size = num_experts // num_groups
    node_of_group = _pack_equal(load.reshape(num_layers, num_groups, group_size).sum(axis=2), nodes)
    # Experts of each node, groups in ascending order: (layers, nodes, experts per node).
    group_order = np.argsort(node_of_group * num_groups + np.arange(num_groups), axis=1)
    experts = (group_order[:, :, None] * group_size + np.arange(group_size)).reshape(num_layers, nodes, -1)
    node_load = np.take_along_axis(load, experts.reshape(num_layers, -1), axis=1).reshape(num_layers * nodes, -1)
    local = eplb_placement(node_load, num_slots // nodes, ranks_per_node)  # batch = (layer, node)
    glob = np.take_along_axis(experts.reshape(num_layers * nodes, -1), local, axis=1)
    return glob.reshape(num_layers, num_slots)


def drifting_loads(
    num_rebalances: int, num_layers: int, num_experts: int, *, drift: float = 0.15, skew: float = 1.0, seed: int = 0
) -> np.ndarray:
    """``(num_rebalances, num_layers, num_experts)`` expert loads: log-normal popularity (``skew``)
    times a multiplicative random walk with step ``drift`` (log scale)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, skew, size=(num_layers, num_experts))
    walk = np.cumsum(rng.normal(0.0, drift, size=(num_rebalances, num_layers, num_experts)), axis=0)
    return np.exp(base[None] + walk) * 1000.0


def placement_sequence(
    num_rebalances: int,
    num_layers: int,
    num_experts: int,
    num_redundant: int,
    ep_size: int,
    *,
    drift: float = 0.15,
    seed: int = 0,
    ranks_per_node: int | None = None,
    num_groups: int | None = None,
) -> np.ndarray:
    """``(num_rebalances, num_layers, num_experts + num_redundant)`` consecutive EPLB-style placements
    (hierarchical when ``ranks_per_node`` and ``num_groups`` are given)."""
    loads = drifting_loads(num_rebalances, num_layers, num_experts, drift=drift, seed=seed)
    slots = num_experts + num_redundant
    return np.stack(
        [
            eplb_placement(loads[t], slots, ep_size, ranks_per_node=ranks_per_node, num_groups=num_groups)
            for t in range(num_rebalances)
        ]
    )


def num_local_experts(num_logical: int, world_size: int, redundant_per_rank: int) -> int:
    """Rows per rank: the logical experts spread evenly, plus ``redundant_per_rank`` replicas."""
    return -(-num_logical // world_size) + redundant_per_rank


def placement_maps(num_layers: int, num_logical: int, world_size: int, redundant_per_rank: int, steps: int, seed: int):
    """``(steps + 1, num_layers, num_physical)`` consecutive EPLB-style placements under
    drifting synthetic load (:func:`placement_sequence`)."""
    num_physical = num_local_experts(num_logical, world_size, redundant_per_rank) * world_size
    return placement_sequence(steps + 1, num_layers, num_logical, num_physical - num_logical, world_size, seed=seed)


def make_placements(num_layers: int, num_logical: int, world_size: int, redundant_per_rank: int, seed: int):
    """One rebalance: the old and the new placement, ``(num_layers, num_physical)`` each."""
    maps = placement_maps(num_layers, num_logical, world_size, redundant_per_rank, 1, seed)
    return maps[0], maps[1]

"""Schedule: split a layer's plan into exchange rounds that fit a staging budget.

A rank's staging in a round is one packed expert per row it sends, receives or moves
locally. Within a round every read happens before any write, so a round may read a row that
it also overwrites. Across rounds, delivery ``u`` reads an old row that delivery ``next(u)``
overwrites, so ``u`` must run no later than ``next(u)``. Each delivery reads one row and each
row has at most one writer, so these constraints form a *functional graph*: chains run in
order, and a cycle (rows rotating among ranks) would have to share one round. A cycle too big
for the budget is broken by *stashing* one of its rows: its old contents are packed into a
small stash at the start of the layer and every reader of that row reads the stash instead,
which turns the cycle into a chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import LayerPlan

__all__ = ["LayerSchedule", "schedule_layer"]


@dataclass(frozen=True)
class LayerSchedule:
    """``rounds[k]``: ascending delivery indices of round k. ``stash_slots``: old slots (global
    slot numbers, ascending) whose contents are stashed before round 0."""

    rounds: list[np.ndarray]
    stash_slots: np.ndarray

    def stash_rows(self, rank: int, num_local: int) -> np.ndarray:
        """Local rows this rank stashes, ascending."""
        mine = self.stash_slots[self.stash_slots // num_local == rank]
        return mine % num_local


def schedule_layer(layer: LayerPlan, expert_bytes: int, budget_bytes: int) -> LayerSchedule:
    """Split ``layer`` into rounds whose staging (stash included) fits ``budget_bytes`` per rank.

    Returns one round with every delivery when the layer fits at once. Raises ValueError when
    the budget cannot hold even the smallest schedule this method finds.
    """
    count = layer.num_deliveries
    empty = np.zeros(0, dtype=np.int64)
    if count == 0:
        return LayerSchedule([], empty)
    capacity = budget_bytes // expert_bytes
    load = _rank_load(layer)
    if load.sum(axis=0).max() <= capacity:
        return LayerSchedule([np.arange(count)], empty)

    writer = np.full(layer.route.size, -1, dtype=np.int64)
    writer[layer.dst_slot] = np.arange(count)
    writer[layer.dup_dst_slot] = layer.dup_delivery
    stashed = np.zeros(layer.route.size, dtype=bool)
    rank_of_slot = np.arange(layer.route.size) // layer.num_local
    while True:
        nxt = np.where(stashed[layer.src_slot], -1, writer[layer.src_slot])
        unit, depth = _functional_graph_order(nxt)
        room = capacity - np.bincount(rank_of_slot[stashed], minlength=layer.ep_size)
        unit_load = np.zeros((count, layer.ep_size), dtype=np.int64)
        np.add.at(unit_load, unit, load)
        too_big = np.flatnonzero((unit_load > room).any(axis=1))
        cycles = too_big[np.bincount(unit, minlength=count)[too_big] > 1]
        if cycles.size == 0:
            if too_big.size:
                _too_small(budget_bytes, expert_bytes, room, unit_load[too_big].max(axis=0))
            break
        # Break each oversized cycle at its smallest delivery: stash the row it reads.
        stashed[layer.src_slot[cycles]] = True
        if (np.bincount(rank_of_slot[stashed], minlength=layer.ep_size) >= capacity).any():
            _too_small(budget_bytes, expert_bytes, room, unit_load[too_big].max(axis=0))

    order = np.lexsort((unit, -depth))
    rounds, current, current_load = [], [], np.zeros(layer.ep_size, dtype=np.int64)
    boundaries = np.flatnonzero(np.r_[True, unit[order][1:] != unit[order][:-1], True])
    for start, stop in zip(boundaries[:-1], boundaries[1:]):  # whole units (cycles), in order
        members = order[start:stop]
        members_load = load[members].sum(axis=0)
        if (current_load + members_load > room).any():
            rounds.append(np.sort(np.concatenate(current)))
            current, current_load = [], np.zeros_like(current_load)
        current.append(members)
        current_load += members_load
    rounds.append(np.sort(np.concatenate(current)))
    return LayerSchedule(rounds, np.flatnonzero(stashed).astype(np.int64))


def _too_small(budget_bytes: int, expert_bytes: int, room: np.ndarray, need: np.ndarray) -> None:
    raise ValueError(
        f"max_buffer_bytes={budget_bytes} is too small for this layer: with {expert_bytes}-byte experts a rank "
        f"needs staging for {int(need.max())} experts in one round plus its stash, but has room for {int(room.min())}"
    )


def _rank_load(layer: LayerPlan) -> np.ndarray:
    """``(num_deliveries, ep_size)``: staging rows each delivery costs each rank."""
    n, count = layer.num_local, layer.num_deliveries
    load = np.zeros((count, layer.ep_size), dtype=np.int64)
    index = np.arange(count)
    net = layer.is_network
    np.add.at(load, (index[net], layer.src_slot[net] // n), 1)
    np.add.at(load, (index, layer.dst_slot // n), 1)
    return load


def _functional_graph_order(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the functional graph ``i -> nxt[i]`` (-1 = none): a unit id per node (the smallest
    node of its cycle, or itself) and a depth with ``depth[i] > depth[nxt[i]]`` off cycles."""
    count = nxt.size
    steps = max(1, int(np.ceil(np.log2(count + 1))) + 1)
    ends = nxt < 0
    ptr = np.where(ends, np.arange(count), nxt)
    reach = ptr.copy()
    for _ in range(steps):  # reach = nxt^(2^steps): lands on a cycle unless the chain ends
        reach = reach[reach]
    on_cycle = np.zeros(count, dtype=bool)
    on_cycle[reach[~ends[reach]]] = True
    label, jump = np.arange(count), ptr.copy()
    for _ in range(steps):  # smallest node within 2^steps hops: the cycle's minimum on cycles
        label = np.minimum(label, label[jump])
        jump = jump[jump]
    unit = np.where(on_cycle, label, np.arange(count))
    depth = np.full(count, -1, dtype=np.int64)
    depth[ends | on_cycle] = 0
    for _ in range(count):
        todo = (depth < 0) & (depth[ptr] >= 0)
        if not todo.any():
            break
        depth[todo] = depth[ptr[todo]] + 1
    return unit, depth

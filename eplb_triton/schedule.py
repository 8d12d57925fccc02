"""Schedule: split a layer's plan into staging passes that fit a staging budget.

A rank's staging in a pass is one packed expert per row it sends, receives or moves
locally. Within a pass every read happens before any write, so a pass may read a row that
it also overwrites. Across passes, delivery ``u`` reads an old row that delivery ``next(u)``
overwrites, so ``u`` must run no later than ``next(u)``. Each delivery reads one row and each
row has at most one writer, so these constraints form a *functional graph*: chains run in
order, and a cycle (rows rotating among ranks) would have to share one pass. A cycle too big
for the budget is broken by *stashing* one of its rows: its old contents are packed into a
small stash at the start of the layer and every reader of that row reads the stash instead,
which turns the cycle into a chain. A stashed row costs its rank one row of the budget in
every pass of the layer.

Which row to stash: one on the rank where the cycle costs the most. With a capacity of
``C >= max(num_local, 2)`` rows per rank this always succeeds, so the default budget (one
layer, ``num_local`` rows) only ever needs raising for layers with one row per rank:

* a cycle visits rank ``s`` ``v`` times (``v`` of its deliveries write a row of ``s``, and as
  many read one) and costs ``s`` at most ``2 v`` rows; cycles write disjoint rows, so the
  visits of all cycles to ``s`` sum to at most ``num_local``;
* a cycle too big for ``C`` costs some rank more than ``C >= num_local``, so it visits that
  rank more than ``num_local / 2`` times: at most one cycle per rank is that heavy, and each
  rank stashes at most one row (room ``C - 1 >= 1`` left: enough for any single delivery);
* any other cycle visits a rank that stashed at most ``num_local - (floor(num_local/2) + 1)``
  times, so costs it at most ``num_local - 1 <= C - 1`` rows: it still fits in one pass.

A layer with one row per rank that swaps rows between two ranks needs 2 rows (a send and a
receive at once, or a stash and one delivery): :func:`smallest_budget_bytes` is what the
default budget grows to then.

A layer that runs in **one pass** needs less: a local move whose source row no other local
move of the layer writes is copied row to row when the pass is written, before the received
rows land (:func:`direct_local_moves`), so only the other local moves take staging. Balanced
placements move about as many experts locally as over the wire (qwen3-30b-a3b's preset: 31
sent, 31 received and 28 local rows of 66 per rank and layer): counting every local move they
needed two passes at the default budget, and fit one without those staged rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .plan import LayerPlan, stack_deliveries

__all__ = [
    "LayerSchedule", "capacity_rows", "direct_local_moves", "fits_one_pass", "one_pass_rows_all", "schedule_layer",
    "smallest_budget_bytes",
]


@dataclass(frozen=True)
class LayerSchedule:
    """``passes[k]``: ascending delivery indices of pass k. ``stash_slots``: old slots (global
    slot numbers, ascending) whose contents are stashed before pass 0."""

    passes: list[np.ndarray]
    stash_slots: np.ndarray

    def stash_rows(self, rank: int, num_local: int) -> np.ndarray:
        """Local rows this rank stashes, ascending."""
        mine = self.stash_slots[self.stash_slots // num_local == rank]
        return mine % num_local


def schedule_layer(layer: LayerPlan, expert_bytes: int, budget_bytes: int | None = None) -> LayerSchedule:
    """Split ``layer`` into passes whose staging (stash included) fits ``budget_bytes`` per rank.

    ``budget_bytes=None`` is the default budget: one layer (``num_local`` rows of
    ``expert_bytes``), raised to :func:`smallest_budget_bytes` where that is larger (only
    possible with one row per rank, and then at most 2 rows; see the module docstring), so the
    default schedules every valid layer. Returns one pass with every delivery when the layer
    fits at once. Raises ValueError, stating the smallest budget that works, when an explicit
    ``budget_bytes`` is too small.
    """
    if layer.num_deliveries == 0:
        return LayerSchedule([], np.zeros(0, dtype=np.int64))
    capacity = capacity_rows(layer.num_local, expert_bytes, budget_bytes)
    one_pass = int(_one_pass_rows(layer).max())
    if capacity >= 1 and one_pass <= capacity:  # the usual case: one pass, no stash
        return _whole(layer)
    load = _rank_load(layer)
    schedule = _schedule_rows(layer, load, capacity)
    if schedule is None:
        # Any schedule that fits fewer rows fits these too: a budget works iff it holds the smallest.
        smallest = min(_smallest_capacity(layer, load), one_pass)
        if budget_bytes is not None and smallest > capacity:
            raise ValueError(
                f"max_buffer_bytes={budget_bytes} is too small for this layer: with {expert_bytes}-byte experts "
                f"a rank needs room for {smallest} experts (its largest pass plus its stash) but has room for "
                f"{capacity}; the smallest budget that works is {smallest * expert_bytes} bytes"
            )
        schedule = _whole(layer) if smallest == one_pass else _schedule_rows(layer, load, smallest)
    return schedule


def capacity_rows(num_local: int, expert_bytes: int, budget_bytes: int | None) -> int:
    """Rows of ``expert_bytes`` a rank may stage per pass: the budget's, or by default one
    layer (``num_local``)."""
    return num_local if budget_bytes is None else budget_bytes // expert_bytes


def _whole(layer: LayerPlan) -> LayerSchedule:
    """One pass with every delivery, no stash."""
    return LayerSchedule([np.arange(layer.num_deliveries)], np.zeros(0, dtype=np.int64))


def direct_local_moves(src_slot: np.ndarray, dst_slot: np.ndarray, is_network: np.ndarray | None = None) -> np.ndarray:
    """Which deliveries are local moves copied row to row when their pass is written (one
    launch, before the received rows land): those whose source row no local move writes. Their
    source is read before any write of the pass except that launch's own, whose destinations
    are local-move destinations, hence not any of its sources. The others are staged (packed
    with the sends, written with the receives). Only for a layer in one pass without stash: with
    several passes a source may have been overwritten by an earlier pass.

    Works on one layer's arrays, on several layers' if slots are made unique per layer, or on
    one rank's local moves (``is_network=None``: every delivery given is a local move)."""
    if is_network is None:
        return ~np.isin(src_slot, dst_slot)
    local = ~is_network
    return local & ~np.isin(src_slot, dst_slot[local])


def _one_pass_rows(layer: LayerPlan) -> np.ndarray:
    """Staging rows each rank needs for the whole layer in one pass: sends, receives and the
    local moves that are not :func:`direct_local_moves`."""
    return one_pass_rows_all([layer])[0]


def one_pass_rows_all(layers: Sequence[LayerPlan]) -> np.ndarray:
    """``(len(layers), ep_size)``: :func:`_one_pass_rows` of every layer in one numpy pass."""
    n, ranks, num = layers[0].num_local, layers[0].ep_size, len(layers)
    stacked = stack_deliveries(layers)
    layer_of, src, dst, net = stacked.layer_of, stacked.src_slot, stacked.dst_slot, stacked.is_network
    width = n * ranks  # slots of a layer: layer * width + slot is unique across layers
    staged = ~direct_local_moves(layer_of * width + src, layer_of * width + dst, net)
    rows = np.bincount(layer_of[net] * ranks + src[net] // n, minlength=num * ranks)
    rows += np.bincount(layer_of[staged] * ranks + dst[staged] // n, minlength=num * ranks)
    return rows.reshape(num, ranks)


def fits_one_pass(layers: Sequence[LayerPlan], capacities: Sequence[int], rows: np.ndarray | None = None) -> np.ndarray:
    """For each layer, whether :func:`schedule_layer` takes its usual case (one pass with every
    delivery, no stash) with room for ``capacities[i]`` rows per rank: the same test, for every
    layer in one numpy pass (one layer's test cost ~30 us of host time on the H200 hosts).
    The layers share ``ep_size`` and ``num_local`` (one plan). ``rows``: their
    :func:`one_pass_rows_all`, when the caller has it."""
    if not layers:
        return np.zeros(0, dtype=bool)
    count = np.array([layer.num_deliveries for layer in layers], dtype=np.int64)
    capacity = np.asarray(capacities, dtype=np.int64)
    return (count > 0) & (capacity >= 1) & ((one_pass_rows_all(layers) if rows is None else rows).max(axis=1) <= capacity)


def smallest_budget_bytes(layer: LayerPlan, expert_bytes: int) -> int:
    """The smallest ``budget_bytes`` :func:`schedule_layer` accepts for ``layer`` (0 when
    nothing moves); every larger budget works too."""
    if layer.num_deliveries == 0:
        return 0
    return min(_smallest_capacity(layer, _rank_load(layer)), int(_one_pass_rows(layer).max())) * expert_bytes


def _smallest_capacity(layer: LayerPlan, load: np.ndarray) -> int:
    """Fewest rows per rank :func:`_schedule_rows` succeeds with (it always does with
    ``max(num_local, 2)``, and with the whole layer in one pass)."""
    everything = int(load.sum(axis=0).max())
    for capacity in range(1, everything + 1):
        if _schedule_rows(layer, load, capacity) is not None:
            return capacity
    return everything  # not reached: one pass with every delivery fits `everything` rows


def _schedule_rows(layer: LayerPlan, load: np.ndarray, capacity: int) -> LayerSchedule | None:
    """Passes within ``capacity`` rows per rank (stash included), or None when this method
    cannot fit the layer."""
    count = layer.num_deliveries
    if capacity < 1:
        return None
    if load.sum(axis=0).max() <= capacity:
        return LayerSchedule([np.arange(count)], np.zeros(0, dtype=np.int64))

    writer = np.full(layer.route.size, -1, dtype=np.int64)
    writer[layer.dst_slot] = np.arange(count)
    writer[layer.dup_dst_slot] = layer.dup_delivery
    stashed = np.zeros(layer.route.size, dtype=bool)
    rank_of_slot = np.arange(layer.route.size) // layer.num_local
    src_rank = rank_of_slot[layer.src_slot]
    while True:
        nxt = np.where(stashed[layer.src_slot], -1, writer[layer.src_slot])
        unit, depth = _functional_graph_order(nxt)
        room = capacity - np.bincount(rank_of_slot[stashed], minlength=layer.ep_size)
        unit_load = np.zeros((count, layer.ep_size), dtype=np.int64)
        np.add.at(unit_load, unit, load)
        too_big = np.flatnonzero((unit_load > room).any(axis=1))
        if too_big.size == 0:
            break
        sizes = np.bincount(unit, minlength=count)
        if (sizes[too_big] == 1).any() or (room < 1).any():
            return None  # a single delivery, or a stash alone, does not fit
        for cycle in too_big:
            members = np.flatnonzero(unit == cycle)
            # Stash where the cycle costs most, keeping a row free there for its deliveries.
            cost = unit_load[cycle]
            ranks = np.unique(src_rank[members])
            ranks = ranks[room[ranks] >= 2]
            if ranks.size == 0:
                return None
            best = ranks[np.lexsort((-room[ranks], -cost[ranks]))[0]]
            reader = members[src_rank[members] == best][0]
            stashed[layer.src_slot[reader]] = True
            room[best] -= 1

    order = np.lexsort((unit, -depth))
    passes, current, current_load = [], [], np.zeros(layer.ep_size, dtype=np.int64)
    boundaries = np.flatnonzero(np.r_[True, unit[order][1:] != unit[order][:-1], True])
    for start, stop in zip(boundaries[:-1], boundaries[1:]):  # whole units (cycles), in order
        members = order[start:stop]
        members_load = load[members].sum(axis=0)
        if (current_load + members_load > room).any():
            passes.append(np.sort(np.concatenate(current)))
            current, current_load = [], np.zeros_like(current_load)
        current.append(members)
        current_load += members_load
    passes.append(np.sort(np.concatenate(current)))
    return LayerSchedule(passes, np.flatnonzero(stashed).astype(np.int64))


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

"""Rearrangement plan: who sends which expert row to whom, computed from the global maps.

Every rank computes the same plan from the same maps (pure numpy, no randomness, no Python
loop over experts). For one layer the plan is a set of *deliveries*: "rank ``d`` needs expert
``e``" is served once, either by a **local move** (``e`` already sits in an old row of ``d``)
or by a **network transfer** from a holder rank; further rows of ``d`` that need ``e`` are
**duplicate fills** copied on-device from the delivered row. Rows whose expert does not change
are never touched.

Wire order: the rows that rank ``s`` sends to rank ``d`` are ordered by destination slot, and
``d`` unpacks them in the same order, so one contiguous buffer per peer carries them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .maps import ExpertMaps, normalize_maps

__all__ = ["LayerPlan", "RankPlan", "RearrangementPlan", "plan_layer", "plan_rearrangement"]

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RankPlan:
    """What one rank does for one layer; all row numbers are local rows (``slot % num_local``).

    ``send_rows[peer]`` lists, in wire order, the rows this rank packs for ``peer``;
    ``recv_rows[peer]`` lists the rows the buffer from ``peer`` unpacks into (same order as the
    peer's ``send_rows[rank]``). Local moves copy old row ``local_src_rows[i]`` into
    ``local_dst_rows[i]``; duplicate fills copy the *new* content of ``dup_src_rows[i]`` into
    ``dup_dst_rows[i]`` after receives and local moves are applied.
    """

    rank: int
    send_rows: dict[int, np.ndarray]
    recv_rows: dict[int, np.ndarray]
    local_src_rows: np.ndarray
    local_dst_rows: np.ndarray
    dup_src_rows: np.ndarray
    dup_dst_rows: np.ndarray

    @property
    def peers(self) -> list[int]:
        """Peers this rank exchanges with, ascending."""
        return sorted(set(self.send_rows) | set(self.recv_rows))

    @property
    def is_empty(self) -> bool:
        return not self.send_rows and not self.recv_rows and self.local_dst_rows.size == 0 and self.dup_dst_rows.size == 0


@dataclass(frozen=True)
class LayerPlan:
    """The plan of one layer.

    Deliveries are rows of parallel arrays: ``src_slot`` (old slot read), ``dst_slot`` (the
    first new slot written) and ``is_network``. Network deliveries come first, sorted by
    ``(src_rank, dst_rank, dst_slot)`` (the wire order); local moves follow, sorted by
    ``dst_slot``. Duplicate fills: ``dup_dst_slot[i]`` receives what delivery
    ``dup_delivery[i]`` wrote.
    """

    ep_size: int
    num_local: int
    route: np.ndarray  # (num_physical,): old slot whose content each new slot holds, -1 if empty
    traffic: np.ndarray  # (ep_size, ep_size): off-diagonal network copies, diagonal local copies
    src_slot: np.ndarray
    dst_slot: np.ndarray
    is_network: np.ndarray
    dup_dst_slot: np.ndarray
    dup_delivery: np.ndarray
    _rank_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_deliveries(self) -> int:
        return int(self.src_slot.size)

    @property
    def num_network(self) -> int:
        return int(self.is_network.sum())

    @cached_property
    def changed_slots(self) -> np.ndarray:
        """Slots written by this plan (delivered or duplicate-filled), ascending."""
        return np.sort(np.concatenate([self.dst_slot, self.dup_dst_slot]))

    def max_rank_load(self) -> int:
        """Largest number of experts any rank sends or receives over the network."""
        sent = self.traffic.sum(axis=1) - np.diag(self.traffic)
        received = self.traffic.sum(axis=0) - np.diag(self.traffic)
        return int(max(sent.max(initial=0), received.max(initial=0)))

    def restrict(self, deliveries: np.ndarray) -> "LayerPlan":
        """The sub-plan made of the given deliveries (ascending indices) and their duplicate fills."""
        deliveries = np.asarray(deliveries, dtype=np.int64)
        renumber = np.full(self.num_deliveries, -1, dtype=np.int64)
        renumber[deliveries] = np.arange(deliveries.size)
        keep_dup = renumber[self.dup_delivery] >= 0
        src, dst, net = self.src_slot[deliveries], self.dst_slot[deliveries], self.is_network[deliveries]
        dup_dst = self.dup_dst_slot[keep_dup]
        return LayerPlan(
            ep_size=self.ep_size,
            num_local=self.num_local,
            route=self.route,
            traffic=_traffic(src, dst, net, dup_dst, self.ep_size, self.num_local),
            src_slot=src,
            dst_slot=dst,
            is_network=net,
            dup_dst_slot=dup_dst,
            dup_delivery=renumber[self.dup_delivery[keep_dup]],
        )

    def rank(self, rank: int) -> RankPlan:
        """The per-rank view of this layer (cached)."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank {rank} out of range for ep_size {self.ep_size}")
        view = self._rank_cache.get(rank)
        if view is None:
            view = self._rank_cache[rank] = self._build_rank_view(rank)
        return view

    def _build_rank_view(self, rank: int) -> RankPlan:
        n = self.num_local
        src_rank, dst_rank = self.src_slot // n, self.dst_slot // n
        net = self.is_network
        sends = net & (src_rank == rank)
        recvs = net & (dst_rank == rank)
        send_rows = _split_by_peer(dst_rank[sends], self.src_slot[sends] % n)
        recv_rows = _split_by_peer(src_rank[recvs], self.dst_slot[recvs] % n)
        local = ~net & (dst_rank == rank)
        dup_on_rank = self.dup_dst_slot // n == rank
        return RankPlan(
            rank=rank,
            send_rows=send_rows,
            recv_rows=recv_rows,
            local_src_rows=self.src_slot[local] % n,
            local_dst_rows=self.dst_slot[local] % n,
            dup_src_rows=self.dst_slot[self.dup_delivery[dup_on_rank]] % n,
            dup_dst_rows=self.dup_dst_slot[dup_on_rank] % n,
        )


def _split_by_peer(peer: np.ndarray, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Group ``rows`` by ``peer`` keeping order (peers arrive sorted)."""
    if peer.size == 0:
        return {}
    peers, starts = np.unique(peer, return_index=True)
    bounds = list(starts[1:]) + [peer.size]
    return {int(p): rows[s:e].astype(np.int64) for p, s, e in zip(peers, starts, bounds)}


@dataclass(frozen=True)
class RearrangementPlan:
    """Plans of all layers. ``layers[l]`` is a :class:`LayerPlan`."""

    layers: list[LayerPlan]
    maps: ExpertMaps

    @property
    def ep_size(self) -> int:
        return self.maps.ep_size

    @property
    def num_local(self) -> int:
        return self.maps.num_local

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def traffic(self) -> np.ndarray:
        """``(num_layers, ep_size, ep_size)`` stack of the layers' traffic matrices."""
        return np.stack([layer.traffic for layer in self.layers])

    @property
    def network_copies(self) -> int:
        return int(sum(layer.num_network for layer in self.layers))


def plan_layer(old: np.ndarray, new: np.ndarray, ep_size: int) -> LayerPlan:
    """Plan one layer from validated 1-D int64 maps (see :func:`plan_rearrangement`)."""
    num_physical = old.size
    num_local = num_physical // ep_size
    slots = np.arange(num_physical, dtype=np.int64)
    rank_of = slots // num_local
    num_ids = int(max(old.max(initial=-1), new.max(initial=-1))) + 1

    # Best old source of expert e on rank r: prefer a row that keeps its expert (it is never
    # overwritten), then the lowest slot. Encoded as one sortable key.
    held = old >= 0
    stable = held & (new == old)
    source_key = np.full((max(num_ids, 1), ep_size), 2 * num_physical, dtype=np.int64)
    np.minimum.at(source_key, (old[held], rank_of[held]), slots[held] + num_physical * ~stable[held])
    has = source_key < 2 * num_physical
    source_slot = source_key % num_physical

    # Slots that need new content, grouped by (rank, expert): the lowest slot is delivered,
    # the others are duplicate fills.
    changed = (new >= 0) & (new != old)
    need_slot = slots[changed]
    need_pair = rank_of[changed] * num_ids + new[changed]
    pairs, first, inverse = np.unique(need_pair, return_index=True, return_inverse=True)
    dst = need_slot[first]
    d_rank, d_expert = pairs // max(num_ids, 1), pairs % max(num_ids, 1)
    is_dup = np.ones(need_slot.size, dtype=bool)
    is_dup[first] = False

    local = has[d_expert, d_rank] if pairs.size else np.zeros(0, dtype=bool)
    src = np.empty(pairs.size, dtype=np.int64)
    src[local] = source_slot[d_expert[local], d_rank[local]]
    net = ~local
    src[net] = _vllm_senders(d_expert[net], d_rank[net], has, source_slot)

    # Order: network deliveries by (src_rank, dst_rank, dst_slot), then local ones by dst_slot.
    net_idx = np.flatnonzero(net)
    net_idx = net_idx[np.lexsort((dst[net_idx], rank_of[dst[net_idx]], rank_of[src[net_idx]]))]
    order = np.concatenate([net_idx, np.flatnonzero(local)])
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    src_slot, dst_slot, is_network = src[order], dst[order], net[order]

    dup_dst_slot = need_slot[is_dup]
    dup_delivery = position[inverse[is_dup]]

    route = np.where(new >= 0, slots, -1)
    route[dst_slot] = src_slot
    route[dup_dst_slot] = src_slot[dup_delivery]

    return LayerPlan(
        ep_size=ep_size,
        num_local=num_local,
        route=route,
        traffic=_traffic(src_slot, dst_slot, is_network, dup_dst_slot, ep_size, num_local),
        src_slot=src_slot,
        dst_slot=dst_slot,
        is_network=is_network,
        dup_dst_slot=dup_dst_slot,
        dup_delivery=dup_delivery,
    )


def _traffic(src, dst, net, dup_dst, ep_size: int, num_local: int) -> np.ndarray:
    """Expert copies from rank i to rank j over the network; the diagonal counts local writes."""
    traffic = np.zeros((ep_size, ep_size), dtype=np.int64)
    np.add.at(traffic, (src[net] // num_local, dst[net] // num_local), 1)
    local_writes = np.concatenate([dst[~net] // num_local, dup_dst // num_local])
    traffic[np.diag_indices(ep_size)] += np.bincount(local_writes, minlength=ep_size)
    return traffic


def _vllm_senders(expert: np.ndarray, receiver: np.ndarray, has: np.ndarray, source_slot: np.ndarray) -> np.ndarray:
    """Source slots for network deliveries by vLLM's rule, vectorised.

    For each expert, the receivers (ascending rank) are split evenly among the holders
    (ascending rank): holder ``i`` serves receivers ``[i*q, (i+1)*q)`` with
    ``q = n_receivers // n_holders``, and the remainder goes one each to the first holders.
    """
    if expert.size == 0:
        return _EMPTY
    order = np.lexsort((receiver, expert))
    e_sorted = expert[order]
    group_start = np.flatnonzero(np.r_[True, e_sorted[1:] != e_sorted[:-1]])
    group_size = np.diff(np.r_[group_start, e_sorted.size])
    k = np.arange(e_sorted.size) - np.repeat(group_start, group_size)
    n = np.repeat(group_size, group_size)
    holders = has.sum(axis=1)[e_sorted]
    per_holder = n // holders
    remainder_start = holders * per_holder
    holder_index = np.where(k < remainder_start, k // np.maximum(per_holder, 1), k - remainder_start)
    holder_ranks = np.argsort(~has, axis=1, kind="stable")  # holders first, ascending rank
    sender = holder_ranks[e_sorted, holder_index]
    src = np.empty(expert.size, dtype=np.int64)
    src[order] = source_slot[e_sorted, sender]
    return src


def plan_rearrangement(old_global_expert_indices, new_global_expert_indices, ep_size: int) -> RearrangementPlan:
    """Plan the rearrangement of every layer from the global old and new maps.

    Args:
        old_global_expert_indices: torch tensor or numpy array of integer expert ids, shape
            ``(num_layers, num_physical)`` or ``(num_physical,)``; ``-1`` = empty slot.
        new_global_expert_indices: same shape; every id it names must be held by some old
            slot of the same layer.
        ep_size: number of EP ranks; ``num_physical`` must be a multiple of it.

    Returns:
        A :class:`RearrangementPlan`; ``plan.layers[l].rank(r)`` is rank ``r``'s view.

    Raises:
        TypeError, ValueError: on malformed maps (same verdict on every rank).
    """
    maps = normalize_maps(old_global_expert_indices, new_global_expert_indices, ep_size)
    return plan_from_maps(maps)


def plan_from_maps(maps: ExpertMaps) -> RearrangementPlan:
    """Plan already validated maps."""
    layers = [plan_layer(maps.old[l], maps.new[l], maps.ep_size) for l in range(maps.num_layers)]
    return RearrangementPlan(layers=layers, maps=maps)

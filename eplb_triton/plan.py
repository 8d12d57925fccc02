"""Rearrangement plan: who sends which expert row to whom, computed from the global maps.

(Over 400 lines: the plan types, the vectorised planner of all layers, sender balancing and the
network-round colouring share the delivery arrays; the elastic map expansion could move to maps.py.)

Every rank computes the same plan from the same maps (pure numpy, no randomness, no Python
loop over experts; all layers are planned in one vectorised pass). For one layer the plan is
a set of *deliveries*: "rank ``d`` needs expert ``e``" is served once, either by a **local
move** (``e`` already sits in an old row of ``d``) or by a **network transfer** from a holder
rank; further rows of ``d`` that need ``e`` are **duplicate fills** copied on-device from the
delivered row. Rows whose expert does not change are never touched.

Senders. Receivers are fixed (each rank that needs an expert over the network receives it
exactly once), so a layer's receive counts are fixed; the planner chooses, among the ranks
holding each expert, the sender. ``sender_policy="balanced"`` (default) minimises the layer
bottleneck, the largest number of experts any rank sends or receives over the network: it
starts from a round-robin split and moves deliveries between holders along improving paths
(load-balancing "semi-matching") until the largest send count is no larger than the largest
receive count or provably minimal. ``sender_policy="vllm"`` is vLLM's rule (holders sorted,
receivers split evenly among them in order), kept for comparison. With ``ranks_per_node``
a holder on the receiver's node is preferred whenever one exists, then senders are balanced;
a delivery leaves its node despite a same-node holder only on layers where same-node senders
alone cannot reach the best bottleneck, so nodes never cost bottleneck.

Rounds. ``rounds=True`` also splits each layer's network transfers into exchange rounds in
which every rank sends to at most one peer and receives from at most one peer
(:attr:`LayerPlan.rounds`); the transfer runs them with
``rearrange_expert_weights_inplace(..., rounds=True|"pair"|"expert")``.

Wire order: the rows that rank ``s`` sends to rank ``d`` are ordered by destination slot, and
``d`` unpacks them in the same order, so one contiguous buffer per peer carries them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .maps import ExpertMap, ExpertMaps, RankMapping, as_map_array, normalize_maps

__all__ = [
    "SENDER_POLICIES",
    "LayerPlan",
    "RankPlan",
    "ROUND_KINDS",
    "RearrangementPlan",
    "network_rounds",
    "rank_views",
    "normalize_elastic_maps",
    "plan_from_maps",
    "plan_layer",
    "plan_rearrangement",
    "with_rounds",
]

logger = logging.getLogger(__name__)

SENDER_POLICIES = ("balanced", "vllm")

_DENSE_LOOKUP_CELLS = 1 << 23  # layers x experts x ranks up to which holder look-ups use a dense table


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

    ``rounds`` (only when planned with ``rounds=...``, else ``None``): a list of ascending
    arrays of *network* delivery indices; every network delivery is in exactly one round, and
    in a round every rank sends to at most one peer and receives from at most one peer. With
    ``"pair"`` rounds all deliveries of one (sender, receiver) pair share a round, so a round
    moves whole per-peer buffers; with ``"expert"`` rounds a round moves one row per rank
    (a one-row slice of the per-peer buffer). See :func:`network_rounds`. Rounds are an
    exchange schedule *inside* one staging pass: pack every send
    first, exchange round after round, unpack after the last (``restrict(round)`` gives the
    per-rank peers and rows of one round, :meth:`round_peers` the peers only,
    :meth:`round_slices` the buffer slices). Running a round as a separate read-then-write
    pass would ignore the ordering that :mod:`eplb_triton.schedule` enforces between a row's
    readers and its writer. ``rearrange_expert_weights_inplace(..., rounds=...)`` runs them
    this way inside each staging pass.
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
    rounds: list[np.ndarray] | None = None
    _rank_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_deliveries(self) -> int:
        return int(self.src_slot.size)

    @property
    def num_network(self) -> int:
        return int(self.is_network.sum())

    @property
    def network_sends(self) -> np.ndarray:
        """``(ep_size,)`` experts each rank sends over the network."""
        return self.traffic.sum(axis=1) - np.diag(self.traffic)

    @property
    def network_receives(self) -> np.ndarray:
        """``(ep_size,)`` experts each rank receives over the network."""
        return self.traffic.sum(axis=0) - np.diag(self.traffic)

    def max_rank_load(self) -> int:
        """Largest number of experts any rank sends or receives over the network."""
        return int(max(self.network_sends.max(initial=0), self.network_receives.max(initial=0)))

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

    def round_peers(self, rank: int) -> list[tuple[int, int]]:
        """``(send_peer, recv_peer)`` of ``rank`` in each of :attr:`rounds` (-1 = none)."""
        if self.rounds is None:
            raise ValueError("this plan has no rounds; plan with rounds=True")
        n = self.num_local
        out = []
        for deliveries in self.rounds:
            src_rank, dst_rank = self.src_slot[deliveries] // n, self.dst_slot[deliveries] // n
            send_to = dst_rank[src_rank == rank]
            recv_from = src_rank[dst_rank == rank]
            out.append((int(send_to[0]) if send_to.size else -1, int(recv_from[0]) if recv_from.size else -1))
        return out

    def round_slices(self, rank: int) -> list[tuple[int, np.ndarray, int, np.ndarray]]:
        """What ``rank`` exchanges in each of :attr:`rounds`, for running them in a transfer.

        One ``(send_peer, send_positions, recv_peer, recv_positions)`` per round (peer -1 and
        empty positions when idle): the positions index the rows of
        ``rank(rank).send_rows[send_peer]`` / ``recv_rows[recv_peer]``, i.e. the experts'
        places in the per-peer packed buffers, so a round sends and receives those slices of
        buffers packed once for the whole layer (whole buffers for ``"pair"`` rounds).
        """
        if self.rounds is None:
            raise ValueError("this plan has no rounds; plan with rounds=True")
        n = self.num_local
        k = self.num_network
        src_rank, dst_rank = self.src_slot[:k] // n, self.dst_slot[:k] // n
        pair = src_rank * self.ep_size + dst_rank
        block_start = np.searchsorted(pair, pair)  # network deliveries are grouped by pair
        position = np.arange(k) - block_start
        out = []
        for deliveries in self.rounds:
            sends = deliveries[src_rank[deliveries] == rank]
            recvs = deliveries[dst_rank[deliveries] == rank]
            out.append(
                (
                    int(dst_rank[sends[0]]) if sends.size else -1,
                    position[sends],
                    int(src_rank[recvs[0]]) if recvs.size else -1,
                    position[recvs],
                )
            )
        return out

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


@dataclass(frozen=True)
class StackedDeliveries:
    """Several layers' deliveries as one set of arrays, for numpy work on all layers at once:
    ``layer_of[k]`` is delivery ``k``'s layer (index into the given layers), ``first[i]`` where
    layer ``i``'s deliveries start (and the end)."""

    layer_of: np.ndarray
    first: np.ndarray
    src_slot: np.ndarray
    dst_slot: np.ndarray
    is_network: np.ndarray


def stack_deliveries(layers: Sequence[LayerPlan]) -> StackedDeliveries:
    """:class:`StackedDeliveries` of ``layers`` (of one plan: same ``ep_size`` and ``num_local``)."""
    if any(layer.num_local != layers[0].num_local or layer.ep_size != layers[0].ep_size for layer in layers):
        raise ValueError("layers of one plan needed (same ep_size and num_local)")
    count = np.array([layer.num_deliveries for layer in layers], dtype=np.int64)
    return StackedDeliveries(
        layer_of=np.repeat(np.arange(len(layers)), count),
        first=_offsets(count),
        src_slot=np.concatenate([layer.src_slot for layer in layers]),
        dst_slot=np.concatenate([layer.dst_slot for layer in layers]),
        is_network=np.concatenate([layer.is_network for layer in layers]),
    )


def sends_one_run(layers: Sequence[LayerPlan]) -> np.ndarray:
    """Per layer: whether it moves anything over the network and every sender's rows for each
    receiver, in wire order, are one run of consecutive ascending rows (``row, row + 1, ...``),
    so each tensor's part of every message is one contiguous slice of its rows. The same on every
    rank (the global plan); one numpy pass over all the layers."""
    if not layers:
        return np.zeros(0, dtype=bool)
    stacked = stack_deliveries(layers)
    net = stacked.is_network
    n, ep = layers[0].num_local, layers[0].ep_size
    layer = stacked.layer_of[net]
    src = stacked.src_slot[net]
    key = (layer * ep + src // n) * ep + stacked.dst_slot[net] // n  # one block per (layer, sender, receiver)
    breaks = (key[1:] == key[:-1]) & (src[1:] - src[:-1] != 1)  # within a block, not the next row
    broken = np.bincount(layer[1:][breaks], minlength=len(layers)).astype(bool)
    moves = np.bincount(layer, minlength=len(layers)).astype(bool)
    return moves & ~broken


def rank_views(layers: Sequence[LayerPlan], rank: int) -> list[RankPlan]:
    """:meth:`LayerPlan.rank` of every layer (cached on each), with the numpy work done for all
    layers at once (:func:`grouped_rank_views`, one layer per group): one layer's view alone is
    ~15 numpy calls whatever its size (~50 us of host time per layer on the H200 hosts, a tenth of
    a layer's transfer). The layers share ``ep_size`` and ``num_local`` (one
    :class:`RearrangementPlan`)."""
    todo = [layer for layer in layers if rank not in layer._rank_cache]
    if len(todo) > 1:
        for layer, view in zip(todo, grouped_rank_views(todo, rank, [[i] for i in range(len(todo))])):
            layer._rank_cache[rank] = view
    return [layer.rank(rank) for layer in layers]


def grouped_rank_views(layers: Sequence[LayerPlan], rank: int, groups: Sequence[Sequence[int]]) -> list[RankPlan]:
    """This rank's plan of each group of ``layers`` (indices; one plan: same ``ep_size`` and
    ``num_local``) as one plan whose rows are numbered across the group (``s * num_local + row``
    for its ``s``-th layer: a stack, :mod:`eplb_triton.stacked`), for all groups in one numpy pass
    (~15 numpy calls, whatever the count). A group of one layer is :meth:`LayerPlan.rank`.

    Each peer's rows are its rows of the group's first layer, then of its second...: in each
    layer the plan's wire order, so a sender's ``send_rows[q]`` and receiver ``q``'s
    ``recv_rows[sender]`` list the same experts in the same order."""
    chosen = [layers[i] for group in groups for i in group]
    if not chosen:
        return []
    n = chosen[0].num_local
    if not 0 <= rank < chosen[0].ep_size:
        raise ValueError(f"rank {rank} out of range for ep_size {chosen[0].ep_size}")
    stacked = stack_deliveries(chosen)
    dup_count = np.array([layer.dup_dst_slot.size for layer in chosen])
    dup_layer = np.repeat(np.arange(len(chosen)), dup_count)
    several = len(groups) < len(chosen)  # else one layer per group: no renumbering (rank_views)
    if several:
        sizes = np.array([len(group) for group in groups], dtype=np.int64)
        group_of = np.repeat(np.arange(len(groups)), sizes)  # per chosen layer
        offset = (np.arange(sizes.sum()) - np.repeat(_offsets(sizes)[:-1], sizes)) * n  # where its rows start
        group, shift = group_of[stacked.layer_of], offset[stacked.layer_of]
        dup_group, dup_shift = group_of[dup_layer], offset[dup_layer]
    else:
        group, shift, dup_group, dup_shift = stacked.layer_of, 0, dup_layer, 0
    src, dst, net = stacked.src_slot, stacked.dst_slot, stacked.is_network
    src_rank, dst_rank = src // n, dst // n
    # dup fills: the row a fill copies is its delivery's destination (delivery index + layer start)
    dup_dst = np.concatenate([layer.dup_dst_slot for layer in chosen])
    dup_of = np.concatenate([layer.dup_delivery + stacked.first[i] for i, layer in enumerate(chosen)])

    def per_group(mask, key, peer, *arrays):
        """``arrays[mask]`` cut by group, ordered by (group, peer) keeping the plan's order within."""
        order = mask
        if peer is not None and several:  # a one-layer group is in peer order already
            order = np.flatnonzero(mask)
            order = order[np.lexsort((peer[order], key[order]))]  # stable: layer order kept per peer
        bounds = _offsets(np.bincount(key[order], minlength=len(groups))).tolist()
        picked = [a[order] for a in ((peer,) if peer is not None else ()) + arrays]
        return [[a[bounds[k] : bounds[k + 1]] for a in picked] for k in range(len(groups))]

    src_row, dst_row = src % n + shift, dst % n + shift  # rows of the group
    into_rank = dst_rank == rank
    sends = per_group(net & (src_rank == rank), group, dst_rank, src_row)
    recvs = per_group(net & into_rank, group, src_rank, dst_row)
    local = per_group(~net & into_rank, group, None, src_row, dst_row)
    dups = per_group(dup_dst // n == rank, dup_group, None, dst_row[dup_of], dup_dst % n + dup_shift)
    return [
        RankPlan(
            rank=rank,
            send_rows=_split_by_peer(*sends[k]),
            recv_rows=_split_by_peer(*recvs[k]),
            local_src_rows=local[k][0],
            local_dst_rows=local[k][1],
            dup_src_rows=dups[k][0],
            dup_dst_rows=dups[k][1],
        )
        for k in range(len(groups))
    ]


def _split_by_peer(peer: np.ndarray, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Group ``rows`` by ``peer`` keeping order (peers arrive sorted)."""
    if peer.size == 0:
        return {}
    if peer[0] == peer[-1]:  # one peer (sorted: all equal), as at world 2
        return {int(peer[0]): rows.astype(np.int64, copy=False)}
    starts = np.flatnonzero(_run_starts(peer))  # sorted peers: runs, no np.unique sort
    bounds = np.append(starts[1:], peer.size)
    rows = rows.astype(np.int64, copy=False)
    return {p: rows[s:e] for p, s, e in zip(peer[starts].tolist(), starts.tolist(), bounds.tolist())}


@dataclass(frozen=True)
class RearrangementPlan:
    """Plans of all layers. ``layers[l]`` is a :class:`LayerPlan`.

    ``maps`` are the maps the plan was made from, in the coordinates of the transfer group
    (with a ``rank_mapping`` these are the expanded maps, see :func:`normalize_elastic_maps`).
    """

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

    @property
    def bottlenecks(self) -> np.ndarray:
        """``(num_layers,)`` largest network send or receive count of any rank, per layer."""
        return np.array([layer.max_rank_load() for layer in self.layers], dtype=np.int64)


# ----------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------


def plan_rearrangement(
    old_global_expert_indices: ExpertMap,
    new_global_expert_indices: ExpertMap,
    ep_size: int,
    *,
    sender_policy: str = "balanced",
    ranks_per_node: int | None = None,
    rounds: bool | str = False,
    rank_mapping: RankMapping | None = None,
) -> RearrangementPlan:
    """Plan the rearrangement of every layer from the global old and new maps.

    Args:
        old_global_expert_indices: torch tensor or numpy array of integer expert ids, shape
            ``(num_layers, num_physical)`` or ``(num_physical,)``; ``-1`` = empty slot.
        new_global_expert_indices: same shape (or, with ``rank_mapping``, the new EP size's
            slot count); every id it names must be held by some old slot of the same layer.
        ep_size: number of ranks of the transfer group; ``num_physical`` must be a multiple
            of it. With ``rank_mapping`` it is the larger of the old and new EP sizes.
        sender_policy: ``"balanced"`` (minimise the layer bottleneck) or ``"vllm"``
            (vLLM's rule, for comparison).
        ranks_per_node: ranks per node (must divide ``ep_size``); a sender on the
            receiver's node is preferred, then senders are balanced (never at the cost of
            the layer bottleneck). Balanced policy only.
        rounds: also split each layer's network transfers into rounds where every rank
            sends to at most one peer and receives from at most one (``layer.rounds``):
            ``True`` or ``"pair"`` (whole per-peer buffers per round, fewest rounds) or
            ``"expert"`` (one expert per rank and round; total length = bottleneck). See
            :func:`network_rounds`.
        rank_mapping: elastic EP, old rank -> new rank (``-1`` = removed), a sequence of
            length old EP size or a dict over every old rank. Scale-down plans on the old
            (larger) group where removed ranks only send; scale-up on the new group where
            new ranks only receive. See :func:`normalize_elastic_maps`.

    Returns:
        A :class:`RearrangementPlan`; ``plan.layers[l].rank(r)`` is rank ``r``'s view.

    Raises:
        TypeError, ValueError: on malformed maps or options (same verdict on every rank).
    """
    if rank_mapping is None:
        maps = normalize_maps(old_global_expert_indices, new_global_expert_indices, ep_size)
    else:
        maps = normalize_elastic_maps(old_global_expert_indices, new_global_expert_indices, ep_size, rank_mapping)
    return plan_from_maps(maps, sender_policy=sender_policy, ranks_per_node=ranks_per_node, rounds=rounds)


def plan_from_maps(
    maps: ExpertMaps,
    *,
    sender_policy: str = "balanced",
    ranks_per_node: int | None = None,
    rounds: bool | str = False,
) -> RearrangementPlan:
    """Plan already validated maps (see :func:`plan_rearrangement` for the options)."""
    _check_options(maps.ep_size, sender_policy, ranks_per_node, rounds)
    # Layers are planned independently: in runs of at most _PLAN_SLOTS slots (layers x physical)
    # the numpy temporaries stay small. 48 layers of 256 slots took 2.2 ms in one run and 1.1 ms
    # in runs of 32 layers on a 2-core CPU (above ~100 KB per array every op paid ~100 us more:
    # the allocator returns freed memory to the OS and the next array faults it back in).
    step = max(1, _PLAN_SLOTS // max(maps.num_physical, 1))
    layers: list[LayerPlan] = []
    for first in range(0, maps.old.shape[0], step):
        layers += _plan_all(
            maps.old[first : first + step], maps.new[first : first + step], maps.ep_size, sender_policy, ranks_per_node, rounds
        )
    return RearrangementPlan(layers=layers, maps=maps)


_PLAN_SLOTS = 8192  # slots (layers x physical) planned in one vectorised run (see plan_from_maps)


def plan_layer(
    old: np.ndarray,
    new: np.ndarray,
    ep_size: int,
    *,
    sender_policy: str = "balanced",
    ranks_per_node: int | None = None,
    rounds: bool | str = False,
) -> LayerPlan:
    """Plan one layer from validated 1-D int64 maps (see :func:`plan_rearrangement`)."""
    _check_options(ep_size, sender_policy, ranks_per_node, rounds)
    old2 = np.asarray(old, dtype=np.int64).reshape(1, -1)
    new2 = np.asarray(new, dtype=np.int64).reshape(1, -1)
    return _plan_all(old2, new2, ep_size, sender_policy, ranks_per_node, rounds)[0]


def _check_options(ep_size: int, sender_policy: str, ranks_per_node: int | None, rounds=False) -> None:
    if not (isinstance(rounds, bool) or rounds in ROUND_KINDS):
        raise ValueError(f"rounds must be a bool or one of {ROUND_KINDS}, got {rounds!r}")
    if sender_policy not in SENDER_POLICIES:
        raise ValueError(f"sender_policy must be one of {SENDER_POLICIES}, got {sender_policy!r}")
    if ranks_per_node is not None:
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, (int, np.integer)):
            raise TypeError(f"ranks_per_node must be an int or None, got {type(ranks_per_node).__name__}")
        if ranks_per_node < 1 or ep_size % ranks_per_node != 0:
            raise ValueError(f"ranks_per_node={ranks_per_node} must be a positive divisor of ep_size={ep_size}")
        if sender_policy != "balanced":
            raise ValueError("ranks_per_node needs sender_policy='balanced' (vLLM's rule ignores nodes)")


# ----------------------------------------------------------------------------------------
# Elastic EP: maps of different EP sizes, expanded to the transfer group
# ----------------------------------------------------------------------------------------


def _as_rank_mapping(rank_mapping) -> np.ndarray:
    if isinstance(rank_mapping, Mapping):
        keys = sorted(rank_mapping)
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in keys):
            raise TypeError("rank_mapping keys must be int old ranks")
        if keys != list(range(len(keys))):
            raise ValueError(f"rank_mapping must name every old rank 0..{len(keys) - 1} exactly once, got keys {keys}")
        values = [rank_mapping[k] for k in keys]
    elif isinstance(rank_mapping, (Sequence, np.ndarray)) and not isinstance(rank_mapping, (str, bytes)):
        values = list(np.asarray(rank_mapping).reshape(-1)) if isinstance(rank_mapping, np.ndarray) else list(rank_mapping)
    else:
        try:  # a torch tensor
            values = list(rank_mapping.tolist())
        except AttributeError:
            raise TypeError(f"rank_mapping must be a dict or a sequence of ints, got {type(rank_mapping).__name__}") from None
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise TypeError("rank_mapping values must be ints (new rank, or -1 for a removed rank)")
    mapping = np.asarray(values, dtype=np.int64).reshape(-1)
    if mapping.size == 0:
        raise ValueError("rank_mapping is empty")
    return mapping


def normalize_elastic_maps(
    old_global_expert_indices: ExpertMap, new_global_expert_indices: ExpertMap, ep_size: int, rank_mapping: RankMapping
) -> ExpertMaps:
    """Validate maps of different EP sizes and express both in the transfer group's ranks.

    ``rank_mapping[r]`` is the new rank of old rank ``r`` (``-1``: removed). The old map has
    ``old_ep * num_local`` slots (``old_ep = len(rank_mapping)``), the new map
    ``new_ep * num_local``; ``num_local`` is the same before and after.

    * Scale-down / relabel (``new_ep <= old_ep``): the group is the old one; process ``r``
      becomes new rank ``rank_mapping[r]``, so its new rows are new rank
      ``rank_mapping[r]``'s; a removed rank's new rows are empty, so it only sends. Every new
      rank must be the image of exactly one old rank.
    * Scale-up (``new_ep > old_ep``): the group is the new one; the process of new rank
      ``rank_mapping[r]`` holds old rank ``r``'s rows; new ranks hold nothing, so they only
      receive. No old rank may be removed (it would not be in the group).

    ``ep_size`` must be the group size, ``max(old_ep, new_ep)``. Returns the expanded maps,
    both ``(num_layers, ep_size * num_local)``.
    """
    if isinstance(ep_size, bool) or not isinstance(ep_size, (int, np.integer)):
        raise TypeError(f"ep_size must be an int, got {type(ep_size).__name__}")
    mapping = _as_rank_mapping(rank_mapping)
    old = as_map_array(old_global_expert_indices, "old_global_expert_indices")
    new = as_map_array(new_global_expert_indices, "new_global_expert_indices")
    if old.ndim != new.ndim or (old.ndim == 2 and old.shape[0] != new.shape[0]):
        raise ValueError(f"old and new maps must have the same number of layers: {tuple(old.shape)} vs {tuple(new.shape)}")
    squeezed = old.ndim == 1
    old2, new2 = (old[None, :], new[None, :]) if squeezed else (old, new)
    old_ep = mapping.size
    if old2.shape[1] == 0 or old2.shape[1] % old_ep:
        raise ValueError(f"old map has {old2.shape[1]} slots, not a positive multiple of len(rank_mapping)={old_ep}")
    num_local = old2.shape[1] // old_ep
    if new2.shape[1] == 0 or new2.shape[1] % num_local:
        raise ValueError(
            f"new map has {new2.shape[1]} slots, not a positive multiple of num_local={num_local} "
            f"(old map: {old2.shape[1]} slots over {old_ep} ranks)"
        )
    new_ep = new2.shape[1] // num_local
    if mapping.min() < -1 or mapping.max() >= new_ep:
        raise ValueError(f"rank_mapping values must be -1 or new ranks in [0, {new_ep}), got {mapping.tolist()}")
    kept = mapping >= 0
    if np.unique(mapping[kept]).size != int(kept.sum()):
        raise ValueError(f"rank_mapping maps two old ranks to the same new rank: {mapping.tolist()}")
    group = max(old_ep, new_ep)
    if ep_size != group:
        raise ValueError(
            f"ep_size={ep_size} must be the transfer group's size max(old_ep={old_ep}, new_ep={new_ep})={group}"
        )
    layers = old2.shape[0]
    if new_ep <= old_ep:
        missing = np.setdiff1d(np.arange(new_ep), mapping[kept])
        if missing.size:
            raise ValueError(f"new ranks {missing.tolist()} are the image of no old rank in rank_mapping (scale-down)")
        expanded = np.full((layers, old_ep, num_local), -1, dtype=np.int64)
        expanded[:, kept] = new2.reshape(layers, new_ep, num_local)[:, mapping[kept]]
        old_g, new_g = old2, expanded.reshape(layers, -1)
    else:
        if not kept.all():
            raise ValueError(
                f"scale-up (old_ep={old_ep} -> new_ep={new_ep}) runs on the new group; old ranks "
                f"{np.flatnonzero(~kept).tolist()} are removed, which needs a scale-down"
            )
        expanded = np.full((layers, new_ep, num_local), -1, dtype=np.int64)
        expanded[:, mapping] = old2.reshape(layers, old_ep, num_local)
        old_g, new_g = expanded.reshape(layers, -1), new2
    if squeezed:
        old_g, new_g = old_g[0], new_g[0]
    return normalize_maps(old_g, new_g, int(group))


# ----------------------------------------------------------------------------------------
# Vectorised planning of all layers at once
# ----------------------------------------------------------------------------------------


def _run_starts(keys: np.ndarray) -> np.ndarray:
    """True where a run of equal ``keys`` starts (the first entry always; ``[True]`` when empty,
    as ``np.r_[True, ...]`` gave: ``np.r_`` cost ~16 us a call, a sixth of a small plan)."""
    return np.concatenate(([True], keys[1:] != keys[:-1]))


def _offsets(counts: np.ndarray) -> np.ndarray:
    """``[0, counts[0], counts[0] + counts[1], ...]``: where each group starts, and the end."""
    return np.concatenate(([0], np.cumsum(counts)))


def compact_ids(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber expert ids densely (order kept, -1 kept) when they are sparse, so tables
    indexed by expert stay small and composite sort keys cannot overflow."""
    top = int(max(old.max(initial=-1), new.max(initial=-1)))
    if top < 4 * old.shape[-1] + 64:
        return old, new
    ids, inverse = np.unique(np.concatenate([old.reshape(-1), new.reshape(-1)]), return_inverse=True)
    dense = inverse - int(ids[0] < 0)  # -1 (if present) stays -1
    return dense[: old.size].reshape(old.shape), dense[old.size :].reshape(new.shape)


def _plan_all(
    old: np.ndarray, new: np.ndarray, ep_size: int, policy: str, ranks_per_node: int | None, rounds: bool
) -> list[LayerPlan]:
    old, new = compact_ids(old, new)  # plans depend on where experts are, not on their ids
    num_layers, num_physical = old.shape
    num_local = num_physical // ep_size
    slots = np.arange(num_physical, dtype=np.int64)
    rank_of = slots // num_local
    num_ids = max(int(max(old.max(initial=-1), new.max(initial=-1))) + 1, 1)
    width = 2 * num_physical

    # Best old source of (layer, expert, rank): prefer a row that keeps its expert (it is
    # never overwritten), then the lowest slot. One sort of a composite key does it.
    hl, hp = np.nonzero(old >= 0)
    he = old[hl, hp]
    unstable = (new[hl, hp] != he).astype(np.int64)
    # kind="stable" (radix/timsort): the keys come layer by layer, often sorted within a layer,
    # where numpy's default sort took ~360 us for 12k keys and the stable one 9-260 us (2-core CPU)
    composite = np.sort(((hl * num_ids + he) * ep_size + rank_of[hp]) * width + hp + num_physical * unstable, kind="stable")
    hkey_all = composite // width
    first = _run_starts(hkey_all) if hkey_all.size else np.zeros(0, dtype=bool)
    hkey = hkey_all[first]  # sorted unique (layer, expert, rank) that an old row holds
    hslot = (composite[first] % width) % num_physical
    hrank = hkey % ep_size

    # Slots that need new content, grouped by (layer, rank, expert): the lowest slot is
    # delivered, the others are duplicate fills.
    cl, cp = np.nonzero((new >= 0) & (new != old))
    need = np.sort(((cl * ep_size + rank_of[cp]) * num_ids + new[cl, cp]) * num_physical + cp, kind="stable")
    need_key, need_slot = need // num_physical, need % num_physical
    is_first = _run_starts(need_key) if need.size else np.zeros(0, dtype=bool)
    group = np.cumsum(is_first) - 1
    d_key = need_key[is_first]
    dst = need_slot[is_first]
    d_layer = d_key // (ep_size * num_ids)
    d_rank = (d_key // num_ids) % ep_size
    d_expert = d_key % num_ids

    # Local if the receiver already holds the expert in an old row. Lookups in the holder
    # table go through a dense index when it is small (faster than binary search).
    own = (d_layer * num_ids + d_expert) * ep_size + d_rank
    cells = num_layers * num_ids * ep_size
    dense = cells <= _DENSE_LOOKUP_CELLS
    if dense:
        row_of = np.full(cells, -1, dtype=np.int64)
        row_of[hkey] = np.arange(hkey.size)
        at = row_of[own]
        local = at >= 0
        per_expert = np.bincount(hkey // ep_size, minlength=num_layers * num_ids)
        first_row = np.cumsum(per_expert) - per_expert
    else:
        at = np.searchsorted(hkey, own)
        at_ok = np.minimum(at, max(hkey.size - 1, 0))
        local = (at < hkey.size) & (hkey[at_ok] == own) if hkey.size else np.zeros(d_key.size, dtype=bool)
    src = np.empty(d_key.size, dtype=np.int64)
    src[local] = hslot[at[local]]
    net = ~local

    net_idx = np.flatnonzero(net)
    if net_idx.size:
        if dense:
            le = d_layer[net_idx] * num_ids + d_expert[net_idx]
            lo, holders = first_row[le], per_expert[le]
        else:
            base = (d_layer[net_idx] * num_ids + d_expert[net_idx]) * ep_size
            lo = np.searchsorted(hkey, base)
            holders = np.searchsorted(hkey, base + ep_size) - lo
        if policy == "vllm":
            chosen = _vllm_choice(own[net_idx], lo, holders)
        elif not (holders > 1).any():  # one holder per expert (no replicas): nothing to choose
            chosen = lo  # what the balancing returns then, without its ~25 numpy calls
        else:
            chosen = _balanced_choice(
                d_layer[net_idx], d_rank[net_idx], own[net_idx], lo, holders, hrank, num_layers, ep_size, ranks_per_node
            )
        src[net_idx] = hslot[chosen]

    # Order per layer: network deliveries by (src_rank, dst_slot) = wire order, then local
    # ones by dst_slot.
    src_rank = rank_of[src]
    order = np.argsort(((d_layer * 2 + local) * ep_size + np.where(net, src_rank, 0)) * num_physical + dst, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    layer_sorted = d_layer[order]
    bounds = _offsets(np.bincount(d_layer, minlength=num_layers))
    src_o, dst_o, net_o = src[order], dst[order], net[order]

    dup_mask = ~is_first
    dup_layer = need_key[dup_mask] // (ep_size * num_ids)
    dup_slot = need_slot[dup_mask]
    dup_global = position[group[dup_mask]]  # ascending by (layer, rank, expert, slot)
    dup_bounds = _offsets(np.bincount(dup_layer, minlength=num_layers))

    route = np.where(new >= 0, slots[None, :], -1)
    route[d_layer[order], dst_o] = src_o
    route[dup_layer, dup_slot] = src_o[dup_global]

    traffic = _traffic_all(layer_sorted, src_o, dst_o, net_o, dup_layer, dup_slot, num_layers, ep_size, num_local)

    layers = []
    for l in range(num_layers):
        a, b = bounds[l], bounds[l + 1]
        da, db = dup_bounds[l], dup_bounds[l + 1]
        plan = LayerPlan(
            ep_size=ep_size,
            num_local=num_local,
            route=route[l],
            traffic=traffic[l],
            src_slot=src_o[a:b],
            dst_slot=dst_o[a:b],
            is_network=net_o[a:b],
            dup_dst_slot=dup_slot[da:db],
            dup_delivery=dup_global[da:db] - a,
        )
        if rounds:
            plan = _with_rounds(plan, "pair" if rounds is True else rounds)
        layers.append(plan)
    return layers


def _traffic(src, dst, net, dup_dst, ep_size: int, num_local: int) -> np.ndarray:
    """Expert copies from rank i to rank j over the network; the diagonal counts local writes."""
    traffic = np.bincount(
        (src[net] // num_local) * ep_size + dst[net] // num_local, minlength=ep_size * ep_size
    ).reshape(ep_size, ep_size)
    local_writes = np.concatenate([dst[~net] // num_local, dup_dst // num_local])
    traffic[np.diag_indices(ep_size)] += np.bincount(local_writes, minlength=ep_size)
    return traffic.astype(np.int64)


def _traffic_all(layer, src, dst, net, dup_layer, dup_slot, num_layers: int, ep_size: int, num_local: int) -> np.ndarray:
    """:func:`_traffic` of every layer at once, ``(num_layers, ep_size, ep_size)``."""
    cells = ep_size * ep_size
    key = layer[net] * cells + (src[net] // num_local) * ep_size + dst[net] // num_local
    diag = np.arange(ep_size) * (ep_size + 1)
    local_key = np.concatenate(
        [layer[~net] * cells + diag[dst[~net] // num_local], dup_layer * cells + diag[dup_slot // num_local]]
    )
    counts = np.bincount(np.concatenate([key, local_key]), minlength=num_layers * cells)
    return counts.reshape(num_layers, ep_size, ep_size).astype(np.int64)


# ----------------------------------------------------------------------------------------
# Sender choice
# ----------------------------------------------------------------------------------------


def _vllm_choice(order_key: np.ndarray, lo: np.ndarray, holders: np.ndarray) -> np.ndarray:
    """Index into the holder table for each network delivery, by vLLM's rule.

    Deliveries of one (layer, expert), ascending receiver, are split evenly among its holders
    (ascending rank): holder ``i`` serves receivers ``[i*q, (i+1)*q)`` with
    ``q = n_receivers // n_holders``; the remainder goes one each to the first holders.
    ``order_key`` sorts deliveries by (layer, expert, receiver); ``lo`` is the first row of
    the delivery's expert in the holder table and ``holders`` its holder count.
    """
    order = np.argsort(order_key, kind="stable")
    grp = lo[order]  # same (layer, expert) <=> same lo
    group_start = np.flatnonzero(_run_starts(grp))
    group_size = np.diff(np.append(group_start, grp.size))
    k = np.arange(grp.size) - np.repeat(group_start, group_size)
    n = np.repeat(group_size, group_size)
    h = holders[order]
    per_holder = n // h
    remainder_start = h * per_holder
    holder_index = np.where(k < remainder_start, k // np.maximum(per_holder, 1), k - remainder_start)
    chosen = np.empty(order.size, dtype=np.int64)
    chosen[order] = grp + holder_index
    return chosen


def _balanced_choice(
    layer: np.ndarray,
    receiver: np.ndarray,
    order_key: np.ndarray,
    lo: np.ndarray,
    holders: np.ndarray,
    hrank: np.ndarray,
    num_layers: int,
    ep_size: int,
    ranks_per_node: int | None,
) -> np.ndarray:
    """Index into the holder table for each network delivery, minimising the bottleneck.

    With ``ranks_per_node``: (1) balance over same-node holders only (all holders where the
    receiver's node has none); (2) find the best bottleneck any choice of holders reaches;
    (3) only on layers where (1) is above it, continue balancing from (1) over all holders,
    preferring same-node moves, until it is reached. So nodes never cost bottleneck, and
    deliveries leave their node only where that is needed.
    """
    count = layer.size
    # Candidate pairs (delivery, holder-table row), grouped by delivery.
    pair_item = np.repeat(np.arange(count), holders)
    starts = np.cumsum(holders) - holders
    pair_row = np.arange(pair_item.size) - np.repeat(starts, holders) + np.repeat(lo, holders)
    pair_rank = hrank[pair_row]

    # Start: round-robin over the candidates in receiver order within each (layer, expert).
    order = np.argsort(order_key, kind="stable")
    grp = lo[order]
    group_start = np.flatnonzero(_run_starts(grp))
    group_size = np.diff(np.append(group_start, grp.size))
    k = np.empty(count, dtype=np.int64)
    k[order] = np.arange(count) - np.repeat(group_start, group_size)

    def round_robin(items: np.ndarray) -> np.ndarray:
        cand = np.bincount(items, minlength=count)
        return np.cumsum(cand) - cand + k % np.maximum(cand, 1)

    target = np.bincount(layer * ep_size + receiver, minlength=num_layers * ep_size).reshape(num_layers, ep_size).max(axis=1)
    full = balance_assignment(layer, pair_item, pair_rank, round_robin(pair_item), target, num_layers, ep_size)
    if ranks_per_node is None:
        return pair_row[full]

    same = pair_rank // ranks_per_node == receiver[pair_item] // ranks_per_node
    any_same = np.bincount(pair_item[same], minlength=count) > 0
    keep = np.flatnonzero(same | ~any_same[pair_item])
    local = balance_assignment(layer, pair_item[keep], pair_rank[keep], round_robin(pair_item[keep]), target, num_layers, ep_size)
    choice = keep[local]
    load = lambda c: np.bincount(layer * ep_size + pair_rank[c], minlength=num_layers * ep_size).reshape(num_layers, ep_size).max(axis=1)  # noqa: E731
    cap = np.maximum(target, load(full))
    if (load(choice) > cap).any():
        choice = balance_assignment(layer, pair_item, pair_rank, choice, cap, num_layers, ep_size, pair_cost=(~same).astype(np.int64))
    return pair_row[choice]


def balance_assignment(
    item_layer: np.ndarray,
    pair_item: np.ndarray,
    pair_rank: np.ndarray,
    choice: np.ndarray,
    target: np.ndarray,
    num_layers: int,
    ep_size: int,
    pair_cost: np.ndarray | None = None,
) -> np.ndarray:
    """Reassign items to candidate ranks until each layer's largest load is <= ``target`` or minimal.

    Items (network deliveries) belong to layers; pair ``k`` says item ``pair_item[k]`` may be
    assigned to rank ``pair_rank[k]`` (pairs grouped by item); ``choice[i]`` is the pair item
    ``i`` uses. A rank's load is the number of items assigned to it. Two vectorised moves,
    over all layers at once:

    * single moves: an item on a rank at the layer's maximum load moves to another candidate
      rank with load <= max - 2 (one move per source and per target rank per step);
    * improving paths: breadth-first search from the maximum-load ranks along "an item on
      ``u`` could go to ``v``" edges to a rank with load <= max - 2; shifting the items along
      the path lowers the source by one and raises the end by one.

    When no improving path leaves a maximum-load rank, the ranks reachable from them hold
    only items whose candidates are all reachable and carry more than ``max - 1`` items per
    rank on average, so no assignment has a smaller maximum: the result is optimal.
    ``pair_cost`` (optional, per pair) breaks ties between moves: cheaper pairs first.
    Deterministic (remaining ties go to the lowest index).
    """
    choice = choice.copy()
    if pair_item.size == 0:
        return choice
    if pair_cost is None:
        pair_cost = np.zeros(pair_item.size, dtype=np.int64)
    load = np.bincount(item_layer * ep_size + pair_rank[choice], minlength=num_layers * ep_size).reshape(num_layers, ep_size)
    pair_layer = item_layer[pair_item]
    cells = num_layers * ep_size
    flat_load = load.reshape(-1)
    budget = 4 * (pair_item.size + 16)
    for _ in range(budget):
        peak = load.max(axis=1)
        active = peak > target
        if not active.any():
            break
        cur_rank = pair_rank[choice[pair_item]]
        here = pair_layer * ep_size + cur_rank
        there = pair_layer * ep_size + pair_rank
        on_peak = active[pair_layer] & (flat_load[here] == peak[pair_layer])

        # Single moves.
        ok = np.flatnonzero(on_peak & (flat_load[there] <= peak[pair_layer] - 2))
        if ok.size:
            pick = ok[np.lexsort((ok, pair_cost[ok], flat_load[there[ok]], here[ok]))]
            pick = pick[_run_starts(here[pick])]  # one per source rank
            pick = pick[np.lexsort((pick, there[pick]))]
            pick = pick[_run_starts(there[pick])]  # one per target rank
            choice[pair_item[pick]] = pick
            flat_load[here[pick]] -= 1
            flat_load[there[pick]] += 1
            continue

        # Improving paths: BFS over ranks, all active layers at once.
        visited = np.zeros(cells, dtype=bool)
        visited[(load == peak[:, None]).reshape(-1) & np.repeat(active, ep_size)] = True
        source = visited.copy()
        frontier = visited.copy()
        parent = np.full(cells, -1, dtype=np.int64)
        found = np.full(num_layers, -1, dtype=np.int64)
        movable = cur_rank != pair_rank
        for _ in range(ep_size):
            edges = np.flatnonzero(movable & frontier[here] & ~visited[there])
            if edges.size == 0:
                break
            edges = edges[np.lexsort((edges, pair_cost[edges], there[edges]))]
            edges = edges[_run_starts(there[edges])]  # first edge per new rank
            reached = there[edges]
            visited[reached] = True
            parent[reached] = edges
            frontier = np.zeros(cells, dtype=bool)
            frontier[reached] = True
            lay = reached // ep_size
            good = (flat_load[reached] <= peak[lay] - 2) & (found[lay] < 0)
            if good.any():
                g = reached[good]
                g = g[np.lexsort((g, flat_load[g], g // ep_size))]
                g = g[_run_starts(g // ep_size)]  # lowest load per layer
                found[g // ep_size] = g
                frontier[reached[np.isin(reached // ep_size, g // ep_size)]] = False
        ends = found[found >= 0]
        if ends.size == 0:
            break  # no improving path anywhere: every active layer is at its optimum
        node = ends.copy()
        moves = []
        alive = np.ones(ends.size, dtype=bool)
        for _ in range(ep_size):
            edge = parent[node[alive]]
            moves.append(edge)
            prev = here[edge]
            node[alive] = prev
            alive[alive] = ~source[prev]
            if not alive.any():
                break
        start = node
        moved = np.concatenate(moves)
        choice[pair_item[moved]] = moved
        flat_load[start] -= 1
        flat_load[ends] += 1
    else:
        logger.warning("sender balancing stopped after %d steps without converging", budget)
    return choice


# ----------------------------------------------------------------------------------------
# Rounds: bipartite edge colouring of the (sender, receiver) pairs
# ----------------------------------------------------------------------------------------


def with_rounds(plan: LayerPlan, kind: str = "pair") -> LayerPlan:
    """``plan`` with :attr:`LayerPlan.rounds` filled in (e.g. for a ``restrict()``-ed sub-plan)."""
    return _with_rounds(plan, kind)


def _with_rounds(plan: LayerPlan, kind: str) -> LayerPlan:
    return LayerPlan(
        ep_size=plan.ep_size,
        num_local=plan.num_local,
        route=plan.route,
        traffic=plan.traffic,
        src_slot=plan.src_slot,
        dst_slot=plan.dst_slot,
        is_network=plan.is_network,
        dup_dst_slot=plan.dup_dst_slot,
        dup_delivery=plan.dup_delivery,
        rounds=network_rounds(plan, kind),
    )


ROUND_KINDS = ("pair", "expert")


def network_rounds(plan: LayerPlan, kind: str = "pair") -> list[np.ndarray]:
    """Split ``plan``'s network deliveries into rounds (see :attr:`LayerPlan.rounds`).

    In every round each rank sends to at most one peer and receives from at most one.

    * ``kind="pair"``: all deliveries of one (sender, receiver) pair share a round, so a
      round moves whole per-peer buffers; as many rounds as the largest number of distinct
      peers of any rank (the minimum, by Konig's theorem). A round lasts as long as its
      largest pair.
    * ``kind="expert"``: every round moves at most one expert per sender and receiver; as
      many rounds as the layer bottleneck (the minimum), so the rounds' total length equals
      the bottleneck, which no schedule beats. A pair's experts go in wire order (its
      ``k``-th round carries position ``k`` of the per-peer buffer).

    A proper edge colouring of the bipartite (multi)graph sender -> receiver gives the
    rounds: edges are coloured heaviest pair first (then by ranks and wire order), each with
    the lowest colour free at both ends, after swapping the two colours along an
    alternating path when no colour is free at both. Rounds are ordered by colour, indices
    ascending; deterministic.
    """
    if kind not in ROUND_KINDS:
        raise ValueError(f"round kind must be one of {ROUND_KINDS}, got {kind!r}")
    n = plan.num_local
    count = plan.num_network  # network deliveries come first, grouped by pair in wire order
    if count == 0:
        return []
    src_rank = plan.src_slot[:count] // n
    dst_rank = plan.dst_slot[:count] // n
    pair = src_rank * plan.ep_size + dst_rank
    starts = np.flatnonzero(_run_starts(pair))
    sizes = np.diff(np.append(starts, count))
    if kind == "pair":
        edge_src, edge_dst = src_rank[starts], dst_rank[starts]
        order = np.lexsort((edge_dst, edge_src, -sizes))
    else:
        edge_src, edge_dst = src_rank, dst_rank
        weight = np.repeat(sizes, sizes)
        order = np.lexsort((np.arange(count), dst_rank, src_rank, -weight))
    colour = _edge_colouring(edge_src.tolist(), edge_dst.tolist(), order.tolist(), plan.ep_size)
    if kind == "pair":
        colour = np.repeat(colour, sizes)  # every delivery takes its pair's colour
    else:
        # The deliveries of one pair are interchangeable (same ends), so hand the pair's
        # colours out in wire order: a pair's experts then travel in buffer order and its
        # last round carries the end of the per-peer buffer (where a checksum trailer sits).
        block = np.repeat(np.arange(starts.size), sizes)
        colour = colour[np.lexsort((colour, block))]
    by_colour = np.argsort(colour, kind="stable")
    bounds = _offsets(np.bincount(colour))
    return [by_colour[a:b].astype(np.int64) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _edge_colouring(src: list[int], dst: list[int], order: list[int], ep_size: int) -> np.ndarray:
    """Proper colouring of bipartite multigraph edges ``src[e] -> dst[e]`` with max-degree colours."""
    degree = max(max(np.bincount(src)), max(np.bincount(dst)))
    at_s = [[-1] * degree for _ in range(ep_size)]  # at_s[u][c]: edge of colour c at sender u
    at_d = [[-1] * degree for _ in range(ep_size)]
    colour = [-1] * len(src)
    colours = range(degree)
    for e in order:
        row_u, row_v = at_s[src[e]], at_d[dst[e]]
        c = next((c for c in colours if row_u[c] < 0 and row_v[c] < 0), -1)
        if c < 0:
            a = next(c for c in colours if row_u[c] < 0)  # free at u, busy at v
            b = next(c for c in colours if row_v[c] < 0)  # free at v, busy at u
            # The a/b alternating path from v never reaches u (bipartite); swapping its
            # colours frees a at v.
            path, at_receiver, node, col = [], True, dst[e], a
            while True:
                edge = (at_d if at_receiver else at_s)[node][col]
                if edge < 0:
                    break
                path.append(edge)
                node = src[edge] if at_receiver else dst[edge]
                at_receiver, col = not at_receiver, (b if col == a else a)
            for edge in path:
                at_s[src[edge]][colour[edge]] = -1
                at_d[dst[edge]][colour[edge]] = -1
            for edge in path:
                colour[edge] = b if colour[edge] == a else a
                at_s[src[edge]][colour[edge]] = edge
                at_d[dst[edge]][colour[edge]] = edge
            c = a
        colour[e] = c
        row_u[c] = e
        row_v[c] = e
    return np.asarray(colour, dtype=np.int64)

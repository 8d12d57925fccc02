"""Transfer: run a layer's plan on this rank, and the blocking whole-model API.

Per layer and round, on one rank::

    staging = [ packed sends, peer by peer | receive buffers, peer by peer | local scratch ]
    pack(send rows)  ->  one irecv + one isend per peer (batch_isend_irecv)
    local moves (copy_rows, reads old rows)  ->  wait  ->  unpack(received)  ->  duplicate fills

Every row a round reads is read before that round writes anything, so a row may be both a
source and a destination. When a layer does not fit in ``max_buffer_bytes`` it runs in
rounds; rounds are ordered so that a row is never overwritten before the last round that
reads its old contents (see :func:`schedule_rounds`).

The building blocks (:func:`prepare_layers`, :class:`RoundWork`) are what the background
worker drives; :func:`rearrange_expert_weights_inplace` is the blocking API.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .comm import Communicator
from .layout import ExpertLayout, check_layer_tensors
from .maps import ExpertMaps, normalize_maps
from .plan import LayerPlan, RankPlan, normalize_elastic_maps, plan_from_maps

__all__ = [
    "LayerWork",
    "RoundWork",
    "TransferStats",
    "prepare_layers",
    "rearrange_expert_weights_inplace",
    "schedule_rounds",
]


@dataclass
class TransferStats:
    """What one rank did during a rearrangement.

    ``bytes_sent[p]`` / ``bytes_received[p]``: packed bytes exchanged with EP peer ``p``.
    ``p2p_ops``: isend + irecv ops issued. ``layer_times_s[l]``: wall time of layer ``l``.
    ``peak_staging_bytes``: the largest staging buffer used at once. ``rounds``: exchange
    rounds over all layers. ``local_copies``: rows written by local moves and duplicate fills.
    """

    rank: int
    ep_size: int
    bytes_sent: np.ndarray
    bytes_received: np.ndarray
    p2p_ops: int = 0
    layer_times_s: list[float] = field(default_factory=list)
    peak_staging_bytes: int = 0
    rounds: int = 0
    local_copies: int = 0

    @classmethod
    def empty(cls, rank: int, ep_size: int) -> "TransferStats":
        zeros = np.zeros(ep_size, dtype=np.int64)
        return cls(rank=rank, ep_size=ep_size, bytes_sent=zeros.copy(), bytes_received=zeros.copy())

    @property
    def total_bytes_sent(self) -> int:
        return int(self.bytes_sent.sum())

    @property
    def total_bytes_received(self) -> int:
        return int(self.bytes_received.sum())

    @property
    def total_time_s(self) -> float:
        return float(sum(self.layer_times_s))


def schedule_rounds(layer: LayerPlan, expert_bytes: int, budget_bytes: int) -> list[np.ndarray]:
    """Split a layer's deliveries into rounds whose staging fits ``budget_bytes`` on every rank.

    A rank's staging in a round is ``expert_bytes`` per row it sends, receives or moves
    locally. Delivery ``u`` reads an old row that delivery ``next(u)`` may overwrite, so
    ``u`` must run no later than ``next(u)``; each delivery reads one row and each row has
    at most one writer, so these constraints form a functional graph: chains run in order,
    and a cycle (e.g. two ranks swapping rows) must share one round. Returns ascending
    delivery indices per round; ``[all]`` when the layer fits at once.

    Raises ValueError when one cycle of moves alone needs more than the budget on some rank.
    """
    count = layer.num_deliveries
    if count == 0:
        return []
    capacity = budget_bytes // expert_bytes
    load = _rank_load(layer, np.arange(count))
    if load.sum(axis=0).max() <= capacity:
        return [np.arange(count)]

    writer = np.full(layer.route.size, -1, dtype=np.int64)
    writer[layer.dst_slot] = np.arange(count)
    writer[layer.dup_dst_slot] = layer.dup_delivery
    nxt = writer[layer.src_slot]
    unit, depth = _functional_graph_order(nxt)
    order = np.lexsort((unit, -depth))
    rounds, current, current_load = [], [], np.zeros(layer.ep_size, dtype=np.int64)
    # Deliveries of one unit (a cycle) are adjacent in `order`; pack whole units greedily.
    boundaries = np.flatnonzero(np.r_[True, unit[order][1:] != unit[order][:-1], True])
    for start, stop in zip(boundaries[:-1], boundaries[1:]):
        members = order[start:stop]
        unit_load = load[members].sum(axis=0)
        if unit_load.max() > capacity:
            raise ValueError(
                f"max_buffer_bytes={budget_bytes} is too small: a cycle of {members.size} moves that must run "
                f"together needs {int(unit_load.max()) * expert_bytes} bytes of staging on one rank"
            )
        if (current_load + unit_load).max() > capacity:
            rounds.append(np.sort(np.concatenate(current)))
            current, current_load = [], np.zeros_like(current_load)
        current.append(members)
        current_load += unit_load
    rounds.append(np.sort(np.concatenate(current)))
    return rounds


def _rank_load(layer: LayerPlan, deliveries: np.ndarray) -> np.ndarray:
    """``(len(deliveries), ep_size)`` staging rows each delivery costs each rank."""
    n = layer.num_local
    load = np.zeros((deliveries.size, layer.ep_size), dtype=np.int64)
    index = np.arange(deliveries.size)
    net = layer.is_network[deliveries]
    np.add.at(load, (index[net], layer.src_slot[deliveries[net]] // n), 1)
    np.add.at(load, (index, layer.dst_slot[deliveries] // n), 1)
    return load


def _functional_graph_order(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a functional graph ``i -> nxt[i]`` (-1 = none): a unit id per node (the smallest
    node of its cycle, or itself) and a depth such that depth[i] > depth[nxt[i]] off cycles."""
    count = nxt.size
    steps = max(1, int(np.ceil(np.log2(count + 1))) + 1)
    # Nodes on cycles: the image of nxt^(2^steps) restricted to nodes that never reach -1.
    ptr = np.where(nxt >= 0, nxt, np.arange(count))
    ends = ~(nxt >= 0)
    reach = ptr.copy()
    for _ in range(steps):
        reach = reach[reach]
    on_cycle = np.zeros(count, dtype=bool)
    lands = ~ends[reach]
    on_cycle[reach[lands]] = True
    label = np.arange(count)
    jump = ptr.copy()
    for _ in range(steps):
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


@dataclass
class RoundWork:
    """One exchange round of one layer on one rank, with its staging slices."""

    view: RankPlan
    expert_bytes: int
    send_peers: list[int]
    send_counts: list[int]
    recv_peers: list[int]
    recv_counts: list[int]
    send_rows: np.ndarray
    recv_rows: np.ndarray

    @classmethod
    def from_view(cls, view: RankPlan, expert_bytes: int) -> "RoundWork":
        send_peers = sorted(view.send_rows)
        recv_peers = sorted(view.recv_rows)
        cat = lambda rows: np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)  # noqa: E731
        return cls(
            view=view,
            expert_bytes=expert_bytes,
            send_peers=send_peers,
            send_counts=[len(view.send_rows[p]) for p in send_peers],
            recv_peers=recv_peers,
            recv_counts=[len(view.recv_rows[p]) for p in recv_peers],
            send_rows=cat([view.send_rows[p] for p in send_peers]),
            recv_rows=cat([view.recv_rows[p] for p in recv_peers]),
        )

    @property
    def staging_bytes(self) -> int:
        rows = self.send_rows.size + self.recv_rows.size + self.view.local_dst_rows.size
        return rows * self.expert_bytes

    def _slices(self, staging: torch.Tensor):
        eb = self.expert_bytes
        sends_end = self.send_rows.size * eb
        recvs_end = sends_end + self.recv_rows.size * eb
        return staging[:sends_end], staging[sends_end:recvs_end], staging[recvs_end : self.staging_bytes]

    @staticmethod
    def _per_peer(buf: torch.Tensor, peers: list[int], counts: list[int], eb: int) -> dict[int, torch.Tensor]:
        out, offset = {}, 0
        for peer, count in zip(peers, counts):
            out[peer] = buf[offset : offset + count * eb]
            offset += count * eb
        return out

    def start(self, layout: ExpertLayout, staging: torch.Tensor, comm: Communicator, backend: str | None) -> list:
        """Pack every peer's rows (one launch) and start the exchange; returns requests."""
        send_buf, recv_buf, _ = self._slices(staging)
        if self.send_rows.size:
            layout.pack(self.send_rows, send_buf, backend=backend)
        sends = self._per_peer(send_buf, self.send_peers, self.send_counts, self.expert_bytes)
        recvs = self._per_peer(recv_buf, self.recv_peers, self.recv_counts, self.expert_bytes)
        return comm.exchange(sends, recvs)

    def apply_local(self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None) -> None:
        """Local moves; they read old rows, so they run before any received row is written."""
        _, _, scratch = self._slices(staging)
        view = self.view
        if view.local_dst_rows.size:
            layout.copy_rows(view.local_src_rows, view.local_dst_rows, backend=backend, scratch=scratch)

    def apply_received(self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None) -> None:
        """Unpack received rows (one launch), then duplicate fills from delivered rows."""
        _, recv_buf, _ = self._slices(staging)
        if self.recv_rows.size:
            layout.unpack(recv_buf, self.recv_rows, backend=backend)
        view = self.view
        if view.dup_dst_rows.size:
            layout.copy_rows(view.dup_src_rows, view.dup_dst_rows, backend=backend)

    def count_into(self, stats: TransferStats, ops: int) -> None:
        eb = self.expert_bytes
        for peer, count in zip(self.send_peers, self.send_counts):
            stats.bytes_sent[peer] += count * eb
        for peer, count in zip(self.recv_peers, self.recv_counts):
            stats.bytes_received[peer] += count * eb
        stats.p2p_ops += ops
        stats.rounds += 1
        stats.local_copies += int(self.view.local_dst_rows.size + self.view.dup_dst_rows.size)


@dataclass
class LayerWork:
    """One layer on one rank: its layout, plan and rounds."""

    index: int
    layout: ExpertLayout
    plan: LayerPlan
    rounds: list[RoundWork]

    @property
    def staging_bytes(self) -> int:
        return max((r.staging_bytes for r in self.rounds), default=0)

    def run(self, staging: torch.Tensor, comm: Communicator, backend: str | None, stats: TransferStats) -> None:
        """Run every round of this layer, blocking until its rows are in place."""
        for work in self.rounds:
            requests = work.start(self.layout, staging, comm, backend)
            work.apply_local(self.layout, staging, backend)
            comm.wait(requests)
            work.apply_received(self.layout, staging, backend)
            work.count_into(stats, len(requests))


def _fingerprint(maps: ExpertMaps, layouts: Sequence[ExpertLayout], budget: int | None) -> int:
    crc = zlib.crc32(maps.old.tobytes())
    crc = zlib.crc32(maps.new.tobytes(), crc)
    sizes = np.array([maps.ep_size, budget or 0] + [b for lay in layouts for b in lay.row_bytes], dtype=np.int64)
    crc = zlib.crc32(sizes.tobytes(), crc)
    return crc


def prepare_layers(
    old_global_expert_indices,
    new_global_expert_indices,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    comm: Communicator,
    max_buffer_bytes: int | None = None,
    rank_mapping=None,
) -> list[LayerWork]:
    """Validate everything, agree with every rank, plan and schedule; touches no weight.

    Raises the same ValueError/TypeError on every rank when any rank's input is bad.
    """
    error, maps, layouts, fingerprint = None, None, [], 0
    try:
        # planner (issue 5): elastic EP maps are expanded to the transfer group's ranks
        if rank_mapping is None:
            maps = normalize_maps(old_global_expert_indices, new_global_expert_indices, comm.world_size)
        else:
            maps = normalize_elastic_maps(old_global_expert_indices, new_global_expert_indices, comm.world_size, rank_mapping)
        layouts = _check_weights(expert_weights, maps)
        _check_backend_device(comm, layouts[0].device)
        if max_buffer_bytes is not None:
            if isinstance(max_buffer_bytes, bool) or not isinstance(max_buffer_bytes, (int, np.integer)):
                raise TypeError(f"max_buffer_bytes must be an int, got {type(max_buffer_bytes).__name__}")
            largest = max(lay.expert_bytes for lay in layouts)
            if max_buffer_bytes < largest:
                raise ValueError(
                    f"max_buffer_bytes={max_buffer_bytes} is smaller than one packed expert ({largest} bytes)"
                )
        fingerprint = _fingerprint(maps, layouts, max_buffer_bytes)
    except (TypeError, ValueError) as exc:
        error = exc
    comm.agree(error, fingerprint)

    plan = plan_from_maps(maps)
    layers = []
    for index, (layout, layer_plan) in enumerate(zip(layouts, plan.layers)):
        budget = max_buffer_bytes if max_buffer_bytes is not None else layout.num_local * layout.expert_bytes
        try:
            rounds = schedule_rounds(layer_plan, layout.expert_bytes, budget)
        except ValueError as exc:
            raise ValueError(f"layer {index}: {exc}") from None
        works = [RoundWork.from_view(layer_plan.restrict(r).rank(comm.rank), layout.expert_bytes) for r in rounds]
        layers.append(LayerWork(index=index, layout=layout, plan=layer_plan, rounds=works))
    return layers


def _check_weights(expert_weights, maps: ExpertMaps) -> list[ExpertLayout]:
    if isinstance(expert_weights, torch.Tensor) or not isinstance(expert_weights, (list, tuple)):
        raise TypeError(
            f"expert_weights must be a list (one entry per layer) of lists of tensors, got {type(expert_weights).__name__}"
        )
    if len(expert_weights) != maps.num_layers:
        raise ValueError(f"expert_weights has {len(expert_weights)} layers but the maps have {maps.num_layers}")
    device = None
    layouts = []
    for index, tensors in enumerate(expert_weights):
        check_layer_tensors(tensors, where=f"layer {index}")
        if tensors[0].shape[0] != maps.num_local:
            raise ValueError(
                f"layer {index}: tensors have {tensors[0].shape[0]} rows but num_physical / ep_size = "
                f"{maps.num_physical} / {maps.ep_size} = {maps.num_local} "
                "(num_physical must equal ep_size * num_local)"
            )
        if device is None:
            device = tensors[0].device
        elif tensors[0].device != device:
            raise ValueError(f"tensors on different devices: layer 0 on {device}, layer {index} on {tensors[0].device}")
        layouts.append(ExpertLayout(tensors))
    return layouts


def _check_backend_device(comm: Communicator, device: torch.device) -> None:
    if comm.world_size > 1 and comm.backend == "gloo" and device.type != "cpu":
        raise ValueError(f"the gloo backend moves CPU tensors; weights are on {device} (use NCCL for GPUs)")
    if comm.world_size > 1 and comm.backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the NCCL backend moves CUDA tensors; weights are on {device} (use gloo for CPU)")


def rearrange_expert_weights_inplace(
    old_global_expert_indices,
    new_global_expert_indices,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    ep_group=None,
    *,
    max_buffer_bytes: int | None = None,
    backend: str | None = None,
    rank_mapping=None,
) -> TransferStats:
    """Rearrange this rank's expert weights in place so every row holds its new expert.

    Args:
        old_global_expert_indices: ``(num_layers, num_physical)`` (or ``(num_physical,)``)
            map of the current placement, torch tensor or numpy array; ``-1`` = empty slot.
        new_global_expert_indices: the target placement, same shape.
        expert_weights: ``expert_weights[layer][i]`` is a tensor ``(num_local, ...)`` of any
            dtype with contiguous rows; all on one device (CPU for gloo, CUDA for NCCL).
        ep_group: the EP process group (default: the world group; none initialised = a
            single rank).
        max_buffer_bytes: staging memory bound per rank (default: one layer's local weights,
            packed); a layer that needs more runs in rounds.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for pack/unpack/copy.
        rank_mapping: elastic EP, old rank -> new rank (``-1`` = removed); the maps then
            have different EP sizes. Scale-down runs on the old (larger) group and removed
            ranks only send; scale-up runs on the new group and new ranks only receive.
            See :func:`eplb_triton.plan.normalize_elastic_maps`.

    Returns:
        This rank's :class:`TransferStats`.

    Raises:
        ValueError, TypeError: bad input, raised on every rank before any weight is touched.
    """
    comm = Communicator.from_group(ep_group)
    layers = prepare_layers(
        old_global_expert_indices, new_global_expert_indices, expert_weights, comm, max_buffer_bytes, rank_mapping=rank_mapping
    )
    stats = TransferStats.empty(comm.rank, comm.world_size)
    if not layers:
        return stats
    device = layers[0].layout.device
    peak = max(layer.staging_bytes for layer in layers)
    staging = torch.empty(peak, dtype=torch.uint8, device=device)
    stats.peak_staging_bytes = peak
    for layer in layers:
        begin = time.perf_counter()
        layer.run(staging, comm, backend, stats)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        stats.layer_times_s.append(time.perf_counter() - begin)
    return stats

"""Transfer: run a layer's plan on this rank, and the blocking whole-model API.

Per layer and round, on one rank::

    staging = [ packed sends, peer by peer | receive buffers, peer by peer | local scratch ]
    pack(send rows)  ->  one irecv + one isend per peer (batch_isend_irecv)
    local moves (copy_rows, reads old rows)  ->  wait  ->  unpack(received)  ->  duplicate fills

Every row a round reads is read before that round writes anything, so a row may be both a
source and a destination. When a layer does not fit in ``max_buffer_bytes`` it runs in
rounds; rounds are ordered so that a row is never overwritten before the last round that
reads its old contents; a cycle of moves too big for one round is broken by stashing one row
(see :mod:`eplb_triton.schedule`).

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
from .schedule import schedule_layer

__all__ = [
    "LayerWork",
    "RoundWork",
    "TransferStats",
    "prepare_layers",
    "rearrange_expert_weights_inplace",
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


@dataclass
class RoundWork:
    """One exchange round of one layer on one rank, with its staging slices.

    Rows listed in the layer's stash are read from the stash, not from the live weights:
    ``stashed_sends`` are positions in ``send_rows`` whose packed expert is copied from stash
    entry ``stashed_send_entries``; local moves from the stash write ``stash_local_dst_rows``
    from entries ``stash_local_entries``.
    """

    view: RankPlan
    expert_bytes: int
    send_peers: list[int]
    send_counts: list[int]
    recv_peers: list[int]
    recv_counts: list[int]
    send_rows: np.ndarray
    recv_rows: np.ndarray
    local_src_rows: np.ndarray
    local_dst_rows: np.ndarray
    stashed_sends: np.ndarray
    stashed_send_entries: np.ndarray
    stash_local_entries: np.ndarray
    stash_local_dst_rows: np.ndarray

    @classmethod
    def from_view(cls, view: RankPlan, expert_bytes: int, stash_rows: np.ndarray | None = None) -> "RoundWork":
        send_peers = sorted(view.send_rows)
        recv_peers = sorted(view.recv_rows)
        cat = lambda rows: np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)  # noqa: E731
        send_rows = cat([view.send_rows[p] for p in send_peers])
        stash_rows = np.zeros(0, dtype=np.int64) if stash_rows is None else stash_rows
        send_stashed = np.isin(send_rows, stash_rows)
        local_stashed = np.isin(view.local_src_rows, stash_rows)
        return cls(
            view=view,
            expert_bytes=expert_bytes,
            send_peers=send_peers,
            send_counts=[len(view.send_rows[p]) for p in send_peers],
            recv_peers=recv_peers,
            recv_counts=[len(view.recv_rows[p]) for p in recv_peers],
            send_rows=send_rows,
            recv_rows=cat([view.recv_rows[p] for p in recv_peers]),
            local_src_rows=view.local_src_rows[~local_stashed],
            local_dst_rows=view.local_dst_rows[~local_stashed],
            stashed_sends=np.flatnonzero(send_stashed),
            stashed_send_entries=np.searchsorted(stash_rows, send_rows[send_stashed]),
            stash_local_entries=np.searchsorted(stash_rows, view.local_src_rows[local_stashed]),
            stash_local_dst_rows=view.local_dst_rows[local_stashed],
        )

    @property
    def staging_bytes(self) -> int:
        rows = self.send_rows.size + self.recv_rows.size + self.local_dst_rows.size
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

    def start(
        self, layout: ExpertLayout, staging: torch.Tensor, comm: Communicator, backend: str | None, stash: torch.Tensor | None = None
    ) -> list:
        """Pack every peer's rows (one launch) and start the exchange; returns requests."""
        send_buf, recv_buf, _ = self._slices(staging)
        if self.send_rows.size:
            layout.pack(self.send_rows, send_buf, backend=backend)
        if self.stashed_sends.size:  # these rows may be overwritten already: send the stashed copy
            eb = self.expert_bytes
            table = send_buf.view(-1, eb)
            table[torch.as_tensor(self.stashed_sends, device=table.device)] = stash.view(-1, eb)[
                torch.as_tensor(self.stashed_send_entries, device=table.device)
            ]
        sends = self._per_peer(send_buf, self.send_peers, self.send_counts, self.expert_bytes)
        recvs = self._per_peer(recv_buf, self.recv_peers, self.recv_counts, self.expert_bytes)
        return comm.exchange(sends, recvs)

    def apply_local(
        self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None, stash: torch.Tensor | None = None
    ) -> None:
        """Local moves; they read old rows, so they run before any received row is written."""
        _, _, scratch = self._slices(staging)
        if self.local_dst_rows.size:
            layout.copy_rows(self.local_src_rows, self.local_dst_rows, backend=backend, scratch=scratch)
        if self.stash_local_dst_rows.size:
            eb = self.expert_bytes
            entries = torch.as_tensor(self.stash_local_entries, device=stash.device)
            layout.unpack(stash.view(-1, eb)[entries].reshape(-1), self.stash_local_dst_rows, backend=backend)

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
    """One layer on one rank: its layout, plan, rounds and the rows it stashes first."""

    index: int
    layout: ExpertLayout
    plan: LayerPlan
    rounds: list[RoundWork]
    stash_rows: np.ndarray

    @property
    def stash_bytes(self) -> int:
        return int(self.stash_rows.size) * self.layout.expert_bytes

    @property
    def staging_bytes(self) -> int:
        """Stash plus the largest round's staging."""
        return self.stash_bytes + max((r.staging_bytes for r in self.rounds), default=0)

    def run(self, staging: torch.Tensor, comm: Communicator, backend: str | None, stats: TransferStats) -> None:
        """Run every round of this layer, blocking until its rows are in place."""
        stash, staging = staging[: self.stash_bytes], staging[self.stash_bytes :]
        if self.stash_rows.size:
            self.layout.pack(self.stash_rows, stash, backend=backend)
        for work in self.rounds:
            requests = work.start(self.layout, staging, comm, backend, stash)
            work.apply_local(self.layout, staging, backend, stash)
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
            schedule = schedule_layer(layer_plan, layout.expert_bytes, budget)
        except ValueError as exc:
            raise ValueError(f"layer {index}: {exc}") from None
        stash_rows = schedule.stash_rows(comm.rank, layer_plan.num_local)
        works = [
            RoundWork.from_view(layer_plan.restrict(r).rank(comm.rank), layout.expert_bytes, stash_rows)
            for r in schedule.rounds
        ]
        layers.append(LayerWork(index=index, layout=layout, plan=layer_plan, rounds=works, stash_rows=stash_rows))
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

"""vLLM drop-ins: the functions vLLM's EPLB calls, with vLLM's signatures, moving the data
with this library (one packed message per peer, Triton pack/unpack on GPUs).

(Over 400 lines: three call forms of three vLLM versions, each documented with the signature it
matches, and their argument adapters.)

Signatures read (for understanding only; no vLLM code is copied) on 2026-11-30 from the
stored sources of vllm-project/vllm:

* ``vllm/distributed/eplb/rebalance_execute.py`` at commit ``009a5c0228250337118b5df4ad57fae98c5a946c``
  (2026, the version with ``migration_scheduler``)::

      rearrange_expert_weights_inplace(old_global_expert_indices, new_global_expert_indices,
          expert_weights, expert_buffer, ep_group, communicator, is_profile=False,
          rank_mapping=None, enable_migration_batching=False) -> None
      transfer_layer(old_layer_indices, new_layer_indices, expert_weights, expert_weights_buffer,
          ep_group, communicator, is_profile=False, cuda_stream=None, rank_mapping=None,
          layer_idx=0, enable_migration_batching=False, migration_batches=None) -> TransferMetadata
      move_from_buffer(expert_weights, expert_weights_buffers, transfer_metadata, new_indices,
          ep_rank) -> None

  ``ep_group`` there is a ``torch.distributed.ProcessGroup`` (``ep_group.size()``,
  ``ep_group.rank()``): ``eplb_state.py``/``async_worker.py`` pass
  ``get_eplb_group().device_group`` (older: ``get_ep_group().device_group``; its tests pass a
  gloo ``cpu_group`` for CPU weights). A vLLM ``GroupCoordinator`` is accepted too: its
  ``device_group`` is used (its ``cpu_group`` when the weights are on the CPU).
* The older call forms, from earlier stored versions of ``rebalance_execute.py``,
  ``eplb_state.py`` and ``tests/distributed/test_eplb_execute.py`` (2025-26):
  ``(old, new, expert_weights, ep_group, is_profile=False, rank_mapping=None)`` (called
  positionally as ``(old, new, model.expert_weights, ep_group, False, rank_mapping)``) and
  ``(old, new, expert_weights, ep_group, communicator, is_profile=False, rank_mapping=None)``.
* ``vllm/distributed/eplb/eplb_communicator.py`` (2026): ``EplbCommunicator`` with
  ``add_send(tensors: list[Tensor], dst_rank, expert_id)``, ``add_recv(tensors, src_rank,
  expert_id)``, ``set_transfer_context(old_indices, layer_idx, perf_context=None)``,
  ``execute()`` (an older version: ``execute(old_indices=None)``; older still: one tensor per
  call, ``add_send(tensor, dst_rank)``), ``set_stream(cuda_stream)``,
  ``needs_profile_buffer_reservation``; the factory
  ``create_eplb_communicator(group_coordinator, backend, expert_weights, expert_buffer, ...)``
  picks ``"torch_nccl"`` (default), ``"torch_gloo"``, ``"pynccl"`` or ``"nixl"`` by name.
* ``vllm/distributed/eplb/async_worker.py`` (2026): per layer, on its own CUDA stream,
  ``transfer_layer(old_layer_indices=..., new_layer_indices=..., expert_weights=...,
  expert_weights_buffer=..., communicator=..., ep_group=..., is_profile=..., cuda_stream=...,
  layer_idx=...)``, then ``cuda_stream.synchronize()``; the main thread later calls
  ``move_from_buffer(expert_weights=..., expert_weights_buffers=..., transfer_metadata=...,
  new_indices=..., ep_rank=...)`` on its stream.

What changes, what does not: vLLM's maps, policy, async hand-off and routing updates are
untouched; only the data movement is replaced. ``communicator`` is accepted and not used by
:func:`rearrange_expert_weights_inplace` and :func:`transfer_layer` (they exchange over
``ep_group`` directly); :class:`PackedEplbCommunicator` is the drop-in for vLLM's own
``move_to_buffer`` when only the wire should change.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..comm import Communicator
from ..layout import ALIGN_BYTES, ExpertLayout, index_tensor
from ..transfer import TransferStats, prepare_layers, reserve, staging_view
from ..transfer import rearrange_expert_weights_inplace as _rearrange
from ._patches import restore
from ._staging import rearrange_in_buffer

__all__ = [
    "COMMUNICATOR_NAME",
    "PackedEplbCommunicator",
    "PackedTransferMetadata",
    "install",
    "move_from_buffer",
    "vllm_plugin",
    "rearrange_expert_weights_inplace",
    "transfer_layer",
    "uninstall",
]

log = logging.getLogger(__name__)

#: The backend name :func:`install` registers :class:`PackedEplbCommunicator` under.
COMMUNICATOR_NAME = "eplb_triton"

_OPTION_NAMES = ("expert_buffer", "ep_group", "communicator", "is_profile", "rank_mapping", "enable_migration_batching")
# Positional names after ``expert_weights`` in each vLLM call form.
_FORM_BUFFER = ("expert_buffer", "ep_group", "communicator", "is_profile", "rank_mapping", "enable_migration_batching")
_FORM_COMMUNICATOR = ("ep_group", "communicator", "is_profile", "rank_mapping")
_FORM_PLAIN = ("ep_group", "is_profile", "rank_mapping")


# ------------------------------------------------------------------------------------------
# Argument handling shared by the entry points
# ------------------------------------------------------------------------------------------


def _is_tensor_list(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(t, torch.Tensor) for t in value)


def _is_communicator(value) -> bool:
    return hasattr(value, "add_send") and hasattr(value, "execute")


def _bind(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map the arguments after ``expert_weights`` to names, whichever vLLM form was used:
    a list of tensors first is ``expert_buffer`` (newest form); otherwise the first is
    ``ep_group`` and the second is a communicator (2026 form) or ``is_profile`` (2025 form)."""
    for key in kwargs:
        if key not in _OPTION_NAMES:
            raise TypeError(f"rearrange_expert_weights_inplace() got an unexpected keyword argument {key!r}")
    if args and _is_tensor_list(args[0]) or (not args and "expert_buffer" in kwargs):
        names = _FORM_BUFFER
    elif len(args) > 1 and (_is_communicator(args[1]) or args[1] is None) or (len(args) <= 1 and "communicator" in kwargs):
        names = _FORM_COMMUNICATOR
    else:
        names = _FORM_PLAIN
    if len(args) > len(names):
        raise TypeError(
            f"rearrange_expert_weights_inplace() takes at most {3 + len(names)} positional arguments in the form "
            f"(old, new, expert_weights, {', '.join(names)}), got {3 + len(args)}"
        )
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in bound:
            raise TypeError(f"rearrange_expert_weights_inplace() got multiple values for argument {key!r}")
        bound[key] = value
    return bound


def _as_layers(expert_weights) -> list[list[torch.Tensor]]:
    """vLLM's ``expert_weights`` is a sequence (layers) of iterables (tensors)."""
    if isinstance(expert_weights, torch.Tensor) or not hasattr(expert_weights, "__iter__"):
        raise TypeError(f"expert_weights must be a sequence of per-layer tensor lists, got {type(expert_weights).__name__}")
    return [list(layer) if not isinstance(layer, torch.Tensor) else layer for layer in expert_weights]


def _weights_device(layers) -> torch.device:
    try:
        return layers[0][0].device
    except (TypeError, IndexError, AttributeError):
        return torch.device("cpu")  # malformed: the library's validation names the problem


def _process_group(ep_group, device: torch.device):
    """The torch process group behind what vLLM passes: a ProcessGroup as is, a vLLM
    GroupCoordinator by its ``device_group`` (``cpu_group`` for CPU weights)."""
    if ep_group is None or not hasattr(ep_group, "device_group"):
        return ep_group
    if device.type == "cpu" and getattr(ep_group, "cpu_group", None) is not None:
        return ep_group.cpu_group
    return ep_group.device_group


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


# ------------------------------------------------------------------------------------------
# Blocking path
# ------------------------------------------------------------------------------------------


def rearrange_expert_weights_inplace(
    old_global_expert_indices, new_global_expert_indices, expert_weights, *args, **kwargs
) -> TransferStats:
    """vLLM's ``rearrange_expert_weights_inplace``, every call form (positional or keyword):

    * ``(old, new, expert_weights, ep_group, is_profile=False, rank_mapping=None)``
    * ``(old, new, expert_weights, ep_group, communicator, is_profile=False, rank_mapping=None)``
    * ``(old, new, expert_weights, expert_buffer, ep_group, communicator, is_profile=False,
      rank_mapping=None, enable_migration_batching=False)``

    The forms are told apart by type: a list of tensors after ``expert_weights`` is
    ``expert_buffer``; otherwise that argument is ``ep_group`` (a ProcessGroup or a vLLM
    GroupCoordinator) and the next is a communicator (anything with ``add_send``) or
    ``is_profile``.

    * ``expert_buffer`` (vLLM's layer-sized scratch, one tensor per weight tensor): used as
      the staging (its largest contiguous tensor), so no staging memory is allocated; the
      staging budget is that tensor's bytes (layers that need more run in rounds). Layers
      are then not rolled back on failure (``atomic=False``, as in vLLM). If a layer cannot
      be scheduled in it at all (move cycles larger than the buffer), every rank falls back
      to the library's own staging, with a warning. Without a buffer the library's defaults
      apply (its own staging, atomic layers).
    * ``is_profile=True``: nothing moves and no weight is touched. Without ``expert_buffer``
      the staging a real call will use is allocated once (so vLLM's memory profile counts
      it) and released; every rank then exchanges one byte with every peer, so the NCCL
      point-to-point connections (and their buffers) exist before the profile ends.
    * ``rank_mapping`` (elastic EP, old rank -> new rank): as in vLLM, a mapping as long as
      the group is a scale-down, otherwise a scale-up.
    * ``enable_migration_batching=True``: rounds in which each rank sends to at most one
      peer and receives from at most one (the library's ``rounds="pair"``).
    * ``communicator``: accepted and not used (the data goes over ``ep_group``).

    Returns this rank's :class:`~eplb_triton.TransferStats` (vLLM ignores the return value).
    """
    options = _bind(args, kwargs)
    layers = _as_layers(expert_weights)
    device = _weights_device(layers)
    group = _process_group(options.get("ep_group"), device)
    is_profile = _check_flag("is_profile", options.get("is_profile", False))
    batching = _check_flag("enable_migration_batching", options.get("enable_migration_batching", False))
    buffer = options.get("expert_buffer")
    if buffer is not None:
        buffer = list(buffer)
    if is_profile:
        return _profile(layers, group, buffer)
    call = dict(rank_mapping=options.get("rank_mapping"), rounds="pair" if batching else None)
    if buffer is None:
        return _rearrange(old_global_expert_indices, new_global_expert_indices, layers, group, **call)
    return rearrange_in_buffer(old_global_expert_indices, new_global_expert_indices, layers, group, buffer, **call)


def _profile(layers: list[list[torch.Tensor]], group, buffer) -> TransferStats:
    """Profile run: hold the staging a real call needs for a moment, open every p2p
    connection; touch no weight."""
    comm = Communicator.from_group(group)
    stats = TransferStats.empty(comm.rank, comm.world_size)
    if buffer is None:
        staging = reserve(layers)  # freed on return; the profiler has seen the peak
        stats.peak_staging_bytes = int(staging.numel())
        del staging
    if comm.world_size > 1:
        device = comm.collective_device  # the current GPU for NCCL, else the CPU
        mine = torch.zeros(1, dtype=torch.uint8, device=device)
        peers = [p for p in range(comm.world_size) if p != comm.rank]
        recvs = {p: torch.empty(1, dtype=torch.uint8, device=device) for p in peers}
        comm.wait(comm.exchange(dict.fromkeys(peers, mine), recvs), where="profile warm-up")
        stats.control_ops += 2 * len(peers)
    return stats


# ------------------------------------------------------------------------------------------
# Async path: transfer_layer on the worker's stream, move_from_buffer on the main stream
# ------------------------------------------------------------------------------------------


@dataclass
class PackedTransferMetadata:
    """What :func:`transfer_layer` staged for :func:`move_from_buffer`: ``packed`` holds one
    packed expert per written row, destined for ``rows`` (distinct) of ``layout``'s tensors.

    ``recv_count`` (received experts) mirrors the field of vLLM's ``TransferMetadata``."""

    layer_idx: int
    layout: ExpertLayout | None
    rows: np.ndarray
    packed: torch.Tensor | None
    recv_count: int = 0


# Staging kept per device when the runtime's buffer is too small: allocated once, reused.
_KEPT: dict[torch.device, torch.Tensor] = {}


def _scratch(nbytes: int, device: torch.device, buffer: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """``nbytes`` of staging: in the runtime's buffer when its largest tensor holds them,
    else in a buffer kept by this module (grown when a layer needs more)."""
    if buffer:
        try:
            view = staging_view(list(buffer), device)
        except (TypeError, ValueError):
            view = None
        if view is not None and view.numel() >= nbytes:
            return view[:nbytes]
    kept = _KEPT.get(device)
    if kept is None or kept.numel() < nbytes:
        kept = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        _KEPT[device] = kept
        log.info("eplb_triton: transfer_layer keeps %d bytes of staging on %s", nbytes, device)
    return kept[:nbytes]


def transfer_layer(
    old_layer_indices,
    new_layer_indices,
    expert_weights: Sequence[torch.Tensor],
    expert_weights_buffer: Sequence[torch.Tensor],
    ep_group,
    communicator=None,
    is_profile: bool = False,
    cuda_stream: torch.cuda.Stream | None = None,
    rank_mapping=None,
    layer_idx: int = 0,
    enable_migration_batching: bool = False,
    migration_batches=None,
) -> PackedTransferMetadata:
    """vLLM's ``transfer_layer``: stage one layer's new rows without writing any weight.

    Reads the live weights and writes only staging, on ``cuda_stream`` (vLLM's async
    worker stream; it synchronises that stream afterwards): the local moves and every
    received expert, packed (one isend and one irecv per peer and round over ``ep_group``),
    then duplicates. :func:`move_from_buffer` later writes them into the weights with one
    unpack. The staging lives in ``expert_weights_buffer`` (its largest tensor) when that
    holds the layer's written rows plus one round's sends, else in a buffer this module
    allocates once and keeps.

    ``is_profile=True``: nothing moves; returns metadata that writes nothing.
    ``communicator``, ``enable_migration_batching`` and ``migration_batches`` are accepted
    and not used; vLLM's async worker passes everything by keyword (so an older version
    without ``communicator`` works too). vLLM's early-2025 coroutine form (whole-model maps
    and ``layer=``) is not supported. Collective over ``ep_group``.
    """
    layer = list(expert_weights)
    device = _weights_device([layer])
    group = _process_group(ep_group, device)
    if _check_flag("is_profile", is_profile):
        return PackedTransferMetadata(layer_idx, None, np.zeros(0, dtype=np.int64), None)
    old = torch.as_tensor(old_layer_indices).reshape(1, -1) if old_layer_indices is not None else None
    new = torch.as_tensor(new_layer_indices).reshape(1, -1) if new_layer_indices is not None else None
    comm = Communicator.from_group(group)
    with torch.cuda.stream(cuda_stream) if cuda_stream is not None else contextlib.nullcontext():
        (work,) = prepare_layers(old, new, [layer], comm, rank_mapping=rank_mapping)
        return _stage_layer(work, comm, layer_idx, expert_weights_buffer)


def _peer_major(rows_by_peer: dict[int, np.ndarray], peers: list[int]) -> np.ndarray:
    """A round's rows peer by peer, each peer's in wire order: the layout of one contiguous
    message per peer (independent of how the executor itself orders or splits them)."""
    return np.concatenate([np.asarray(rows_by_peer[p], dtype=np.int64) for p in peers]) if peers else np.zeros(0, np.int64)


def _stage_layer(work, comm: Communicator, layer_idx: int, buffer) -> PackedTransferMetadata:
    layout, eb = work.layout, work.layout.expert_bytes
    view = work.plan.rank(comm.rank)  # the whole layer: local moves and duplicates of all rounds
    rounds = [(r.view, sorted(r.view.send_rows), sorted(r.view.recv_rows)) for r in work.passes]
    recv = [_peer_major(v.recv_rows, peers) for v, _, peers in rounds]
    delivered = np.concatenate(recv + [view.local_dst_rows]).astype(np.int64)
    rows = np.concatenate([delivered, view.dup_dst_rows]).astype(np.int64)
    position = np.full(layout.num_local, -1, dtype=np.int64)
    position[delivered] = np.arange(delivered.size)
    send_bytes = max((sum(len(v.send_rows[p]) for p in peers) * eb for v, peers, _ in rounds), default=0)
    scratch = _scratch(rows.size * eb + send_bytes, layout.device, buffer)
    packed, send_buf = scratch[: rows.size * eb], scratch[rows.size * eb :]
    local_at = sum(r.size for r in recv) * eb
    if view.local_src_rows.size:
        layout.pack(view.local_src_rows, packed[local_at : local_at + view.local_src_rows.size * eb])
    offset = 0
    for number, ((round_view, send_peers, recv_peers), recv_rows) in enumerate(zip(rounds, recv)):
        send_rows = _peer_major(round_view.send_rows, send_peers)
        if send_rows.size:
            layout.pack(send_rows, send_buf[: send_rows.size * eb])
        sends = _slices(send_buf, send_peers, [len(round_view.send_rows[p]) for p in send_peers], eb, 0)
        recvs = _slices(packed, recv_peers, [len(round_view.recv_rows[p]) for p in recv_peers], eb, offset)
        requests = comm.exchange(sends, recvs)
        comm.wait(
            requests,
            labels=Communicator.op_labels(sends, recvs),
            where=f"layer {layer_idx}, round {number + 1}/{len(rounds)}",
        )
        offset += recv_rows.size * eb
    if view.dup_dst_rows.size:  # replicas of a row delivered in this layer: copied inside the staging
        table = packed.view(-1, eb)
        src = index_tensor(position[view.dup_src_rows], packed.device)
        dst = index_tensor(delivered.size + np.arange(view.dup_dst_rows.size), packed.device)
        table[dst] = table[src]
    if rows.size == 0:  # this rank only sent (or did nothing): nothing to write
        return PackedTransferMetadata(layer_idx, layout, rows, None)
    return PackedTransferMetadata(layer_idx, layout, rows, packed, recv_count=int(sum(r.size for r in recv)))


def _slices(buf: torch.Tensor, peers: list[int], counts: list[int], eb: int, start: int) -> dict[int, torch.Tensor]:
    out, offset = {}, start
    for peer, count in zip(peers, counts):
        out[peer] = buf[offset : offset + count * eb]
        offset += count * eb
    return out


def move_from_buffer(
    expert_weights: Sequence[torch.Tensor],
    expert_weights_buffers: Sequence[torch.Tensor],
    transfer_metadata: PackedTransferMetadata,
    new_indices=None,
    ep_rank: int | None = None,
) -> None:
    """vLLM's ``move_from_buffer``: write what :func:`transfer_layer` staged into the
    layer's weights with one unpack on the current stream (vLLM's main stream). Local:
    no communication. ``expert_weights_buffers``, ``new_indices`` and ``ep_rank`` are
    accepted for vLLM's signature; the metadata already says which rows get what."""
    if not isinstance(transfer_metadata, PackedTransferMetadata):
        raise TypeError(
            f"transfer_metadata is a {type(transfer_metadata).__name__}, not eplb_triton's PackedTransferMetadata: "
            "pass what eplb_triton.integrations.vllm.transfer_layer returned (install() replaces both functions)"
        )
    meta = transfer_metadata
    if meta.packed is None or meta.rows.size == 0:
        return
    tensors = list(expert_weights)
    layout = meta.layout
    if [t.data_ptr() for t in tensors] != [t.data_ptr() for t in layout.tensors]:
        layout = ExpertLayout(tensors)  # a different tensor list than at transfer time
        if layout.expert_bytes != meta.layout.expert_bytes:
            raise ValueError("expert_weights differ in row sizes from the tensors transfer_layer staged")
    layout.unpack(meta.packed[: meta.rows.size * layout.expert_bytes], meta.rows)


# ------------------------------------------------------------------------------------------
# Packed EplbCommunicator
# ------------------------------------------------------------------------------------------


def _align(nbytes: int) -> int:
    return (nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


class PackedEplbCommunicator:
    """An ``EplbCommunicator`` that sends one message per peer.

    vLLM's ``move_to_buffer`` calls ``add_send(tensors, dst_rank, expert_id)`` and
    ``add_recv(tensors, src_rank, expert_id)`` once per expert and peer, then ``execute()``.
    This collects them; ``execute()`` packs every tensor queued for a peer into one
    contiguous byte message (in the order they were added, each segment 16-byte aligned),
    issues one ``batch_isend_irecv`` with one isend and one irecv per peer, waits, and copies
    each received segment into its tensor. Both sides queue a peer's experts in the same
    order (vLLM sorts them by expert id), so the result is bit-identical to one send/recv
    per tensor. Ranks are EP-group ranks (translated to global ranks for torch).

    Args:
        ep_group: the EP process group (or a vLLM GroupCoordinator: its ``device_group``).
        cuda_stream: stream of the copies and the exchange (``set_stream`` changes it).

    The pack buffer is allocated at the first ``execute`` and kept (grown when needed).
    """

    def __init__(self, ep_group=None, cuda_stream: torch.cuda.Stream | None = None):
        self._group = ep_group.device_group if hasattr(ep_group, "device_group") else ep_group
        self._comm: Communicator | None = None
        self._cuda_stream = cuda_stream
        self._sends: dict[int, list[torch.Tensor]] = {}
        self._recvs: dict[int, list[torch.Tensor]] = {}
        self._buffer: torch.Tensor | None = None
        self.messages_sent = 0  # per-peer messages, for tests and logs

    # -- vLLM's interface ---------------------------------------------------------------------
    @property
    def needs_profile_buffer_reservation(self) -> bool:
        return True  # the pack buffer grows at the first execute: let vLLM's profile reserve

    def set_stream(self, cuda_stream: torch.cuda.Stream | None) -> None:
        self._cuda_stream = cuda_stream

    def set_transfer_context(self, old_indices=None, layer_idx: int = 0, perf_context=None) -> None:
        """Accepted for vLLM's interface (the packed exchange needs no layer context); the
        perf context is kept where vLLM's base class keeps it."""
        self._perf_context = perf_context

    def add_send(self, tensors, dst_rank: int, expert_id: int | None = None) -> None:
        self._queue(self._sends, tensors, dst_rank, "add_send")

    def add_recv(self, tensors, src_rank: int, expert_id: int | None = None) -> None:
        self._queue(self._recvs, tensors, src_rank, "add_recv")

    def execute(self, old_indices=None) -> None:
        sends, recvs = self._sends, self._recvs
        self._sends, self._recvs = {}, {}
        if not sends and not recvs:
            return
        comm = self._communicator()
        first = next(iter(sends.values() or recvs.values()))[0]
        with torch.cuda.stream(self._cuda_stream) if self._cuda_stream is not None else contextlib.nullcontext():
            send_segs, send_end = self._segments(sends, 0)
            recv_segs, end = self._segments(recvs, send_end)
            buf = self._storage(end, first.device)
            _copy_all([_typed(buf, o, t) for o, t in _flat(send_segs)], [t for _, t in _flat(send_segs)])
            messages = {p: buf[a:b] for p, (a, b, _) in send_segs.items()}
            inbox = {p: buf[a:b] for p, (a, b, _) in recv_segs.items()}
            comm.wait(comm.exchange(messages, inbox), labels=Communicator.op_labels(messages, inbox), where="execute")
            _copy_all([t for _, t in _flat(recv_segs)], [_typed(buf, o, t) for o, t in _flat(recv_segs)])
        self.messages_sent += len(messages)

    # -- internals ----------------------------------------------------------------------------
    def _communicator(self) -> Communicator:
        if self._comm is None:
            self._comm = Communicator.from_group(self._group)
        return self._comm

    def _queue(self, table: dict, tensors, peer: int, what: str) -> None:
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(f"{what}: expected a tensor or a list of tensors")
        comm = self._communicator()
        if isinstance(peer, bool) or not isinstance(peer, (int, np.integer)) or not 0 <= peer < comm.world_size:
            raise ValueError(f"{what}: peer rank must be an int in [0, {comm.world_size}), got {peer!r}")
        if peer == comm.rank:
            raise ValueError(f"{what}: rank {comm.rank} cannot exchange with itself")
        table.setdefault(int(peer), []).extend(tensors)

    @staticmethod
    def _segments(table: dict[int, list[torch.Tensor]], start: int):
        """Per peer (ascending): ``(start, stop, [(offset, tensor), ...])`` in the buffer."""
        out, offset = {}, start
        for peer in sorted(table):
            begin, items = offset, []
            for t in table[peer]:
                items.append((offset, t))
                offset += _align(t.numel() * t.element_size())
            out[peer] = (begin, offset, items)
        return out, offset

    def _storage(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes or self._buffer.device != device:
            self._buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        return self._buffer


def _flat(segments: dict) -> list[tuple[int, torch.Tensor]]:
    return [item for _, (_, _, items) in sorted(segments.items()) for item in items]


def _typed(buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """``like``'s bytes at ``offset`` of ``buf`` as a tensor of its dtype and shape."""
    nbytes = like.numel() * like.element_size()
    return buf[offset : offset + nbytes].view(like.dtype).view(like.shape)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if not dst:
        return
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and dst[0].device.type == "cuda":
        foreach(dst, src)  # multi-tensor copies: few launches for many small rows
        return
    for d, s in zip(dst, src):
        d.copy_(s)


# ------------------------------------------------------------------------------------------
# install / uninstall
# ------------------------------------------------------------------------------------------

_FUNCTIONS = {
    "rearrange_expert_weights_inplace": rearrange_expert_weights_inplace,
    "transfer_layer": transfer_layer,
    "move_from_buffer": move_from_buffer,
}
# vLLM modules that define or import these names (they bind them at import time, so every
# binding is replaced).
_FUNCTION_MODULES = (
    "vllm.distributed.eplb.rebalance_execute",
    "vllm.distributed.eplb.eplb_state",
    "vllm.distributed.eplb.async_worker",
)
_FACTORY_MODULES = ("vllm.distributed.eplb.eplb_communicator", "vllm.distributed.eplb.eplb_state")
_FACTORY = "create_eplb_communicator"

_installed: list[tuple[Any, str, Any]] = []


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _communicator_class(module) -> type:
    """:class:`PackedEplbCommunicator`, made a subclass of vLLM's ``EplbCommunicator`` when
    that base exists, so vLLM's ``isinstance`` checks and the base's helper methods (perf
    counters in newer versions) work; our methods come first."""
    base = getattr(module, "EplbCommunicator", None)
    if not isinstance(base, type) or issubclass(PackedEplbCommunicator, base):
        return PackedEplbCommunicator
    return type("PackedEplbCommunicator", (PackedEplbCommunicator, base), {"__module__": __name__})


def _wrap_factory(original, name: str):
    cls = _communicator_class(_import("vllm.distributed.eplb.eplb_communicator"))

    def create_eplb_communicator(*args, **kwargs):
        backend = kwargs.get("backend", args[1] if len(args) > 1 else None)
        if backend != name:
            return original(*args, **kwargs)
        coordinator = kwargs.get("group_coordinator", args[0] if args else None)
        weights = kwargs.get("expert_weights", args[2] if len(args) > 2 else None)
        sample = weights
        while isinstance(sample, (list, tuple)) and sample:
            sample = sample[0]
        on_cpu = isinstance(sample, torch.Tensor) and sample.device.type == "cpu"
        group = coordinator.cpu_group if on_cpu else coordinator.device_group
        return cls(group)

    create_eplb_communicator.__wrapped__ = original
    return create_eplb_communicator


def install(*, functions: bool = True, communicator_name: str | None = COMMUNICATOR_NAME) -> dict[str, Any]:
    """Point vLLM's EPLB at this module.

    ``functions``: replace ``rearrange_expert_weights_inplace``, ``transfer_layer`` and
    ``move_from_buffer`` wherever vLLM's EPLB modules bind them (they do not use vLLM's
    communicator). ``communicator_name``: wrap vLLM's ``create_eplb_communicator`` so that
    this backend name (vLLM's EPLB ``communicator`` setting) creates a
    :class:`PackedEplbCommunicator`; other names are left to vLLM (``None``: leave the
    factory alone). vLLM's config (2026) only accepts its own names (a ``Literal`` of
    ``torch_nccl``, ``torch_gloo``, ``pynccl``, ``nixl``): to keep vLLM's own transfer
    functions and change only the wire, take one of them over, e.g.
    ``install(functions=False, communicator_name="torch_nccl")``.

    Returns ``{"module.attribute": what it replaced}``. Raises ``ModuleNotFoundError``
    without vLLM, ``RuntimeError`` when already installed or when none of the entry points
    exists in this vLLM version. :func:`uninstall` restores everything.
    """
    if _installed:
        raise RuntimeError("eplb_triton.integrations.vllm is already installed; call uninstall() first")
    importlib.import_module("vllm")  # ModuleNotFoundError names vllm when it is missing
    patches: list[tuple[Any, str, Any]] = []
    if functions:
        for module in filter(None, map(_import, _FUNCTION_MODULES)):
            for attr, ours in _FUNCTIONS.items():
                if hasattr(module, attr):
                    patches.append((module, attr, ours))
    if communicator_name is not None:
        for module in filter(None, map(_import, _FACTORY_MODULES)):
            original = getattr(module, _FACTORY, None)
            if original is not None:
                patches.append((module, _FACTORY, _wrap_factory(original, communicator_name)))
    if not patches:
        raise RuntimeError("found none of vLLM's EPLB entry points to replace in this vLLM version")
    replaced = {}
    for module, attr, new in patches:
        replaced[f"{module.__name__}.{attr}"] = getattr(module, attr)
        _installed.append((module, attr, getattr(module, attr)))
        setattr(module, attr, new)
    log.info("eplb_triton: installed into vLLM: %s", ", ".join(replaced))
    return replaced


#: Environment variable that makes :func:`vllm_plugin` install (``1``/``true``/``yes``).
PLUGIN_ENV = "EPLB_TRITON_VLLM"


def vllm_plugin() -> None:
    """vLLM ``general_plugins`` entry point (declared in this package's metadata): vLLM calls
    it in every process it starts (engine core, workers), possibly several times. It installs
    (once per process) when the environment variable ``EPLB_TRITON_VLLM`` is ``1``; otherwise it
    does nothing, so having this package installed changes nothing by itself."""
    import os

    if os.environ.get(PLUGIN_ENV, "").strip().lower() not in ("1", "true", "yes") or _installed:
        return
    install()


def uninstall() -> list[str]:
    """Restore what :func:`install` replaced; returns the restored names (empty if none)."""
    return restore(_installed)

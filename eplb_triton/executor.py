"""The executor: run a layer's passes on this rank (:meth:`LayerWork.run`), and the blocking loop.

Per layer and pass, on one rank::

    staging = [ packed sends, peer by peer | receive buffers, peer by peer | local scratch ]
    pack(send rows, local sources)  ->  one irecv + one isend per peer (batch_isend_irecv)
    ->  wait (deadline: timeout_s)  ->  verify checksums  ->  write: local moves, received, duplicates

A layer that runs in several passes saves the old contents of what it overwrites (undo
buffer) and is rolled back on failure, so after any failure each layer on each rank is
entirely old or entirely new.

When the budget holds two layers' staging, :func:`run_layers` alternates two slots between
one-pass layers: ``start(i + 1)`` (pack, post) is queued before ``finish(i)`` (wait, write), so
on the GPU the pack of layer i+1 runs while layer i is on the wire::

    compute stream:  pack0 pack1 | wait w0, unpack0, pack2 | wait w1, unpack1, pack3 | ...
    NCCL stream:          w0 ------------> w1 ------------------> w2 ---------------> ...

Pushed p2p passes (:attr:`PassWork.pushed`) run on the caller's stream alone, one device
barrier per layer, and write layer i together with layer i+1's pack (one launch:
:func:`~eplb_triton.layout.move_pair`)::

    caller's stream:  pack0 -> peers | barrier0 | unpack0 + pack1 -> peers | barrier1 | unpack1 + pack2 | ...
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .comm import ChecksumMismatchError, Communicator, PeerError, TransferError
from .inputs import default_budget_bytes
from .layout import ExpertLayout, resolve_backend
from .p2p import acquire_slots as acquire_p2p_slots, resolve_transport
from .passes import PassWork, upload_rows
from .plan import LayerPlan
from .settings import int_setting
from .stats import TransferStats

__all__ = ["LayerWork", "double_staging", "layer_times", "run_layers", "staging_view"]

logger = logging.getLogger("eplb_triton.transfer")  # one logger for the blocking path (documented name)


_transfer_module = None


def _fault_hook():
    """The test hook :data:`eplb_triton.transfer.fault_hook` (its public home; imported once,
    lazily: :mod:`eplb_triton.transfer` imports this module), or None. Read once per layer:
    a lookup per hook point cost ~15 us of host time per layer on the H200 hosts."""
    global _transfer_module
    if _transfer_module is None:
        from . import transfer

        _transfer_module = transfer
    return _transfer_module.fault_hook


@dataclass
class LayerWork:
    """One layer on one rank: its layout, plan, passes and the rows it stashes first.

    ``expert_ids`` (the layer's new map, optional) lets errors name logical experts.
    ``layer_count`` > 1: a stack of the layers ``index, index + 1, ...`` moved by one pass
    (:mod:`eplb_triton.stacked`; its layout numbers the rows across them).
    """

    index: int
    layout: ExpertLayout
    plan: LayerPlan
    passes: list[PassWork]
    stash_rows: np.ndarray
    expert_ids: np.ndarray | None = None
    layer_count: int = 1
    stash_anywhere: bool = False  # some rank stashes rows in this layer (the schedule's, the same everywhere)

    @property
    def stash_bytes(self) -> int:
        return int(self.stash_rows.size) * self.layout.expert_bytes

    @property
    def staging_bytes(self) -> int:
        """Stash plus the largest pass's staging."""
        return self.stash_bytes + max((r.staging_bytes for r in self.passes), default=0)

    @property
    def undo_bytes(self) -> int:
        """Bytes needed to roll this layer back: old contents of the rows written by every
        pass but the last (a single-pass layer needs none)."""
        return sum(r.written_rows.size for r in self.passes[:-1]) * self.layout.expert_bytes

    @property
    def has_network(self) -> bool:
        return self.plan.num_network > 0

    @property
    def overlappable(self) -> bool:
        """One pass of whole batched messages (no ``verify``, no planner rounds) and no stash on
        any rank: :func:`run_layers` may queue its pack and post while the previous layer is on
        the wire (:meth:`start`, :meth:`finish`). The same on every rank (the p2p transport's
        slots rely on it)."""
        return len(self.passes) == 1 and not self.passes[0].framed and not self.stash_rows.size and not self.stash_anywhere

    def expert_at(self, rank: int, row: int) -> int | None:
        if self.expert_ids is None:
            return None
        return int(self.expert_ids[rank * self.layout.num_local + row])

    def run(
        self,
        staging: torch.Tensor,
        comm: Communicator,
        backend: str | None,
        stats: TransferStats,
        *,
        timeout_s: float | None = None,
        undo: torch.Tensor | None = None,
        transport=None,
    ) -> None:
        """Run every pass of this layer, blocking until its rows are in place.

        ``transport``: a :class:`~eplb_triton.p2p.P2PTransport` whose symmetric buffer is
        ``staging`` (peers pull the sends from its offset 0; the stash goes to its end), or
        ``None`` for ``comm``'s own isend/irecv.

        Atomic on this rank: a pass writes rows only after its receives completed (and
        passed ``verify``); when the layer has several passes, the old contents of the rows
        each pass but the last overwrites are saved in ``undo`` (``>= undo_bytes`` bytes;
        ``None`` = no rollback, a failure may leave the layer half-applied). On any failure
        before the last pass is applied, the rows written so far are restored and the
        layer is entirely old again.

        Raises:
            PeerError: a peer failed or missed the deadline (``.layer`` set); rolled back.
            ChecksumMismatchError: received bytes differ from the sender's; every pass's
                exchange still completed (peers are not left waiting) and the layer was
                rolled back, so the group is still usable.
        """
        if transport is None and self.overlappable:
            self.finish(self.start(staging, comm, backend), comm, backend, stats, timeout_s=timeout_s)
            return
        layout, eb = self.layout, self.layout.expert_bytes
        if transport is not None and self.stash_rows.size:  # p2p: the sends stay at offset 0, where peers read them
            cut = staging.numel() - self.stash_bytes
            staging, stash = staging[:cut], staging[cut:]
        elif self.stash_rows.size:
            stash, staging = staging[: self.stash_bytes], staging[self.stash_bytes :]
        else:  # the usual case: nothing overwritten early, nothing to read back
            stash = None
        if self.passes and undo is None and len(self.passes) > 1:
            logger.debug("layer %d runs in %d passes without an undo buffer: not atomic", self.index, len(self.passes))
        saved_rows: list[np.ndarray] = []
        saved_bytes = 0
        committed = False
        mismatch: ChecksumMismatchError | None = None
        last = len(self.passes) - 1

        def rollback() -> None:
            nonlocal saved_bytes
            if saved_rows:
                layout.unpack(undo[:saved_bytes], np.concatenate(saved_rows), backend=backend)
                saved_rows.clear()
                saved_bytes = 0
                stats.rollbacks += 1

        hook = _fault_hook()
        if hook is not None:
            hook("layer_start", rank=comm.rank, layer=self.index)
        if self.stash_rows.size:  # reads only: old contents of rows that cycles overwrite early
            layout.pack(self.stash_rows, stash, backend=backend)
        try:
            for i, work in enumerate(self.passes):
                where = f"layer {self.index}, pass {i + 1}/{len(self.passes)}"
                batches = []
                mover = comm if transport is None else _p2p_mover(transport, work, staging, eb)
                if not work.framed:  # packs and posts batch by batch, then one wait for all
                    if hook is not None:
                        hook("before_send", rank=comm.rank, layer=self.index, pass_index=i)
                    send_buf, recv_buf, scratch = work._slices(staging)
                    try:  # posting fails too when a peer's connection is already closed
                        requests, labels, batches = work.post_batches(
                            layout, send_buf, recv_buf, mover, backend, stash, local_buf=scratch, where=where
                        )
                        if hook is not None:
                            hook("posted", rank=comm.rank, layer=self.index, pass_index=i, network_round=0, ops=labels)
                        mover.wait(requests, timeout_s=timeout_s, labels=labels, where=where)
                    except PeerError as exc:
                        exc.layer = self.index
                        raise
                    exchanges = []
                else:
                    work.pack_local_sources(layout, staging, backend)
                    work.pack_sends(layout, staging, backend, stash)
                    if hook is not None:
                        hook("before_send", rank=comm.rank, layer=self.index, pass_index=i)
                    exchanges = work.exchanges(staging)
                for network_round, (sends, recvs) in enumerate(exchanges):
                    # planner rounds (``rounds=``) run one after the other; nothing is
                    # written until the last one completed
                    at = where if work.network_rounds is None else f"{where}, network round {network_round + 1}/{len(exchanges)}"
                    labels = Communicator.op_labels(sends, recvs)
                    try:  # posting fails too when a peer's connection is already closed
                        requests = mover.exchange(sends, recvs, where=at)
                        if hook is not None:
                            hook("posted", rank=comm.rank, layer=self.index, pass_index=i, network_round=network_round, ops=labels)
                        mover.wait(requests, timeout_s=timeout_s, labels=labels, where=at)
                    except PeerError as exc:
                        exc.layer = self.index
                        raise
                    batches.append(len(labels))
                self.count_pass(work, stats, batches)
                if hook is not None:  # the received views are only made for a hook
                    hook("in_flight", rank=comm.rank, layer=self.index, pass_index=i, received=work.recv_messages(staging))
                if mismatch is None:
                    bad = work.verify_received(staging)
                    stats.verified_experts += int(work.recv_rows.size) if work.verify else 0
                    if bad:
                        mismatch = self._mismatch_error(work, bad, comm.rank, where)
                        rollback()  # keep exchanging: the later passes' peers are waiting for us
                if mismatch is not None:
                    continue
                if undo is not None and i < last:
                    rows = work.written_rows
                    if rows.size:
                        layout.pack(rows, undo[saved_bytes : saved_bytes + rows.size * eb], backend=backend)
                        saved_rows.append(rows)
                        saved_bytes += rows.size * eb
                work.apply(layout, staging, backend, stash)
                work.release()
                committed = i == last
                if hook is not None:
                    hook("pass_applied", rank=comm.rank, layer=self.index, pass_index=i)
        except BaseException:
            if not committed:
                rollback()
            raise
        finally:
            if transport is not None:
                transport.mark_used()
        if mismatch is not None:
            raise mismatch

    def start(
        self, staging: torch.Tensor, comm: Communicator, backend: str | None, transport=None, *, hold_push: bool = False
    ) -> "_Posted":
        """An :attr:`overlappable` layer's first half: pack its sends (and staged local
        sources) into ``staging`` and post its exchange. Reads rows only; nothing waits.
        ``transport``: a :class:`~eplb_triton.p2p.P2PTransport` whose buffer holds ``staging``
        (one of its slots), or ``None`` for ``comm``'s own isend/irecv. ``hold_push``: a pushed
        pass stops before its pack launches (``posted.mover.held``; the caller finishes it with
        :meth:`~eplb_triton.p2p._PassExchange.push_held`)."""
        work, where = self.passes[0], f"layer {self.index}, pass 1/1"
        hook = _fault_hook()
        if hook is not None:
            hook("layer_start", rank=comm.rank, layer=self.index)
            hook("before_send", rank=comm.rank, layer=self.index, pass_index=0)
        send_buf, recv_buf, scratch = work._slices(staging)
        mover = comm if transport is None else _p2p_mover(transport, work, staging, self.layout.expert_bytes)
        if hold_push:
            mover.hold = True
        try:  # posting fails too when a peer's connection is already closed
            requests, labels, batches = work.post_batches(
                self.layout, send_buf, recv_buf, mover, backend, None, local_buf=scratch, where=where
            )
        except PeerError as exc:
            exc.layer = self.index
            raise
        if hook is not None:
            hook("posted", rank=comm.rank, layer=self.index, pass_index=0, network_round=0, ops=labels)
        return _Posted(staging, requests, labels, batches, where, hook, mover, transport)

    def finish(
        self,
        posted: "_Posted",
        comm: Communicator,
        backend: str | None,
        stats: TransferStats,
        *,
        timeout_s: float | None = None,
        waited: bool = False,
        pack_beside: tuple | None = None,
    ) -> bool:
        """The second half of :meth:`start`: wait for the exchange (deadline ``timeout_s``;
        ``waited``: :meth:`wait` did), then write the layer (one pass: nothing to roll back
        before it is written). ``pack_beside``: another layer's pack, launched with this layer's
        receive unpack where that is one launch (:meth:`PassWork.apply`); returns whether it was."""
        work, hook = self.passes[0], posted.hook
        if not waited:
            self.wait(posted, timeout_s=timeout_s)
        self.count_pass(work, stats, posted.batches)
        if hook is not None:  # the received views are only made for a hook
            hook("in_flight", rank=comm.rank, layer=self.index, pass_index=0, received=work.recv_messages(posted.staging))
        paired = work.apply(self.layout, posted.staging, backend, pack_beside=pack_beside)
        work.release()
        if posted.transport is not None and not work.pushed:  # pushed: on the caller's stream (run_layers marks once)
            posted.transport.mark_used()
        if hook is not None:
            hook("pass_applied", rank=comm.rank, layer=self.index, pass_index=0)
        return paired

    def wait(self, posted: "_Posted", *, timeout_s: float | None = None) -> None:
        """Wait for the exchange :meth:`start` posted (deadline ``timeout_s``)."""
        try:
            posted.mover.wait(posted.requests, timeout_s=timeout_s, labels=posted.labels, where=posted.where)
        except PeerError as exc:
            exc.layer = self.index
            raise

    def count_pass(self, work: PassWork, stats: TransferStats, batches: list[int]) -> None:
        """Add one completed pass of this layer (or stack: its one pass) to ``stats`` (both paths)."""
        work.count_into(stats, sum(batches), batches=batches)
        if self.layer_count > 1:
            stats.stacked_layers += self.layer_count

    def _mismatch_error(self, work: PassWork, bad: list[tuple[int, int]], rank: int, where: str) -> ChecksumMismatchError:
        peer, k = bad[0]
        row = int(work.view.recv_rows[peer][k])
        expert = self.expert_at(rank, row)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        message = (
            f"{where}: rank {rank}: checksum mismatch for expert {expert} received from peer {peer} "
            f"(row {row}){more}; layer {self.index} was not applied on rank {rank}"
        )
        logger.error("%s", message)
        return ChecksumMismatchError(message, layer=self.index, peer=peer, expert=expert)


@dataclass
class _Posted:
    """An exchange :meth:`LayerWork.start` posted, for :meth:`LayerWork.finish`."""

    staging: torch.Tensor
    requests: list
    labels: list
    batches: list[int]
    where: str
    hook: object
    mover: object  # what posted it: the Communicator, or a p2p transport's exchange
    transport: object = None  # the p2p transport, if any


#: "0": a pushed layer's unpack and the next layer's pack stay two launches (measuring only)
PAIR_LAUNCH_ENV = "EPLB_TRITON_PAIR_LAUNCH"


def _pack_beside(held) -> tuple | None:
    """A held push (``(layout, [(peer's region, rows)])``, :meth:`~eplb_triton.p2p._PassExchange.push_packed`)
    as :meth:`PassWork.apply`'s ``pack_beside``, when it is one launch (into one peer)."""
    if held is None or len(held[1]) != 1:
        return None
    layout, [(region, rows)] = held
    return layout, region, rows


def _p2p_mover(transport, work: PassWork, staging: torch.Tensor, expert_bytes: int):
    """The p2p exchange of ``work``, whose staging starts at ``staging`` inside the transport's
    buffer (offset 0, or the second slot's: the same on every rank)."""
    offset = staging.data_ptr() - transport.buffer.data_ptr()
    return transport.exchange_for(work.pass_traffic, expert_bytes, verify=work.verify, slot_offset=offset)


def staging_view(staging, device: torch.device) -> torch.Tensor:
    """The bytes of a caller-provided staging buffer as one contiguous 1-D uint8 view.

    ``staging``: one contiguous tensor (any dtype), or a list/tuple of tensors (a runtime's
    per-tensor scratch buffers, e.g. vLLM's ``expert_buffer``): the largest contiguous one is
    used, since the staging must be one block of memory. Nothing is allocated or copied.
    """
    if isinstance(staging, torch.Tensor):
        candidates = [staging]
    elif isinstance(staging, (list, tuple)) and staging and all(isinstance(t, torch.Tensor) for t in staging):
        candidates = list(staging)
    else:
        raise TypeError(f"staging must be a tensor or a non-empty list of tensors, got {type(staging).__name__}")
    usable = [t for t in candidates if t.is_contiguous() and t.device == device and t.numel()]
    if not usable:
        where = ", ".join(f"{tuple(t.shape)} on {t.device}" + ("" if t.is_contiguous() else " (not contiguous)") for t in candidates)
        raise ValueError(f"staging has no non-empty contiguous tensor on the weights' device {device}: {where}")
    largest = max(usable, key=lambda t: t.numel() * t.element_size())
    return largest.reshape(-1).view(torch.uint8)


_TIMING_EVENTS = threading.local()  # per thread: device -> CUDA timing events, reused by each call


def defer_layer_times(stats: TransferStats, read: Callable[[], list[float]]) -> None:
    """Let ``stats.layer_times_s`` be read from this thread's timing events on first access
    (after the device ran them), or by the next :func:`run_layers` of this thread before it
    records those events again, whichever comes first. Reading them at once cost ~0.2 ms per
    48-layer call on the H200 hosts (run 45), after waiting for the device."""
    stats.defer_layer_times(read)
    _TIMING_EVENTS.unread = weakref.ref(stats)


def _read_deferred_times() -> None:
    """Read the times :func:`defer_layer_times` left unread (a dropped stats needs nothing)."""
    ref = getattr(_TIMING_EVENTS, "unread", None)
    if ref is not None:
        _TIMING_EVENTS.unread = None
        stats = ref()
        if stats is not None:
            stats.layer_times_s  # noqa: B018 - the read, before the events are recorded again


def _mark(stream: "torch.cuda.Stream | None", index: int = 0):
    """A point in time on ``stream`` (the ``index``-th timing event of this thread, re-recorded:
    a new event and its record took 19.6 us of host time per layer on two H200,
    bench/results/host-costs-h200x2-run28.log), or on the host clock when ``stream`` is None.
    The caller looks the stream up once: ``torch.cuda.current_stream`` cost ~18 us per layer there."""
    if stream is None:
        return time.perf_counter()
    pools = getattr(_TIMING_EVENTS, "pools", None)
    if pools is None:
        pools = _TIMING_EVENTS.pools = {}
    events = pools.setdefault(stream.device, [])
    while len(events) <= index:
        events.append(torch.cuda.Event(enable_timing=True))
    event = events[index]
    event.record(stream)
    return event


def layer_times(layers: Sequence[LayerWork], marks: list) -> list[float]:
    """Seconds per layer from :func:`run_layers`' marks (one per item of ``layers``; a stack's
    time is shared equally by its layers)."""
    return [t / layer.layer_count for layer, t in zip(layers, _elapsed(marks)) for _ in range(layer.layer_count)]


def _elapsed(marks: list) -> list[float]:
    """Seconds between consecutive :func:`_mark` points (waits for the last CUDA event)."""
    if marks and isinstance(marks[0], torch.cuda.Event):
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    return [b - a for a, b in zip(marks, marks[1:])]


def run_layers(
    layers: Sequence[LayerWork],
    comm: Communicator,
    backend: str | None,
    stats: TransferStats,
    *,
    staging=None,
    atomic: bool = True,
    timeout_s: float | None = None,
    transport: str = "auto",
    max_buffer_bytes: int | None = None,
    first_mark: int = 0,
) -> tuple[list[ChecksumMismatchError], list]:
    """The blocking loop: take the staging (and undo) memory, run every layer in order.

    When the staging budget (``max_buffer_bytes``, the caller's ``staging``, or by default
    one layer's local rows) holds two layers' staging, consecutive :attr:`~LayerWork.overlappable`
    layers alternate between two staging slots: layer ``i + 1`` is packed and posted before
    layer ``i`` is waited for, so its pack runs while layer ``i`` is on the wire and the wire
    never waits for a pack (:func:`double_staging`). With ``transport="p2p"`` the two slots are
    halves of the symmetric buffer, of a size every rank agrees on (:func:`~eplb_triton.p2p.acquire_slots`).

    ``layers`` may hold stacks (:mod:`eplb_triton.stacked`): several layers in one pass.

    Returns this rank's checksum errors (those layers rolled back, their exchanges completed)
    and the time marks between the items of ``layers`` (:func:`layer_times` reads them). A peer
    error stops the loop and is raised with ``.stats``. ``first_mark``: the first of this
    thread's timing events the marks use (a caller running several runs of layers before reading
    any time gives each run its own events).
    """
    device = layers[0].layout.device
    backend = resolve_backend(backend, device)  # once: per launch it read the environment (checked by prepare_layers)
    upload_rows([work for layer in layers for work in layer.passes], device)
    peak = max(layer.staging_bytes for layer in layers)
    given = None if staging is None else staging_view(staging, device)  # validated by prepare_layers
    undo_bytes = max(layer.undo_bytes for layer in layers) if atomic else 0
    p2p = None  # agreed by prepare_layers; the plan (hence has_network) is the same on every rank
    if resolve_transport(transport, comm, device) == "p2p" and any(layer.has_network for layer in layers):
        # two slots only if every rank can have them, of the largest rank's size: a sender's
        # messages must lie at the same offset on every rank (collective)
        wanted = double_staging(layers, peak, undo_bytes, max_buffer_bytes=max_buffer_bytes)
        p2p, slot, count = acquire_p2p_slots(comm, device, peak, 2 if wanted else 1, timeout_s=timeout_s)
        double = count == 2
        staging = p2p.buffer[: 2 * slot] if double else p2p.buffer  # peers read the sends from it
        peak = slot if double else peak
        taken = 0  # the caller's buffer is free for the undo copy
    else:
        double = double_staging(layers, peak, undo_bytes, given=given, max_buffer_bytes=max_buffer_bytes)
        size = 2 * peak if double else peak
        staging = given[:size] if given is not None else torch.empty(size, dtype=torch.uint8, device=device)
        taken = size
    slots = (staging[:peak], staging[peak:]) if double else None
    stats.peak_staging_bytes = max(stats.peak_staging_bytes, staging.numel() if double else peak)
    undo = None
    if undo_bytes:
        if given is not None and given.numel() - taken >= undo_bytes:
            undo = given[taken : taken + undo_bytes]
        else:
            undo = torch.empty(undo_bytes, dtype=torch.uint8, device=device)
    if atomic:
        stats.peak_undo_bytes = max(stats.peak_undo_bytes, undo_bytes)
    errors: list[ChecksumMismatchError] = []
    # Layer times: CUDA events on GPUs (the host queues layer after layer without waiting for
    # the device; a per-layer synchronize stalled the queue), host clocks elsewhere.
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    if first_mark == 0:
        _read_deferred_times()
    marks = [_mark(stream, first_mark)]
    pending: tuple[LayerWork, _Posted] | None = None  # posted, not yet waited for
    next_slot = 0
    pair_launches = int_setting(PAIR_LAUNCH_ENV, 1, minimum=0, what="0 or 1") != 0  # rank-local: nothing to agree

    def finish_pending(*, waited: bool = False, pack_beside: tuple | None = None) -> bool:
        """Write the pending layer, if any (``LayerWork.finish``); whether ``pack_beside`` went with it."""
        nonlocal pending
        paired = False
        if pending is not None:
            layer, posted = pending
            paired = layer.finish(posted, comm, backend, stats, timeout_s=timeout_s, waited=waited, pack_beside=pack_beside)
            pending = None
            marks.append(_mark(stream, first_mark + len(marks)))
        return paired

    layer = None
    try:
        for layer in layers:
            if double and layer.overlappable and layer.has_network and layer.passes[0].pushed:
                # On the caller's stream; the slots alternate with one barrier per layer
                # (eplb_triton.p2p._PassExchange.push_packed). Layer i's unpack and layer i+1's
                # pack are one launch after barrier i (both slots' peers are done with them
                # then); layer i+1's barrier follows, so every rank wrote layer i before any
                # rank packs layer i+2 into that slot.
                # A pending pushed layer (its unpack held back) is waited for before anything more
                # is queued behind its barrier; any other pending layer is written first.
                held = pending is not None and pending[0].passes[0].pushed
                if held:
                    pending[0].wait(pending[1], timeout_s=timeout_s)
                else:
                    finish_pending()
                try:
                    posted = layer.start(slots[next_slot], comm, backend, transport=p2p, hold_push=True)
                except BaseException:
                    finish_pending(waited=held)  # its barrier passed: write it
                    raise
                next_slot ^= 1
                mover = posted.mover
                beside = _pack_beside(mover.held) if pair_launches else None
                paired = finish_pending(waited=held, pack_beside=beside)
                stats.overlapped_layers += layer.layer_count if paired else 0
                if mover.held is not None:
                    mover.push_held(backend, packed=paired)
                pending = (layer, posted)
                continue
            if double and layer.overlappable and layer.has_network:
                try:
                    posted = layer.start(slots[next_slot], comm, backend, transport=p2p)
                except BaseException:
                    finish_pending()  # the previous layer's exchange is posted everywhere: complete it first
                    raise
                next_slot ^= 1
                stats.overlapped_layers += layer.layer_count if pending is not None else 0
                finish_pending()  # the previous layer, whose wire this layer's pack overlapped
                pending = (layer, posted)
                continue
            finish_pending()
            try:
                layer.run(staging, comm, backend, stats, timeout_s=timeout_s, undo=undo, transport=p2p)
            except ChecksumMismatchError as exc:
                errors.append(exc)  # exchanges completed: carry on, report after the confirmation
                stats.failed_layers.append(layer.index)
            marks.append(_mark(stream, first_mark + len(marks)))
        finish_pending()
        if p2p is not None:  # the next user of the buffer (maybe on another stream) waits for this
            p2p.mark_used()
    except TransferError as exc:
        # a posted layer that was not written failed too (entirely old on this rank)
        first = pending[0].index if pending is not None else layer.index
        stats.failed_layers.extend(range(first, layers[-1].index + layers[-1].layer_count))
        logger.error("rank %d: rearrangement stopped at layer %d: %s", comm.rank, first, exc)
        exc.stats = stats  # which layers are new on this rank: those not in failed_layers
        raise
    return errors, marks


def double_staging(
    layers: Sequence[LayerWork],
    peak: int,
    undo_bytes: int,
    *,
    given: torch.Tensor | None = None,
    max_buffer_bytes: int | None = None,
) -> bool:
    """Whether :func:`run_layers` gives overlappable layers two staging slots of ``peak`` bytes:
    at least two of them have an exchange, and two slots fit the staging budget (the caller's
    ``given`` buffer, with the undo copy beside them, and ``max_buffer_bytes`` when set; without
    ``given``, ``max_buffer_bytes``, by default one layer's local rows packed). Ranks may decide differently (``peak`` is this rank's):
    either way each rank posts its layers' exchanges in layer order."""
    if sum(layer.overlappable and layer.has_network for layer in layers) < 2:
        return False
    if given is not None and 2 * peak + undo_bytes > given.numel():
        return False
    if given is not None and max_buffer_bytes is None:  # the caller's buffer is the budget
        return True
    if max_buffer_bytes is None:  # overlappable layers have no verify trailers
        max_buffer_bytes = default_budget_bytes([layer.layout for layer in layers], verify=False)
    return 2 * peak <= max_buffer_bytes

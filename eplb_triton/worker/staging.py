"""Staging: each layer prepared for a staging buffer, the staging buffers, the send buffer, the swap.

Until its swap a layer's live rows are only read, so every row this rank writes in a layer is
staged beforehand as a packed expert holding the row's final content
(:class:`_PreparedLayer`); ``layers_ahead`` staging buffers (two by default: double
buffering, the next layer transfers while the current waits for its swap) and one send buffer
holding a staging pass's sends.
``reserve=True`` allocates the worst case once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..checksum import CHECKSUM_BYTES, expert_checksums, trailer_bytes
from ..layout import ExpertLayout, index_lists, resolve_backend
from ..pacing import PaceGate, layer_gate_bytes
from ..p2p import P2PTransport, largest_send_region, resolve_transport
from ..executor import LayerWork
from ..passes import PassWork
from ..stats import TransferStats
from ..transfer import staging_bound
from . import hooks

log = logging.getLogger("eplb_triton.worker")  # one logger for the package (documented name)


@dataclass
class _PreparedLayer:
    """One layer prepared for the worker's staging on this rank: the buffer holds one packed
    expert per row written, and these are where each goes.

    Buffer order: receives of pass 0, pass 1, ... | local-move sources | duplicates.
    """

    layer: LayerWork
    rows: np.ndarray  # destination row of each packed expert in the buffer, in buffer order
    recv_offsets: list[int]  # byte offset of each pass's receives in the buffer
    local_src: np.ndarray
    local_offset: int
    dup_src_pos: np.ndarray  # buffer positions (in experts) copied ...
    dup_dst_pos: np.ndarray  # ... to these positions
    device_rows: torch.Tensor | None = None  # ``rows`` on the GPU, copied by the worker thread
    device_lists: dict[str, torch.Tensor] | None = None  # local sources and duplicate positions, likewise
    swap_launch: Callable[[], None] | None = None  # the swap's unpack, bound (bind_swaps)

    @classmethod
    def build(cls, layer: LayerWork, rank: int) -> "_PreparedLayer":
        eb = layer.layout.expert_bytes
        # the whole layer: local moves and duplicates of all passes; a stack (one pass) has
        # them, numbered across its layers, in its pass's view
        view = layer.passes[0].view if layer.layer_count > 1 else layer.plan.rank(rank)
        recv = [work.recv_rows for work in layer.passes]
        offsets = np.cumsum([0] + [r.size * eb for r in recv]).tolist()
        delivered = np.concatenate(recv + [view.local_dst_rows]).astype(np.int64)
        position = np.full(layer.layout.num_local * layer.layer_count, -1, dtype=np.int64)
        position[delivered] = np.arange(delivered.size)
        dup_src_pos = position[view.dup_src_rows]
        if (dup_src_pos < 0).any():  # a plan invariant: duplicates copy rows delivered in this layer
            raise AssertionError(f"layer {layer.index}: a duplicate fill reads a row the layer does not deliver")
        return cls(
            layer=layer,
            rows=np.concatenate([delivered, view.dup_dst_rows]).astype(np.int64),
            recv_offsets=offsets[:-1],
            local_src=np.asarray(view.local_src_rows, dtype=np.int64),
            local_offset=offsets[-1],
            dup_src_pos=dup_src_pos,
            dup_dst_pos=delivered.size + np.arange(view.dup_dst_rows.size, dtype=np.int64),
        )

    @property
    def nbytes(self) -> int:
        return int(self.rows.size) * self.layer.layout.expert_bytes

    @property
    def send_bytes(self) -> int:
        return max((w.send_rows.size * w.expert_bytes for w in self.layer.passes), default=0)


_DEVICE_LISTS = ("rows", "local_src", "dup_src", "dup_dst")  # _PreparedLayer.device_lists, in this order


_PAD = np.zeros(1, dtype=np.int64)
_NO_PAD = np.zeros(0, dtype=np.int64)


def upload_prepared(prepared_layers: Sequence[_PreparedLayer], device: torch.device) -> None:
    """Every layer's swap rows, local sources and duplicate positions to ``device`` in one
    pinned copy, as views per layer (``device_rows``, ``device_lists``). One copy per layer cost
    the worker thread 135-356 us of host time per layer on the H200 hosts (session 8, run 34).
    Each list starts 16 bytes aligned (odd ones padded by one row), as the row lists that
    :meth:`StagingMixin._load_kernels` compiles the launches with: the swaps' launches are
    then found compiled (:func:`bind_swaps`)."""
    lists = [
        part
        for p in prepared_layers
        for a in (p.rows, p.local_src, p.dup_src_pos, p.dup_dst_pos)
        for part in (a, _PAD if a.size % 2 else _NO_PAD)
    ]
    views = index_lists(lists, device)[1][::2]
    width = len(_DEVICE_LISTS)
    for i, prepared in enumerate(prepared_layers):
        prepared.device_lists = dict(zip(_DEVICE_LISTS, views[i * width : (i + 1) * width]))
        prepared.device_rows = prepared.device_lists["rows"] if prepared.rows.size else None


def bind_swaps(job: "_Job", device: torch.device) -> None:
    """Give each prepared layer its swap's unpack as a callable (``swap_launch``, see
    :meth:`ExpertLayout.launcher`) where the Triton backend swaps and the launch is compiled:
    ``step()`` then only calls it. Run on the worker thread after :func:`upload_prepared`;
    compiles nothing there (a launch found uncompiled is left to ``step()``)."""
    if resolve_backend(job.backend, device) != "triton":
        return
    for index, prepared in enumerate(job.prepared_layers):
        if prepared.device_rows is not None:
            buffer = job.staging_of(index).buffer
            prepared.swap_launch = prepared.layer.layout.launcher("unpack", buffer[: prepared.nbytes], dst_rows=prepared.device_rows)


@dataclass
class _StagingBuffer:
    """One of the ``layers_ahead`` buffers that hold a layer's packed rows from its transfer until its swap."""

    buffer: torch.Tensor
    event: torch.cuda.Event | None = None  # recorded after the last swap that read this buffer


@dataclass
class _Job:
    """One submitted rearrangement. Counters are guarded by the worker's condition; they count
    items of ``prepared_layers``, each one layer or a stack of consecutive layers."""

    prepared_layers: list[_PreparedLayer]
    staging_buffers: list[_StagingBuffer]
    send_buffer: torch.Tensor
    stats: TransferStats
    start_event: torch.cuda.Event | None
    backend: str | None
    published: int = 0  # layers transferred and ready to swap on this rank
    swapped: int = 0  # layers swapped (agreed on every rank)
    started: bool = False  # the worker thread has picked the job up
    cursor: tuple[int, int] = (0, 0)  # (layer, pass) of the next exchange this rank posts
    verify: bool = False
    send_trailers: torch.Tensor | None = None  # verify: checksum trailers of one pass's sends
    recv_trailers: torch.Tensor | None = None  # verify: checksum trailers of one pass's receives
    broken: bool = False  # a peer error: the transfer group is unusable, do not drain
    layer: int | None = None  # the layer the worker thread is transferring (error reports)
    gate: PaceGate = None  # pacing: which layers the worker thread may start (see pacing.py)
    lift_requested: bool = False  # wait() asks the ranks to lift the pace at the next step
    submitted_at: float = 0.0  # time.monotonic() of submit (progress)
    finished_at: float | None = None  # of the last swap
    p2p: P2PTransport | None = None  # transport="p2p": send_buffer is its symmetric buffer
    layer_ends: list[int] = None  # layer_ends[i]: layers in the first i items (prepared_layers may hold stacks)
    rows_stream: object = None  # the stream the device rows were last recorded on (_swap_ready)

    def staging_of(self, index: int) -> _StagingBuffer:
        """The staging buffer of the job's ``index``-th item (they take turns)."""
        return self.staging_buffers[index % len(self.staging_buffers)]

    def layers_in(self, items: int) -> int:
        """How many layers the job's first ``items`` items hold (a stack holds several)."""
        return self.layer_ends[items]


def _per_peer(buf: torch.Tensor, peers: list[int], counts: list[int], eb: int) -> dict[int, torch.Tensor]:
    out, offset = {}, 0
    for peer, count in zip(peers, counts):
        out[peer] = buf[offset : offset + count * eb]
        offset += count * eb
    return out


def _trailers(buf: torch.Tensor, peers: list[int], counts: list[int]) -> dict[int, torch.Tensor]:
    """Each peer's checksum trailer (``trailer_bytes(count)`` bytes) in ``buf``, peer by peer."""
    out, offset = {}, 0
    for peer, count in zip(peers, counts):
        out[peer] = buf[offset : offset + trailer_bytes(count)]
        offset += trailer_bytes(count)
    return out


def _pass_trailer_bytes(work: PassWork) -> tuple[int, int]:
    return sum(trailer_bytes(c) for c in work.send_counts), sum(trailer_bytes(c) for c in work.recv_counts)


def _fill_send_trailers(job: "_Job", work: PassWork, send_buf: torch.Tensor) -> dict[int, torch.Tensor]:
    """Checksum every packed expert in ``send_buf`` into each peer's trailer; returns the trailers."""
    eb = work.expert_bytes
    sums = expert_checksums(send_buf, eb) if send_buf.numel() else None
    trailers = _trailers(job.send_trailers, work.send_peers, work.send_counts)
    first = 0
    for peer, count in zip(work.send_peers, work.send_counts):
        trailers[peer][: count * CHECKSUM_BYTES].view(torch.int64).copy_(sums[first : first + count])
        first += count
    return trailers


class StagingMixin:
    """The :class:`~eplb_triton.worker.TransferWorker` part that allocates staging and swaps."""

    def _reserve_storage(self) -> torch.Tensor | None:
        """The worst case of :meth:`submit`'s storage for these weights and options: ``layers_ahead``
        staging buffers of a layer's local rows packed, one pass's sends (at most the pass budget)
        and, with ``verify``, trailers of at most 16 bytes per expert sent and received in a pass."""
        try:
            layouts = [ExpertLayout(tensors) for tensors in self.expert_weights]
        except (TypeError, ValueError, IndexError):
            return None  # malformed weights: submit() reports them on every rank
        buffer_bytes = max((lay.num_local * lay.expert_bytes for lay in layouts), default=0)
        budget = staging_bound(self.expert_weights, self.max_buffer_bytes, verify=self.verify)
        rows = max((budget // lay.expert_bytes for lay in layouts), default=0)
        trailer_room = 2 * 16 * rows if self.verify else 0
        ahead = self._layers_ahead
        # stacks of k layers: ahead // k buffers of k layers (never more than ``ahead`` layers);
        # an item's sends within its pass or stack budget (TransferWorker._prepare_options)
        sends = self._send_bound(budget)
        return torch.empty(max(ahead * buffer_bytes + sends + trailer_room, 1), dtype=torch.uint8, device=self._device)

    def _build_job(self, layers: Sequence[LayerWork]) -> _Job:
        """Prepare every layer for a staging buffer, allocate (or reuse) the staging and build the job."""
        rank = self._transfer.rank
        prepared = [_PreparedLayer.build(layer, rank) for layer in layers]
        buffer_bytes = max((s.nbytes for s in prepared), default=0)
        send_bytes = max((s.send_bytes for s in prepared), default=0)
        trailers = [_pass_trailer_bytes(w) for s in prepared for w in s.layer.passes] if self.verify else []
        send_trailer_bytes = max((t[0] for t in trailers), default=0)
        recv_trailer_bytes = max((t[1] for t in trailers), default=0)
        p2p = self._map_p2p(layers)
        if p2p is not None:  # sends (and their trailers) live in the symmetric buffer
            send_bytes = send_trailer_bytes = 0
        # One allocation on the current stream; nothing frees it while the worker may use it.
        # Stacks of k layers take buffers of k layers: layers_ahead // k of them (at least two:
        # k is at most layers_ahead // 2, TransferWorker._stack_most).
        ahead = self._layers_ahead // max((s.layer.layer_count for s in prepared), default=1)
        need = ahead * buffer_bytes + send_bytes + send_trailer_bytes + recv_trailer_bytes
        if self._reserved is not None and self._reserved.numel() >= need:
            storage = self._reserved[:need]  # reserve=True: the previous job's swaps are ordered before start_event
        else:
            storage = torch.empty(need, dtype=torch.uint8, device=self._device)
        trailers_at = ahead * buffer_bytes + send_bytes
        stats = TransferStats.empty(rank, self._transfer.world_size)
        stats.peak_staging_bytes = int(storage.numel())
        # The pace's schedule comes from the global plan: the same on every rank.
        schedule = None
        if self._pacing.paced:
            schedule = self._pacing.schedule(
                [layer_gate_bytes(s.layer.plan.traffic, s.layer.layout.expert_bytes) for s in prepared]
            )
        start_event = None
        if self._stream is not None:
            # The worker reads live weights on its own stream: after what the current stream
            # queued before this call (the previous rearrangement's swaps, a weight load).
            start_event = hooks._cuda.Event()
            start_event.record(hooks._cuda.current_stream(self._device))
        job = _Job(
            prepared_layers=prepared,
            staging_buffers=[_StagingBuffer(storage[k * buffer_bytes : (k + 1) * buffer_bytes]) for k in range(ahead)],
            send_buffer=storage[ahead * buffer_bytes : trailers_at] if p2p is None else p2p.buffer,
            stats=stats,
            start_event=start_event,
            backend=self.backend,
            verify=self.verify,
            send_trailers=storage[trailers_at : trailers_at + send_trailer_bytes] if self.verify else None,
            recv_trailers=storage[trailers_at + send_trailer_bytes :] if self.verify else None,
            gate=PaceGate(schedule),
            submitted_at=time.monotonic(),
            p2p=p2p,
            layer_ends=np.cumsum([0] + [s.layer.layer_count for s in prepared]).tolist(),
        )
        log.info(
            "rank %d: submitted %d layers in %d items, staging %d bytes (%d x %d buffer + %d send)%s",
            rank, job.layers_in(len(prepared)), len(prepared), storage.numel(), ahead, buffer_bytes, send_bytes,
            f", paced over {schedule[-1] + 1} steps ({self._pacing.options()})" if schedule else "",
        )
        return job

    def _load_kernels(self, job: _Job) -> None:
        """Compile and load, here on the serving thread, every Triton kernel variant the job's
        launches will use (on the worker thread and in step()), and run the job's other kernels
        once (duplicate copies; with ``verify`` the checksums and their comparison).

        CUDA loads a kernel's module at its first launch in a process (lazy loading, torch's
        default), and a load waits for the kernels running on the device. The worker thread's
        first launch of a kernel could then wait for a kernel that waits for a peer (a NCCL
        exchange or a p2p barrier, the serving loop's collectives) while that peer's threads
        wait in the same way for this rank: a deadlock, seen as a hang of bench/pacing.py over
        p2p in session 8 (run 33; stacks in run 35: both worker threads in Triton's
        ``_init_handles``). Loading at submit is safe: every rank submits at the same point of
        its serving loop, with no exchange of the worker in flight. ``CUDA_MODULE_LOADING=EAGER``
        in the serving process removes the hazard for every kernel, Triton's and torch's.
        """
        if self._stream is None:
            return
        triton_moves = resolve_backend(job.backend, self._device) == "triton"
        most = max((max(p.rows.size, p.local_src.size, *(w.send_rows.size for w in p.layer.passes)) for p in job.prepared_layers), default=0)
        rows = torch.zeros(max(most, 1), dtype=torch.int64, device=self._device)  # stands in for every row list
        for index, prepared in enumerate(job.prepared_layers):
            layout, eb = prepared.layer.layout, prepared.layer.layout.expert_bytes
            buf = job.staging_of(index).buffer[: prepared.nbytes]
            if triton_moves:
                launches = [("unpack", buf, prepared.rows.size)]
                local = prepared.local_src.size
                launches.append(("pack", buf[prepared.local_offset : prepared.local_offset + local * eb], local))
                for work in prepared.layer.passes:
                    for first, count in work.pack_spans():
                        launches.append(("pack", job.send_buffer[first * eb : (first + count) * eb], count))
                for mode, target, count in launches:
                    if count:
                        rows_arg = {"dst_rows" if mode == "unpack" else "src_rows": rows[:count]}
                        layout.launch(mode, target, compile_only=True, **rows_arg)
            if prepared.dup_dst_pos.size:  # the worker's torch copies between packed experts
                table = buf.view(-1, eb)
                table[rows[:1]] = table[rows[:1]]
            if job.verify:
                for work, offset in zip(prepared.layer.passes, prepared.recv_offsets):
                    received = expert_checksums(buf[offset : offset + work.recv_rows.size * eb], eb)
                    received.ne(torch.cat([received[:1], received[1:]]))  # the check's comparison
                    if work.send_rows.size:
                        expert_checksums(job.send_buffer[: work.send_rows.size * eb], eb)

    def _map_p2p(self, layers: Sequence[LayerWork]) -> P2PTransport | None:
        """This worker's p2p transport, large enough for ``layers`` (collective: the size comes
        from the global plan, so every rank re-maps exactly when the others do), or None when
        the transport is NCCL or nothing crosses ranks."""
        if not any(layer.has_network for layer in layers):
            return None
        device = layers[0].layout.device
        if resolve_transport(self.transport, self._transfer, device) != "p2p":  # agreed by prepare_layers
            return None
        need = largest_send_region(
            [(w.pass_traffic, w.expert_bytes) for layer in layers for w in layer.passes], verify=self.verify
        )
        if self._p2p is not None and self._p2p.nbytes >= need:
            return self._p2p
        if self._p2p is not None:
            self._p2p.close()
        self._p2p = P2PTransport.create(self._transfer, device, need, control=self._control, timeout_s=self.timeout_s)
        return self._p2p

    def _swap_ready(self, job: _Job, ready: int, lift: bool = False) -> list[int]:
        """Swap items ``job.swapped`` .. ``ready - 1`` in, on the current stream (none when
        ``ready`` is not beyond them), then count the step for the pace (and lift it, agreed);
        returns the indices of the layers swapped. One event, recorded after the last unpack,
        frees every staging buffer they read
        (the worker stream waits for it before reusing one): an event per layer cost ~20 us of
        the serving thread's time per layer (run 28). Each buffer is read at most once per step,
        as the worker publishes at most ``layers_ahead`` layers beyond the swapped ones.

        The serving thread's host time is the product here: a bound launch (:func:`bind_swaps`;
        it compiles nothing, so it needs no kernel lock), one ``record_stream`` per job and
        stream (it marks the whole uploaded row block), a cached stream object and one
        condition round for the swap and the pace together.
        """
        done, read = [], []
        swapping = ready > job.swapped
        stream = hooks.current_stream(self._device) if self._stream is not None and swapping else None
        for number in range(job.swapped, ready):
            prepared = job.prepared_layers[number]
            staging = job.staging_of(number)
            if prepared.rows.size:
                if prepared.swap_launch is not None:
                    prepared.swap_launch()
                    device_rows = True
                else:
                    with self._kernel_lock:
                        device_rows = self._swap_unbound(job, prepared, staging)
                if device_rows and stream != job.rows_stream:
                    # the rows were uploaded on the worker stream: keep their block from reuse
                    # until this stream has read them (the allocator tracks the whole block)
                    prepared.device_rows.record_stream(stream)
                    job.rows_stream = stream
                read.append(staging)
            done.extend(range(prepared.layer.index, prepared.layer.index + prepared.layer.layer_count))
        event = None
        if stream is not None and read:
            event = hooks._cuda.Event()
            event.record(stream)
        with self._cond:  # the events first: the worker reads a buffer's event once it sees the swap
            for staging in read:
                staging.event = event
            if swapping:
                job.swapped = ready
            job.gate.on_step()  # one more collective step: the pace's credit (the same count on every rank)
            if lift:  # agreed: every rank lifts the pace at this step
                job.gate.lift()
            self._cond.notify_all()
        return done

    def _swap_unbound(self, job: _Job, prepared: _PreparedLayer, staging: _StagingBuffer) -> bool:
        """A swap's unpack without a bound launch (the torch backend, or a launch not compiled
        when the worker bound the job's swaps); returns whether it read the device rows."""
        layout = prepared.layer.layout
        if prepared.device_rows is not None and resolve_backend(job.backend, self._device) == "triton":
            # rows come from the plan (distinct, in range): the unchecked launch is safe
            layout.launch("unpack", staging.buffer[: prepared.nbytes], dst_rows=prepared.device_rows)
            return True
        layout.unpack(staging.buffer[: prepared.nbytes], prepared.rows, backend=job.backend)
        return False

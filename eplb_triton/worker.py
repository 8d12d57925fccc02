"""Background rearrangement: a thread transfers layer by layer, the serving thread swaps.

Serving cannot stop for a whole rearrangement, so a :class:`TransferWorker` moves the bytes
on its own thread (and its own CUDA stream) while the serving (main) thread keeps running
forward passes; between two passes the main thread calls :meth:`TransferWorker.step`, which
swaps in every layer whose transfer has finished on all ranks.

One layer on one rank::

    worker thread (own CUDA stream)                   main thread, step() (current stream)
    -------------------------------                   ------------------------------------
    wait until its staging slot is free
      (GPU-side wait on the event of the slot's last swap)
    pack local-move sources into the slot
    per round: pack sends -> exchange -> receives land in the slot
    copy duplicates (replicas) inside the slot
    wait for the worker stream -> publish the layer
                                                      agree on min(published) over all ranks
                                                      unpack the slot into the live rows
                                                      record an event: the slot is free again

Why a swap is one unpack: until its swap a layer's live rows are only *read* (by serving
and by the worker), so every row this rank writes in the layer (a network delivery, a local
move, a duplicate fill) can be staged beforehand as a packed expert holding the row's final
content. The swap is then one scatter of ``rows written x expert_bytes`` on the main stream,
and the weights of a layer change only there, after all its receives completed. The round
order of the blocking path (chains, cycles, stash) is irrelevant here: every read sees the
old rows. Rounds still split the exchange so the send buffer stays within
``max_buffer_bytes``.

Memory per rank: two slots (double buffering: the next layer transfers while the current one
waits for its swap), each holding the rows this rank writes in one layer (at most one layer's
local rows, packed), plus one send buffer of the largest round's sends.

Thread safety: ``submit``/``step``/``wait``/``close`` are meant for one (the serving) thread.
The worker's p2p runs on ``transfer_group``; the agreements of ``submit`` and ``step`` run on
a CPU (gloo) control group, never on the group the worker thread uses (a NCCL or gloo
communicator must not be used by two threads at once).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .comm import Communicator
from .transfer import LayerWork, TransferStats, prepare_layers

__all__ = ["TransferWorker"]

log = logging.getLogger(__name__)

_POLL_MIN_S = 20e-6  # first sleep of a poll loop: the GIL is free for the serving thread meanwhile
_POLL_MAX_S = 1e-3  # longest sleep: bounds the latency added to a layer that just finished
_WAIT_SLICE_S = 0.05  # wait() re-agrees at least this often, so a failure on a peer is seen
_DRAIN_STREAM_S = 30.0  # how long a drain waits for the transfer stream before giving up


class _Stopped(Exception):
    """Raised inside the worker thread when close() or a peer's failure stops it."""


class _ControlCommunicator(Communicator):
    """The CPU control group as seen by ``prepare_layers``.

    Its agreement runs over gloo on CPU tensors (``collective_device``), so ``submit`` never
    waits on a GPU stream; ``backend`` is the transfer group's, so the weights' device is
    checked against the backend that will actually move them.
    """

    @property
    def collective_device(self) -> torch.device:
        return torch.device("cpu")


@dataclass
class _Stage:
    """One layer's staging plan on this rank: the slot holds one packed expert per row written.

    Slot order: receives of round 0, round 1, ... | local-move sources | duplicates.
    """

    layer: LayerWork
    rows: np.ndarray  # destination row of each packed expert in the slot, in slot order
    recv_offsets: list[int]  # byte offset of each round's receives in the slot
    local_src: np.ndarray
    local_offset: int
    dup_src_pos: np.ndarray  # slot positions (in experts) copied ...
    dup_dst_pos: np.ndarray  # ... to these positions

    @classmethod
    def build(cls, layer: LayerWork, rank: int) -> "_Stage":
        eb = layer.layout.expert_bytes
        view = layer.plan.rank(rank)  # the whole layer: local moves and duplicates of all rounds
        recv = [work.recv_rows for work in layer.rounds]
        offsets = np.cumsum([0] + [r.size * eb for r in recv]).tolist()
        delivered = np.concatenate(recv + [view.local_dst_rows]).astype(np.int64)
        position = np.full(layer.layout.num_local, -1, dtype=np.int64)
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
        return max((w.send_rows.size * w.expert_bytes for w in self.layer.rounds), default=0)


@dataclass
class _Slot:
    buffer: torch.Tensor
    event: torch.cuda.Event | None = None  # recorded after the last swap that read this slot


@dataclass
class _Job:
    """One submitted rearrangement. Counters are guarded by the worker's condition."""

    stages: list[_Stage]
    slots: list[_Slot]
    send_buffer: torch.Tensor
    stats: TransferStats
    start_event: torch.cuda.Event | None
    backend: str | None
    published: int = 0  # layers transferred and ready to swap on this rank
    swapped: int = 0  # layers swapped (agreed on every rank)
    started: bool = False  # the worker thread has picked the job up
    cursor: tuple[int, int] = (0, 0)  # (layer, round) of the next exchange this rank posts


def _index_tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    cpu = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if device.type == "cuda":  # a pinned copy is queued on the stream; a pageable one would sync it
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu


def _per_peer(buf: torch.Tensor, peers: list[int], counts: list[int], eb: int) -> dict[int, torch.Tensor]:
    out, offset = {}, 0
    for peer, count in zip(peers, counts):
        out[peer] = buf[offset : offset + count * eb]
        offset += count * eb
    return out


class TransferWorker:
    """Rearrange expert weights in the background, one layer at a time.

    Args:
        expert_weights: ``expert_weights[layer][i]``, tensors ``(num_local, ...)`` as for
            :func:`~eplb_triton.rearrange_expert_weights_inplace`; the worker rearranges
            these tensors in place, in every later :meth:`submit`.
        ep_group: the EP process group (default: the world group; none initialised = a
            single rank, everything local).
        transfer_group: the group the worker thread's p2p uses, with the same ranks in the
            same order as ``ep_group``. Default: a new group of those ranks with
            ``ep_group``'s backend, private to the worker, so the serving thread may keep
            using ``ep_group``.
        max_buffer_bytes: bounds one exchange round (sends + receives + local moves per rank,
            as in the blocking API), which bounds the send buffer; received rows are kept
            until their swap in two slots of at most one layer's local rows each.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for pack/unpack (as in the
            blocking API).

    Constructing is collective over ``ep_group`` when it has more than one rank (it may
    create process groups). The worker thread starts at once and waits for work.

    Protocol (every rank, the same calls in the same order, from the serving thread):

    * :meth:`submit` (collective) validates the maps on every rank before any weight is
      touched (the same ``ValueError``/``TypeError`` everywhere) and returns; the transfer
      runs in the background. A second ``submit`` while :attr:`busy` raises ``RuntimeError``
      (on every rank: ``busy`` is the same everywhere); it does not queue.
    * :meth:`step` (collective while busy; free otherwise) swaps in every layer ready on all
      ranks, in layer order, and returns their indices, the same list on every rank; call it
      between forward passes, then switch those layers' routing to the new map.
    * :meth:`wait` (collective while busy) swaps everything left and returns the stats.
    * :meth:`close` (local, bounded by ``timeout_s``) stops the thread; layers not swapped
      yet keep their old weights. Also on leaving a ``with`` block.

    Errors: an exception on the worker thread (any rank) surfaces at the next ``step``/
    ``wait`` on every rank: the failing rank re-raises the original exception (its traceback
    includes the worker's frames); the others raise ``RuntimeError`` naming the failing
    rank(s). Layers swapped before stay swapped, the others keep their old weights, and the
    worker is closed (its thread ends after running the remaining exchanges with junk, so no
    peer is left blocked): make a new one to retry.
    """

    def __init__(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        ep_group=None,
        *,
        transfer_group=None,
        max_buffer_bytes: int | None = None,
        backend: str | None = None,
    ):
        self.expert_weights = expert_weights
        self.max_buffer_bytes = max_buffer_bytes
        self.backend = backend
        self._device = self._weights_device(expert_weights)
        self._owned_groups: list = []
        self._transfer, self._control = self._make_communicators(ep_group, transfer_group)
        self._stream = torch.cuda.Stream(device=self._device) if self._device.type == "cuda" else None
        self._cond = threading.Condition()
        # Held around pack/unpack calls: Triton's first-use compilation (and its CPU
        # interpreter) is not safe from two threads at once. A launch holds it for microseconds.
        self._kernel_lock = threading.Lock()
        self._job: _Job | None = None
        self._stop = False
        self._error: BaseException | None = None
        self._closed = False
        self._drained = False  # the worker thread ended with no p2p op pending
        self._last_stats = TransferStats.empty(self._transfer.rank, self._transfer.world_size)
        self._thread = threading.Thread(target=self._run, name=f"eplb-transfer-rank{self._transfer.rank}", daemon=True)
        self._thread.start()

    # -- setup ------------------------------------------------------------------------------
    @staticmethod
    def _weights_device(expert_weights) -> torch.device:
        try:
            return expert_weights[0][0].device
        except (TypeError, IndexError, AttributeError, KeyError):
            return torch.device("cpu")  # malformed weights: submit() reports it on every rank

    def _make_communicators(self, ep_group, transfer_group) -> tuple[Communicator, Communicator]:
        ep = Communicator.from_group(ep_group)
        if ep.world_size == 1:  # nothing crosses ranks: no collective, no p2p, no new group
            transfer = ep if transfer_group is None else Communicator.from_group(transfer_group)
            return transfer, _ControlCommunicator(group=ep.group, rank=ep.rank, world_size=1, backend=transfer.backend)
        ranks = dist.get_process_group_ranks(ep.group)
        if transfer_group is None:
            transfer_group = self._new_group(ranks, ep.backend)
            if ep.backend == "nccl":  # create the NCCL communicator now, not inside the first layer
                probe = torch.zeros(1, device=self._device)
                dist.all_reduce(probe, group=transfer_group)
        elif dist.get_process_group_ranks(transfer_group) != ranks:
            raise ValueError(
                f"transfer_group must hold the EP ranks in the same order: {dist.get_process_group_ranks(transfer_group)} "
                f"vs {ranks}"
            )
        transfer = Communicator.from_group(transfer_group)
        # The main thread's agreements need a CPU group the worker thread never uses.
        if ep.backend == "gloo" and ep.group is not transfer_group:
            control_group = ep.group
        else:
            control_group = self._new_group(ranks, "gloo")
        control = _ControlCommunicator(group=control_group, rank=ep.rank, world_size=ep.world_size, backend=transfer.backend)
        return transfer, control

    def _new_group(self, ranks: list[int], backend: str):
        # Only the EP ranks take part (several EP groups may build workers at once).
        group = dist.new_group(ranks, backend=backend, use_local_synchronization=True, sort_ranks=False)
        self._owned_groups.append((group, backend))
        return group

    # -- public API ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True from a successful :meth:`submit` until its last layer is swapped (or an error)."""
        return self._job is not None and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, old_global_expert_indices, new_global_expert_indices) -> None:
        """Start rearranging from the old to the new maps; returns once the work is queued.

        Collective over the EP group. Raises ``ValueError``/``TypeError`` on every rank for
        bad input (nothing started, the worker stays usable) and ``RuntimeError`` when busy
        or closed.
        """
        self._check_open()
        if self._job is not None:
            raise RuntimeError(
                "TransferWorker.submit: a rearrangement is still in progress; call step() until busy is False, "
                "or wait(), before submitting the next one"
            )
        layers = prepare_layers(
            old_global_expert_indices,
            new_global_expert_indices,
            self.expert_weights,
            self._control,
            self.max_buffer_bytes,
        )
        rank = self._transfer.rank
        stages = [_Stage.build(layer, rank) for layer in layers]
        slot_bytes = max((s.nbytes for s in stages), default=0)
        send_bytes = max((s.send_bytes for s in stages), default=0)
        # One allocation on the current stream; nothing frees it while the worker may use it.
        storage = torch.empty(2 * slot_bytes + send_bytes, dtype=torch.uint8, device=self._device)
        stats = TransferStats.empty(rank, self._transfer.world_size)
        stats.peak_staging_bytes = int(storage.numel())
        start_event = None
        if self._stream is not None:
            # The worker reads live weights on its own stream: after what the current stream
            # queued before this call (the previous rearrangement's swaps, a weight load).
            start_event = torch.cuda.Event()
            start_event.record(torch.cuda.current_stream(self._device))
        job = _Job(
            stages=stages,
            slots=[_Slot(storage[:slot_bytes]), _Slot(storage[slot_bytes : 2 * slot_bytes])],
            send_buffer=storage[2 * slot_bytes :],
            stats=stats,
            start_event=start_event,
            backend=self.backend,
        )
        log.info(
            "rank %d: submitted %d layers, staging %d bytes (2 x %d slot + %d send)",
            rank, len(stages), storage.numel(), slot_bytes, send_bytes,
        )
        with self._cond:
            if not stages:
                self._last_stats = stats
                return
            self._job = job
            self._cond.notify_all()

    def step(self) -> list[int]:
        """Swap in every layer whose transfer finished on all ranks; returns their indices.

        The same indices, in ascending order, on every rank. Collective over the EP group
        while :attr:`busy` (each rank must call it equally often); returns ``[]`` at once when
        idle. Swaps run on the current CUDA stream, so kernels queued before read the old
        rows and kernels queued after read the new ones; no device-wide sync.
        """
        self._check_open()
        job = self._job
        if job is None:
            return []
        with self._cond:
            ready, failed = job.published, self._error is not None
        try:
            ready = self._agree_ready(ready, failed)
        except BaseException:
            self._shutdown()
            raise
        done = []
        try:
            while job.swapped < ready:
                stage = job.stages[job.swapped]
                self._swap(job, stage)
                done.append(stage.layer.index)
        except BaseException:  # a failed launch here is not recoverable: stop the thread, no leak
            self._shutdown()
            raise
        if job.swapped == len(job.stages):
            self._last_stats = job.stats
            self._job = None
        if done:
            log.debug("rank %d: swapped layers %s", self._transfer.rank, done)
        return done

    def wait(self) -> TransferStats:
        """Swap in every remaining layer (collective while busy); returns this rank's stats.

        ``layer_times_s[l]`` is the worker's transfer time of layer ``l``; when idle, returns
        the stats of the last rearrangement.
        """
        self._check_open()
        while self._job is not None:
            job = self._job
            with self._cond:
                # Re-agree at least every slice even without local progress: a peer's failure
                # (our worker may be blocked on that peer) is only learnt through step().
                self._cond.wait_for(
                    lambda: job.published > job.swapped or self._error is not None, timeout=_WAIT_SLICE_S
                )
            self.step()
        return self._last_stats

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the worker thread (local: needs no peer) and wait for it up to ``timeout_s``.

        A rearrangement in progress is abandoned: layers not swapped yet keep their old
        weights. Its remaining exchanges still run (junk in, junk out, see ``_drain``) so no
        peer is left blocked; they complete once every rank has called ``close()`` (call it
        on all ranks, like ``submit``), and fail at once if a peer process is gone. If they
        are not done within ``timeout_s`` this returns anyway with a warning and the thread
        ends on its own when they complete or the transfer group times out. Idempotent.
        Process groups the worker created (gloo ones) are destroyed once it ended cleanly.
        """
        if self._closed:
            return
        if self._job is not None:
            log.warning(
                "rank %d: TransferWorker closed during a rearrangement; layers not swapped keep their old weights",
                self._transfer.rank,
            )
        self._shutdown(timeout_s=timeout_s)

    def __enter__(self) -> "TransferWorker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("busy" if self.busy else "idle")
        return f"TransferWorker(rank={self._transfer.rank}, world_size={self._transfer.world_size}, {state})"

    # -- main-thread internals ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TransferWorker is closed (close() was called or a transfer failed); create a new one")

    def _agree_ready(self, ready: int, failed: bool) -> int:
        """min(ready) over ranks; raises on every rank when any rank's worker failed."""
        comm = self._control
        if comm.world_size > 1:
            flags = torch.tensor([-ready, int(failed)], dtype=torch.int64)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=comm.group)
            ready, any_failed = -int(flags[0]), bool(flags[1])
        else:
            any_failed = failed
        if any_failed:
            self._raise_failure()
        return ready

    def _raise_failure(self) -> None:
        error = self._error
        text = None if error is None else f"{type(error).__name__}: {error}"
        messages = self._control.all_gather_object(text)
        self._shutdown()
        if error is not None:
            raise error  # the worker thread's exception, with its original traceback
        failing = [(r, m) for r, m in enumerate(messages) if m is not None]
        ranks = [r for r, _ in failing]
        details = "; ".join(f"rank {r}: {m}" for r, m in failing)
        raise RuntimeError(
            f"the transfer worker failed on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
            f"({details}); layers not swapped yet keep their old weights"
        )

    def _swap(self, job: _Job, stage: _Stage) -> None:
        slot = job.slots[job.swapped % 2]
        if stage.rows.size:
            with self._kernel_lock:
                stage.layer.layout.unpack(slot.buffer[: stage.nbytes], stage.rows, backend=job.backend)
        event = None
        if self._stream is not None and stage.rows.size:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))
        with self._cond:
            if event is not None:
                slot.event = event
            job.swapped += 1
            self._cond.notify_all()

    def _shutdown(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._closed = True
        if self._thread.is_alive():
            log.warning(
                "rank %d: the transfer thread is still draining after %.1f s (a peer has not closed yet?); "
                "it ends when the peers' exchanges complete or the transfer group times out",
                self._transfer.rank, timeout_s,
            )
            return
        if self._drained:  # no p2p op is pending: the job's buffers and our groups may go
            self._job = None
            self._destroy_owned_groups()

    def _destroy_owned_groups(self) -> None:
        for group, backend in self._owned_groups:
            if backend != "gloo":
                continue  # destroying a NCCL communicator can block on peers; the process teardown does it
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - best effort, the group is ours and unused now
                log.debug("could not destroy a worker process group", exc_info=True)
        self._owned_groups = []

    # -- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self._stream is not None:
            with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
                self._loop()
        else:
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or (self._job is not None and not self._job.started))
                if self._stop:
                    self._drained = True
                    return
                job = self._job
                job.started = True
            try:
                self._run_job(job)
            except _Stopped:
                self._drain(job)
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                log.error("rank %d: transfer worker failed", self._transfer.rank, exc_info=True)
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                self._drain(job)
                return

    def _run_job(self, job: _Job) -> None:
        if job.start_event is not None:
            self._stream.wait_event(job.start_event)
        for index, stage in enumerate(job.stages):
            begin = time.perf_counter()
            self._transfer_layer(job, index, stage)
            self._finish_stream()
            with self._cond:
                job.stats.layer_times_s.append(time.perf_counter() - begin)
                job.published = index + 1
                self._cond.notify_all()

    def _transfer_layer(self, job: _Job, index: int, stage: _Stage) -> None:
        """Stage every row this rank writes in the layer; reads live weights, writes none."""
        layout, eb, backend = stage.layer.layout, stage.layer.layout.expert_bytes, job.backend
        slot = job.slots[index % 2]
        if stage.nbytes:
            with self._cond:  # the slot's previous layer (index - 2) must have been swapped
                self._cond.wait_for(lambda: self._stop or job.swapped >= index - 1)
                if self._stop:
                    raise _Stopped
                event = slot.event
            if event is not None:
                self._stream.wait_event(event)  # GPU-side: the swap's unpack has read the slot
        buf = slot.buffer[: stage.nbytes]
        if stage.local_src.size:
            with self._kernel_lock:
                layout.pack(stage.local_src, buf[stage.local_offset : stage.local_offset + stage.local_src.size * eb], backend=backend)
        for number, (work, offset) in enumerate(zip(stage.layer.rounds, stage.recv_offsets)):
            if self._stop:
                raise _Stopped
            send_buf = job.send_buffer[: work.send_rows.size * eb]
            if work.send_rows.size:
                with self._kernel_lock:
                    layout.pack(work.send_rows, send_buf, backend=backend)
            sends = _per_peer(send_buf, work.send_peers, work.send_counts, eb)
            recvs = _per_peer(buf[offset:], work.recv_peers, work.recv_counts, eb)
            job.cursor = (index, number + 1)  # posted (even if posting fails): never re-posted by a drain
            requests = self._transfer.exchange(sends, recvs)
            # gloo: blocks this thread (GIL released); NCCL: the worker stream waits, the host does not.
            self._transfer.wait(requests)
            work.count_into(job.stats, len(requests))
        if stage.dup_dst_pos.size:  # replicas: copies of packed experts already in the slot
            table = buf.view(-1, eb)
            table[_index_tensor(stage.dup_dst_pos, buf.device)] = table[_index_tensor(stage.dup_src_pos, buf.device)]

    def _drain(self, job: _Job) -> None:
        """Post every exchange of the job this rank has not posted yet, with junk, and wait.

        Stopping mid-job must not leave a peer blocked in an exchange that expects ours (nor
        leave unmatched ops in the group), so on close() or after a failure the remaining
        exchanges run anyway: junk sent, received bytes dropped, no slot touched, no swap.
        Every rank posts each exchange exactly once, so all of them complete as soon as every
        rank has stopped; a peer that crashed makes them fail at once instead.
        """
        first_layer, first_round = job.cursor
        pending = [
            (stage, number)
            for stage in job.stages[first_layer:]
            for number in range(first_round if stage is job.stages[first_layer] else 0, len(stage.layer.rounds))
        ]
        try:
            junk_recv = None
            for stage, number in pending:
                work, eb = stage.layer.rounds[number], stage.layer.layout.expert_bytes
                need = work.recv_rows.size * eb
                if junk_recv is None or junk_recv.numel() < need:
                    junk_recv = torch.empty(need, dtype=torch.uint8, device=self._device)
                sends = _per_peer(job.send_buffer, work.send_peers, work.send_counts, eb)
                recvs = _per_peer(junk_recv, work.recv_peers, work.recv_counts, eb)
                self._transfer.wait(self._transfer.exchange(sends, recvs))
            self._finish_stream(deadline=time.monotonic() + _DRAIN_STREAM_S)
            self._drained = True
            if pending:
                log.info("rank %d: drained %d exchanges of an unfinished rearrangement", self._transfer.rank, len(pending))
        except BaseException:  # noqa: BLE001 - the first error (if any) is already recorded
            log.warning("rank %d: draining the transfer group failed", self._transfer.rank, exc_info=True)

    def _finish_stream(self, deadline: float | None = None) -> None:
        """Wait until the worker stream has run everything queued: the layer may be swapped.

        An event poll rather than ``stream.synchronize()``: close() stays responsive, and a
        drain gives up at ``deadline`` (a NCCL op whose peer is gone never completes).
        """
        if self._stream is None:
            return
        event = torch.cuda.Event()
        event.record(self._stream)
        delay = _POLL_MIN_S
        while not event.query():
            if deadline is None and self._stop:
                raise _Stopped
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the transfer stream did not finish (a NCCL peer is gone?)")
            time.sleep(delay)
            delay = min(2 * delay, _POLL_MAX_S)

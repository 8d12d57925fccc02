"""The worker thread: per layer, stage its rows, exchange, check and publish; drain on stop.

Runs on its own CUDA stream; layers are queued there ahead of their publication, as far as
the ``layers_ahead`` staging buffers allow, and published as they finish. On ``close()`` or a
failure the exchanges this rank has not posted yet still run with junk
(:meth:`ThreadMixin._drain`) so no peer is left blocked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np
import torch

from ..checksum import CHECKSUM_BYTES, expert_checksums
from ..comm import ChecksumMismatchError, Communicator, PeerError
from ..layout import index_tensors, resolve_backend
from ..passes import PassWork, upload_rows
from . import hooks
from .staging import _fill_send_trailers, _Job, _per_peer, _PreparedLayer, _trailers, bind_swaps, upload_prepared

log = logging.getLogger("eplb_triton.worker")  # one logger for the package (documented name)

_POLL_MIN_S = 20e-6  # first sleep of a poll loop: the GIL is free for the serving thread meanwhile
_POLL_MAX_S = 2e-4  # longest sleep: bounds the latency added to a layer that just finished (a
# layer of a reference config moves in 0.1-0.7 ms on NVLink: a 1 ms cap added up to 1 ms per layer)
_DRAIN_STREAM_S = 30.0  # how long a drain waits for the transfer stream before giving up


class _Stopped(Exception):
    """Raised inside the worker thread when close() or a peer's failure stops it."""


class ThreadMixin:
    """The :class:`~eplb_triton.worker.TransferWorker` part that runs on the worker thread,
    and :meth:`_shutdown`, which stops it."""

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
        if self._stream is not None:  # every pass's row lists in one copy, on the worker stream
            upload_rows([work for prepared in job.prepared_layers for work in prepared.layer.passes], self._device)
            # and each swap's rows (with the layer's local sources and duplicate positions) in
            # another, so step() launches its unpack without host work on the rows
            upload_prepared(job.prepared_layers, self._device)
            bind_swaps(job, self._device)
        # Layers are queued on the worker stream ahead of their publication, as far as the
        # staging buffers allow: a layer is published (its event polled) once it has finished,
        # checked between queueing later layers, so the GPU never idles while this thread
        # polls and publishes (it used to publish layer i before queueing layer i + 2 whatever
        # the buffers; that alone did not pace it: session 8, runs 32-33).
        in_flight: deque = deque()  # (index, prepared, checks, done, begin), oldest first
        for index, prepared in enumerate(job.prepared_layers):
            if not job.gate.allows(index):  # paced: offer what is queued, then wait for credit
                self._publish_in_flight(job, in_flight)
                self._wait_gate(job, index)
            self._publish_in_flight(job, in_flight, only_finished=True)
            begin = time.perf_counter()
            job.layer = prepared.layer.index
            if prepared.nbytes:
                self._await_staging_buffer(job, index, in_flight)
            checks = self._transfer_layer(job, index, prepared)
            if self._stream is None:  # CPU: the transfer already ran; nothing to overlap
                self._publish(job, index, prepared, checks, None, begin)
                continue
            done = hooks._cuda.Event()
            done.record(self._stream)
            in_flight.append((index, prepared, checks, done, begin))
        self._publish_in_flight(job, in_flight)

    def _await_staging_buffer(self, job: _Job, index: int, in_flight: deque) -> None:
        """Wait until layer ``index``'s staging buffer is free: the layer that used it before
        (``index - layers_ahead``) swapped on the host, and its swap's unpack ordered before
        this layer's writes on the worker stream. Queued layers that finish meanwhile are
        published, so one step() may swap them all."""
        ahead = len(job.staging_buffers)
        while in_flight and in_flight[0][0] <= index - ahead:  # must be swapped: offered first
            self._publish(job, *in_flight.popleft())
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or job.swapped >= index - ahead + 1, timeout=_POLL_MAX_S if in_flight else None)
                if self._stop:
                    raise _Stopped
                if job.swapped >= index - ahead + 1:
                    event = job.staging_of(index).event
                    break
            self._publish_in_flight(job, in_flight, only_finished=True)
        if event is not None:
            self._stream.wait_event(event)  # GPU-side: the swap's unpack has read the buffer

    def _publish_in_flight(self, job: _Job, in_flight: deque, only_finished: bool = False) -> None:
        """Publish the queued layers in order: all of them (waiting for each), or with
        ``only_finished`` those whose transfer has already finished (no wait)."""
        while in_flight:
            if only_finished and not in_flight[0][3].query():
                return
            self._publish(job, *in_flight.popleft())

    def _wait_gate(self, job: _Job, index: int) -> None:
        """Block until the pace lets layer ``index`` start (a step() call or wait()), or stop.

        Nothing is posted meanwhile: every rank's gate opens at the same step, so no peer
        waits in an exchange for this rank (see :mod:`eplb_triton.pacing`)."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop or job.gate.allows(index))
            if self._stop:
                raise _Stopped

    def _publish(self, job: _Job, index: int, prepared: _PreparedLayer, checks: list, done, begin: float) -> None:
        """Wait until layer ``index``'s transfer ran (``done``), check it, and offer it to step()."""
        in_flight, job.layer = job.layer, prepared.layer.index  # a failure here is this layer's
        self._finish_stream(event=done)
        if checks:
            self._check_received(job, prepared, checks)
        hooks.fault("before_publish", rank=self._transfer.rank, layer=prepared.layer.index)
        count = prepared.layer.layer_count  # a stack's time is shared equally by its layers
        with self._cond:
            job.stats.layer_times_s.extend([(time.perf_counter() - begin) / count] * count)
            job.published = index + 1
            self._cond.notify_all()
        job.layer = in_flight

    def _transfer_layer(self, job: _Job, index: int, prepared: _PreparedLayer) -> list:
        """Stage every row this rank writes in the layer; reads live weights, writes none.

        Returns, with ``verify``, ``(pass work, buffer offset, mismatch flags)`` per pass
        that received experts; the flags are checked once the stream has finished.
        """
        layout, eb, backend = prepared.layer.layout, prepared.layer.layout.expert_bytes, job.backend
        rank, layer_index = self._transfer.rank, prepared.layer.index
        staging = job.staging_of(index)
        hooks.fault("layer_start", rank=rank, layer=layer_index)
        buf = staging.buffer[: prepared.nbytes]
        if prepared.local_src.size:
            local = buf[prepared.local_offset : prepared.local_offset + prepared.local_src.size * eb]
            with self._kernel_lock:
                if prepared.device_lists is not None:
                    layout.move("pack", local, src_rows=prepared.device_lists["local_src"], backend=backend)
                else:
                    layout.pack(prepared.local_src, local, backend=backend)
        checks = []
        passes = len(prepared.layer.passes)
        for number, (work, offset) in enumerate(zip(prepared.layer.passes, prepared.recv_offsets)):
            if self._stop:
                raise _Stopped
            send_buf = job.send_buffer[: work.send_rows.size * eb]
            recv_buf = buf[offset : offset + work.recv_rows.size * eb]
            where = f"layer {layer_index}, pass {number + 1}/{passes}"
            mover = self._mover(job, work)
            if job.verify:  # framed: data, then a second batch with the checksum trailers
                if work.send_rows.size:
                    with self._kernel_lock:
                        layout.pack(work.send_rows, send_buf, backend=backend)
                sends = _per_peer(send_buf, work.send_peers, work.send_counts, eb)
                recvs = _per_peer(recv_buf, work.recv_peers, work.recv_counts, eb)
            hooks.fault("before_send", rank=rank, layer=layer_index, pass_index=number)
            job.cursor = (index, number + 1)  # posted (even if posting fails): never re-posted by a drain
            # gloo: blocks this thread (GIL released); NCCL: the worker stream waits, the host does not.
            try:  # posting fails too when a peer's connection is already closed
                if job.verify:
                    requests, labels = self._post(job, work, send_buf, sends, recvs, where=where, comm=mover)
                else:  # the executor's batches: packs piece by piece, posts as it goes
                    requests, labels, _ = work.post_batches(
                        layout, send_buf, recv_buf, mover, backend, launch_lock=self._kernel_lock, where=where
                    )
                    work.release()
                    recvs = work.recv_messages_in(recv_buf)
                mover.wait(requests, timeout_s=self.timeout_s, labels=labels, where=where)
            except PeerError as exc:
                exc.layer = layer_index
                job.broken = True  # the group is unusable: no drain
                raise
            prepared.layer.count_pass(work, job.stats, [len(labels)])
            hooks.fault("in_flight", rank=rank, layer=layer_index, pass_index=number, received=recvs)
            if job.verify and work.recv_rows.size:
                received = torch.cat(
                    [t[: c * CHECKSUM_BYTES].view(torch.int64) for t, c in zip(
                        _trailers(job.recv_trailers, work.recv_peers, work.recv_counts).values(), work.recv_counts
                    )]
                )
                data = buf[offset : offset + work.recv_rows.size * eb]
                with self._kernel_lock:
                    checks.append((number, work, expert_checksums(data, eb) != received))
                job.stats.verified_experts += int(work.recv_rows.size)
        if prepared.dup_dst_pos.size:  # replicas: copies of packed experts already in the buffer
            table = buf.view(-1, eb)
            lists = prepared.device_lists
            if lists is None:
                lists = index_tensors({"dup_src": prepared.dup_src_pos, "dup_dst": prepared.dup_dst_pos}, buf.device)
            table[lists["dup_dst"]] = table[lists["dup_src"]]
        return checks

    def _mover(self, job: _Job, work: PassWork):
        """What moves ``work``'s bytes: the transfer group, or the pass's p2p exchange (with
        ``verify`` the trailers follow all the data in the send buffer: two pulls per peer)."""
        if job.p2p is None:
            return self._transfer
        return job.p2p.exchange_for(work.pass_traffic, work.expert_bytes, verify=job.verify, split=job.verify)

    def _post(
        self, job: _Job, work: PassWork, send_buf: torch.Tensor, sends: dict, recvs: dict, where: str = "exchange",
        comm=None,
    ) -> tuple[list, list]:
        """Start a pass's exchange (and with ``verify`` its trailers' exchange, right after).

        Two batches per pass with ``verify``: every rank posts them in the same order, so
        each peer pair matches data with data and trailer with trailer. ``comm``: the pass's
        mover (default: the transfer group).
        """
        comm = self._transfer if comm is None else comm
        if job.p2p is not None:  # the trailers right after the data, where peers read them
            job.send_trailers = job.send_buffer[send_buf.numel() :]
        requests = comm.exchange(sends, recvs, where=where)
        labels = Communicator.op_labels(sends, recvs)
        if job.verify:
            with self._kernel_lock:
                trailer_sends = _fill_send_trailers(job, work, send_buf)
            trailer_recvs = _trailers(job.recv_trailers, work.recv_peers, work.recv_counts)
            requests = requests + comm.exchange(trailer_sends, trailer_recvs, where=f"{where}, checksums")
            labels = labels + Communicator.op_labels(trailer_sends, trailer_recvs)
        return requests, labels

    def _check_received(self, job: _Job, prepared: _PreparedLayer, checks: list) -> None:
        """Raise :class:`ChecksumMismatchError` for the first received expert whose checksum differs."""
        rank, layer_index = self._transfer.rank, prepared.layer.index
        for number, work, flags in checks:
            bad = torch.nonzero(flags.cpu()).flatten().tolist()
            if not bad:
                continue
            position = bad[0]
            peers = np.repeat(np.asarray(work.recv_peers, dtype=np.int64), work.recv_counts)
            peer, row = int(peers[position]), int(work.recv_rows[position])
            expert = prepared.layer.expert_at(rank, row)
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            message = (
                f"layer {layer_index}, pass {number + 1}/{len(prepared.layer.passes)}: rank {rank}: checksum mismatch "
                f"for expert {expert} received from peer {peer} (row {row}){more}; layer {layer_index} was not applied"
            )
            log.error("%s", message)
            raise ChecksumMismatchError(message, layer=layer_index, peer=peer, expert=expert)

    def _drain(self, job: _Job) -> None:
        """Post every exchange of the job this rank has not posted yet, with junk, and wait.

        Stopping mid-job must not leave a peer blocked in an exchange that expects ours (nor
        leave unmatched ops in the group), so on close() or after a failure the remaining
        exchanges run anyway: junk sent, received bytes dropped, no staging buffer touched, no swap.
        Every rank posts each exchange exactly once, so all of them complete as soon as every
        rank has stopped; a peer that crashed makes them fail at once instead. With
        ``verify`` the junk carries its true checksums, so a peer still transferring does
        not report a mismatch of its own (it never swaps those layers: this rank never
        published them). Each exchange waits at most ``timeout_s``; after a peer error (the
        group is broken) or a failed step agreement nothing is drained.
        """
        if job.broken or self._abandon:
            log.info("rank %d: not draining a broken transfer group", self._transfer.rank)
            return
        first_layer, first_pass = job.cursor
        pending = [
            (prepared, number)
            for prepared in job.prepared_layers[first_layer:]
            for number in range(first_pass if prepared is job.prepared_layers[first_layer] else 0, len(prepared.layer.passes))
        ]
        try:
            junk_recv = None
            for prepared, number in pending:
                if self._abandon:
                    return
                work, eb = prepared.layer.passes[number], prepared.layer.layout.expert_bytes
                need = work.recv_rows.size * eb
                if junk_recv is None or junk_recv.numel() < need:
                    junk_recv = torch.empty(need, dtype=torch.uint8, device=self._device)
                send_buf = job.send_buffer[: work.send_rows.size * eb]
                where = f"drain: layer {prepared.layer.index}, pass {number + 1}/{len(prepared.layer.passes)}"
                mover = self._mover(job, work)
                if job.verify:
                    sends = _per_peer(job.send_buffer, work.send_peers, work.send_counts, eb)
                    recvs = _per_peer(junk_recv, work.recv_peers, work.recv_counts, eb)
                    requests, labels = self._post(job, work, send_buf, sends, recvs, where=where, comm=mover)
                else:  # the same batches as a peer still transferring posts
                    requests, labels, _ = work.post_batches(
                        prepared.layer.layout, send_buf, junk_recv, mover, job.backend, pack=False, where=where
                    )
                mover.wait(requests, timeout_s=self.timeout_s, labels=labels, where=where)
            self._finish_stream(deadline=time.monotonic() + _DRAIN_STREAM_S)
            self._drained = True
            if pending:
                log.info("rank %d: drained %d exchanges of an unfinished rearrangement", self._transfer.rank, len(pending))
        except BaseException:  # noqa: BLE001 - the first error (if any) is already recorded
            log.warning("rank %d: draining the transfer group failed", self._transfer.rank, exc_info=True)

    def _finish_stream(self, deadline: float | None = None, event: torch.cuda.Event | None = None) -> None:
        """Wait until the worker stream has run everything queued: the layer may be swapped.

        An event poll rather than ``stream.synchronize()``: close() stays responsive, and a
        drain gives up at ``deadline`` (a NCCL op whose peer is gone never completes).
        """
        if self._stream is None:
            return
        if event is None:
            event = hooks._cuda.Event()
            event.record(self._stream)
        delay = _POLL_MIN_S
        while not event.query():
            if deadline is None and self._stop:
                raise _Stopped
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the transfer stream did not finish (a NCCL peer is gone?)")
            time.sleep(delay)
            delay = min(2 * delay, _POLL_MAX_S)

    def _shutdown(self, timeout_s: float = 10.0) -> None:
        if self._job is not None:  # what stays readable once the job is dropped
            self._last_progress = self._progress_of(self._job)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._closed = True
        if self._board is not None:  # only step() reads it, on this (the serving) thread
            self._board.close()
        if self._thread.is_alive():
            log.warning(
                "rank %d: the transfer thread is still draining after %.1f s (a peer has not closed yet?); "
                "it ends when the peers' exchanges complete or the transfer group times out",
                self._transfer.rank, timeout_s,
            )
            return
        if self._drained:  # no p2p op is pending: the job's buffers and our groups may go
            self._job = None
            self._release_owned_groups()
            if self._p2p is not None:
                self._p2p.close()
                self._p2p = None

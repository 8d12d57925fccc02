"""The step agreement and the failure protocol of the serving thread.

Every ``step()`` agrees on ``min(published)`` over the ranks on the control group, bounded by
``timeout_s``; a failure on any rank's worker is shared (kind, layer, peer, expert, message)
so every rank raises in the same step, and a failed agreement probes the peers to name the
one that exited or stalled.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from ..comm import ChecksumMismatchError, PeerError, PeerFailedError, PeerTimeoutError, TransferError

log = logging.getLogger("eplb_triton.worker")  # one logger for the package (documented name)

_MESSAGE_BYTES = 480  # failure message bytes each rank shares when a worker fails

# failure kinds shared with the peers (see TransferWorker._share_failures)
_KIND_OTHER, _KIND_PEER_FAILED, _KIND_PEER_TIMEOUT, _KIND_CHECKSUM = 1, 2, 3, 4
_KIND_CLASSES = {_KIND_PEER_FAILED: PeerFailedError, _KIND_PEER_TIMEOUT: PeerTimeoutError, _KIND_CHECKSUM: ChecksumMismatchError}


def _kind_of(error: BaseException) -> int:
    if isinstance(error, ChecksumMismatchError):
        return _KIND_CHECKSUM
    if isinstance(error, PeerTimeoutError):
        return _KIND_PEER_TIMEOUT
    if isinstance(error, PeerError):
        return _KIND_PEER_FAILED
    return _KIND_OTHER


def _agreement_grace_s(timeout_s: float) -> float:
    """Extra time a rank waits in the step agreement beyond ``timeout_s``.

    A rank gives up after ``timeout_s + grace``; every rank that completes the agreement
    raises when the ranks' entry times are more than ``timeout_s`` apart. So either the
    entries were close and nobody gave up, or every rank fails, as long as clock skew plus
    transport stay below the grace.
    """
    return max(0.5, 0.25 * timeout_s)


class AgreementMixin:
    """The :class:`~eplb_triton.worker.TransferWorker` part that agrees with the peers."""

    def _agree_ready(self, ready: int, failed: bool, lift: bool = False) -> tuple[int, bool]:
        """min(ready) over ranks, and whether any rank asks to lift the pace (``wait()``);
        raises on every rank when any rank's worker failed.

        Bounded by ``timeout_s`` (plus a grace): a peer that exited or stopped calling
        ``step()`` makes it raise instead of hanging. Each rank also contributes its entry
        time; when they are more than ``timeout_s`` apart some rank has given up, so every
        rank that completes it raises too (no rank swaps what the others abandoned).
        """
        comm = self._control
        if comm.world_size == 1:
            if failed:
                self._raise_failure()
            return ready, lift
        agree = self._agree_on_board if self._board is not None else self._agree_on_group
        ready, any_failed, any_lift, spread_s = agree(ready, failed, lift)
        if self.timeout_s is not None and spread_s > self.timeout_s:
            self._agreement_failed(None, f"found the ranks reached it {spread_s:.2f} s apart, so the earliest gave up")
        if any_failed:
            self._raise_failure()
        return ready, any_lift

    def _agree_on_group(self, ready: int, failed: bool, lift: bool) -> tuple[int, bool, bool, float]:
        """``(min ready, any failed, any lift, entry spread in s)`` by one MAX all-reduce on the
        gloo control group (the spread only with ``timeout_s``; 0 without)."""
        comm = self._control
        now_us = int(time.time() * 1e6)  # wall clock: comparable across hosts (NTP)
        flags = torch.tensor([-ready, int(failed), now_us, -now_us, int(lift)], dtype=torch.int64)
        spread_s = 0.0
        if self.timeout_s is None:
            try:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=comm.group)
            except Exception as exc:  # noqa: BLE001 - a peer's closed connection, say: name it as such
                raise PeerFailedError(f"step agreement: rank {comm.rank}: {exc}", layer=self._next_layer()) from exc
        else:
            try:
                comm.all_reduce_max(flags, timeout_s=self.timeout_s + _agreement_grace_s(self.timeout_s))
            except PeerError as exc:
                self._agreement_failed(exc, "got no answer from every rank")
            spread_s = (int(flags[2]) + int(flags[3])) / 1e6
        return -int(flags[0]), bool(flags[1]), bool(flags[4]), spread_s

    def _agree_on_board(self, ready: int, failed: bool, lift: bool) -> tuple[int, bool, bool, float]:
        """:meth:`_agree_on_group` over the shared-memory :class:`~eplb_triton.worker.board.StepBoard`
        (one host), with the same outcomes: without ``timeout_s`` it waits until every rank posted
        or a missing rank's process is gone (:class:`PeerFailedError`, as a closed gloo connection
        was), at most gloo's default group timeout (:class:`PeerTimeoutError`); with it, the same
        bound and probe as the all-reduce."""
        comm = self._control
        if self.timeout_s is None:  # as long as the gloo all-reduce would have waited (its group's default)
            limit = dist.default_pg_timeout.total_seconds()
        else:
            limit = self.timeout_s + _agreement_grace_s(self.timeout_s)
        try:
            return self._board.agree(ready, failed, lift, timeout_s=limit)
        except PeerError as exc:
            if self.timeout_s is None:
                cls = PeerTimeoutError if isinstance(exc, PeerTimeoutError) else PeerFailedError
                raise cls(f"step agreement: rank {comm.rank}: {exc}", layer=self._next_layer(), peer=exc.peer) from exc
            self._agreement_failed(exc, "got no answer from every rank")
            raise  # not reached: _agreement_failed raises

    def _next_layer(self) -> int | None:
        job = self._job
        return job.prepared_layers[job.swapped].layer.index if job is not None and job.swapped < len(job.prepared_layers) else None

    def _agreement_failed(self, cause: PeerError | None, what: str) -> None:
        """The step agreement failed (a peer exited or stalled): stop and raise on this rank.

        The worker thread is stopped without draining (its peers are failing too) and given
        up to ``timeout_s`` to finish its current exchange, whose own deadline is
        ``timeout_s``: when that exchange failed, its error (naming layer and peer) is the
        one raised; otherwise a :class:`PeerError` naming the next layer to swap.
        """
        job = self._job
        self._abandon = True
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        begin = time.monotonic()
        missing = None
        if not (isinstance(self._error, PeerError) and self._error.peer is not None):
            missing = self._probe_peers()
        self._thread.join(max(0.0, self.timeout_s - (time.monotonic() - begin)))
        error = self._error
        self._shutdown(timeout_s=0.0)
        next_layer = None
        if job is not None and job.swapped < len(job.prepared_layers):
            next_layer = job.prepared_layers[job.swapped].layer.index
        text = (
            f"step agreement: rank {self._control.rank} {what} within {self.timeout_s:g} s (timeout_s): a peer exited, "
            "stalled or stopped calling step()"
        )
        if cause is not None:  # all_reduce_max words every failure as the input agreement's
            text += f" [{str(cause).replace('input agreement: ', '')}]"
        log.error("%s", text)
        if isinstance(error, TransferError) and error.peer is not None:  # this rank's worker knows where
            error.add_note(f"surfaced when the {text}")
            raise error
        if missing is not None:
            text = f"{text}; peer {missing.peer} did not answer a probe ({missing})"
        suffix = f"; layers from {next_layer} on keep their old weights" if next_layer is not None else ""
        if missing is not None:
            cls = type(missing)
        else:
            cls = PeerFailedError if isinstance(cause, PeerFailedError) else PeerTimeoutError
        raise cls(text + suffix, layer=next_layer, peer=None if missing is None else missing.peer) from (error or cause)

    def _probe_peers(self) -> PeerError | None:
        """After a failed step agreement: find a peer that is gone or stalled, to name it.

        One tiny isend + irecv per peer on the control group (:meth:`Communicator.confirm`),
        each waited on in peer order for ``timeout_s`` plus the grace: every rank that saw
        the agreement fail probes too, within that time of each other (a rank whose
        agreement failed at once waits for one that timed out), so the first peer that does
        not answer is one that exited or stopped calling ``step()``.
        """
        try:
            self._control.confirm(
                True, timeout_s=self.timeout_s + _agreement_grace_s(self.timeout_s), where="step agreement probe"
            )
        except PeerError as exc:
            return exc if exc.peer is not None else None
        except Exception:  # noqa: BLE001 - a backend error while posting: no peer to name
            log.debug("rank %d: probing the peers failed", self._control.rank, exc_info=True)
        return None

    def _share_failures(self, error: BaseException | None) -> list[tuple[int, int | None, int | None, int | None, str] | None]:
        """Every rank's failure, as ``(kind, layer, peer, expert, message)`` or ``None``.

        One MAX all-reduce of a ``(world, ...)`` table where each rank fills its own row, so
        it is bounded by ``timeout_s`` like the step agreement (``all_gather_object`` is not).
        """
        comm = self._control
        width = 6 + _MESSAGE_BYTES
        table = torch.zeros(comm.world_size, width, dtype=torch.int64)
        if error is not None:
            job = self._job
            layer = getattr(error, "layer", None)
            if layer is None and job is not None:
                layer = job.layer
            peer = getattr(error, "peer", None)
            expert = getattr(error, "expert", None)
            text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:_MESSAGE_BYTES]
            row = table[comm.rank]
            row[:6] = torch.tensor(
                [1, _kind_of(error), -1 if layer is None else layer, -1 if peer is None else peer, -1 if expert is None else expert, len(text)]
            ) + torch.tensor([0, 0, 1, 1, 1, 0])
            row[6 : 6 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int64)
        if comm.world_size > 1:
            timeout = None if self.timeout_s is None else self.timeout_s + _agreement_grace_s(self.timeout_s)
            try:
                comm.all_reduce_max(table, timeout_s=timeout)
            except PeerError as exc:
                if error is not None:
                    raise error from None
                self._agreement_failed(exc, "could not learn the failing rank's error")
        out = []
        for row in table.tolist():
            if not row[0]:
                out.append(None)
                continue
            opt = lambda v: None if v == 0 else v - 1  # noqa: E731
            message = bytes(row[6 : 6 + row[5]]).decode("utf-8", "replace")
            out.append((row[1], opt(row[2]), opt(row[3]), opt(row[4]), message))
        return out

    def _raise_failure(self) -> None:
        error = self._error
        failures = self._share_failures(error)
        self._shutdown()
        if error is not None:
            raise error  # the worker thread's exception, with its original traceback
        failing = [(r, f) for r, f in enumerate(failures) if f is not None]
        ranks = [r for r, _ in failing]
        details = "; ".join(f"rank {r}: {f[4]}" for r, f in failing)
        first_rank, (kind, layer, peer, expert, _) = failing[0]
        text = (
            f"the transfer worker failed on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
            f"({details}); layers not swapped yet keep their old weights"
        )
        cls = _KIND_CLASSES.get(kind, TransferError)
        if cls is TransferError:
            peer = first_rank  # the rank that failed
        if cls is ChecksumMismatchError:
            raise ChecksumMismatchError(text, layer=layer, peer=peer, expert=expert)
        raise cls(text, layer=layer, peer=peer)

"""The step agreement over shared memory, for the ranks of one host.

Every ``step()`` of a :class:`~eplb_triton.TransferWorker` agrees with its peers on ``min(ready)``
(and whether any rank failed or asks to lift the pace). Over the gloo control group that is one
all-reduce per step: 200-260 us of the serving thread's time on the H200 hosts (run 46's phases,
``bench/results/gpu-session-h200x2-run46.log``), 430 us on the 2-core CI machine, paid every
forward pass. When every rank of the EP group runs on one host and maps the same shared memory, a
:class:`StepBoard` replaces it: each rank writes its entry into its own slot of a small file in
``/dev/shm`` and reads the others' slots, which costs microseconds once they have all arrived.

Layout (64-bit words): a header (magic, nonce, world size), then per rank two slots (by step
parity) of two words::

    word 0: step << 32 | ready << 8 | lift << 1 | failed     (step: this board's step count, 1 to 2**32 - 2)
    word 1: (step mod 2**16) << 48 | entry time in ms       (the wall clock: the spread check)

A rank writes word 1, then word 0, each one aligned 8-byte store (whole on any CPU: no torn
word), and reads a peer's slot once both words carry the step's number. Rank ``r`` writes step
``k`` into slot ``k % 2``: it cannot reach step ``k + 2`` before every rank posted step ``k + 1``,
which each does only after reading step ``k``, so no slot is overwritten while being read.

A peer that never posts: the wait gives up after ``timeout_s`` (:class:`PeerTimeoutError` naming
the ranks missing; the worker passes its own ``timeout_s``, or torch's default group timeout as
the all-reduce had), and a peer whose process is gone (``/proc``: exited, or a zombie) ends it
at once with :class:`PeerFailedError` naming that peer.

Made by :meth:`StepBoard.create`, collectively, where every rank can open the file rank 0 made
(the same host and ``/dev/shm``) and see every peer's process (the same PID namespace); else
every rank keeps the gloo all-reduce (agreed). The file is unlinked as soon as every rank mapped
it, so nothing is left behind even if a process dies. ``EPLB_TRITON_STEP_BOARD=0`` turns it off
(on any rank: the choice is agreed).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import socket
import sys
import time

import numpy as np
import torch

from ..comm import Communicator, PeerFailedError, PeerTimeoutError
from ..settings import int_setting

__all__ = ["BOARD_ENV", "StepBoard"]

BOARD_ENV = "EPLB_TRITON_STEP_BOARD"  # 0: the step agreement stays a gloo all-reduce
SHM_DIR = "/dev/shm"
_MAGIC = 0x45504C4253544550  # "EPLBSTEP"
_HEADER_WORDS = 8
_READY_LIMIT = 1 << 24  # ready fits 24 bits of word 0
_LIVENESS_S = 0.05  # how often a long wait looks at the missing peers' processes
# Pauses between two reads of the board: yield at first (in a serving loop the ranks reach
# step() within microseconds of each other, their forward passes end in a collective), then
# sleep, so a long wait leaves the cores to the others. Short: while this (serving) thread
# yields, the worker thread of this process may not get the GIL back from it.
_SPIN_S, _SHORT_WAIT_S = 2e-4, 5e-3


def _pause(waited_s: float) -> None:
    time.sleep(0 if waited_s < _SPIN_S else 1e-4 if waited_s < _SHORT_WAIT_S else 1e-3)


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or
    None when the process is gone or a zombie (exited, not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _host_id() -> int:
    """This host's name as a 62-bit number (compared across ranks)."""
    return int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:8], "little") >> 2


class StepBoard:
    """A shared-memory step agreement among the ranks of one host (see the module docstring)."""

    def __init__(self, words: np.ndarray, mapped: mmap.mmap, rank: int, world_size: int, pids: list[int], starts: list[int]):
        self._words, self._mapped = words, mapped
        self.rank, self.world_size = rank, world_size
        self._pids, self._starts = pids, starts
        self._step = 0

    # -- agreement -----------------------------------------------------------------------
    def agree(self, ready: int, failed: bool, lift: bool, *, timeout_s: float | None = None) -> tuple[int, bool, bool, float]:
        """Post this rank's entry for the next step and wait for every rank's:
        ``(min ready, any failed, any lift, spread_s)``, ``spread_s`` being how far apart (wall
        clock) the ranks posted. Collective: every rank calls it equally often.

        Raises :class:`PeerTimeoutError` (``peer``: the first rank missing) when some rank
        posted nothing within ``timeout_s``, :class:`PeerFailedError` when a missing rank's
        process is gone."""
        if not 0 <= ready < _READY_LIMIT:
            raise ValueError(f"ready must be in [0, {_READY_LIMIT}), got {ready}")
        step = self._step % 0xFFFFFFFE + 1  # never 0 (a slot nobody wrote reads 0); an even period keeps the parity alternating
        self._step += 1
        parity = step & 1
        now_ms = int(time.time() * 1e3)
        at = self._slot(self.rank, parity)
        self._words[at + 1] = ((step & 0xFFFF) << 48) | (now_ms & ((1 << 48) - 1))
        self._words[at] = (step << 32) | (ready << 8) | (int(bool(lift)) << 1) | int(bool(failed))
        entries = self._wait_all(step, parity, timeout_s)
        readies = [(w >> 8) & (_READY_LIMIT - 1) for w, _ in entries]
        times = [t & ((1 << 48) - 1) for _, t in entries]
        return (
            min(readies),
            any(w & 1 for w, _ in entries),
            any(w & 2 for w, _ in entries),
            (max(times) - min(times)) / 1e3,
        )

    def _slot(self, rank: int, parity: int) -> int:
        return _HEADER_WORDS + (2 * rank + parity) * 2

    def _wait_all(self, step: int, parity: int, timeout_s: float | None) -> list[tuple[int, int]]:
        """Every rank's ``(word 0, word 1)`` for ``step``, waiting for those not posted yet."""
        words, tag = self._words, step & 0xFFFF
        entries: list = [None] * self.world_size
        missing = list(range(self.world_size))
        begin = time.monotonic()
        looked = begin
        while True:
            still = []
            for rank in missing:
                at = self._slot(rank, parity)
                first = int(words[at])
                if first >> 32 == step:
                    second = int(words[at + 1])
                    if second >> 48 == tag:  # written before word 0: visible by now on most CPUs, else soon
                        entries[rank] = (first, second)
                        continue
                still.append(rank)
            missing = still
            if not missing:
                return entries
            now = time.monotonic()
            if now - looked > _LIVENESS_S:
                looked = now
                self._check_alive(missing, step)
            if timeout_s is not None and now - begin > timeout_s:
                raise PeerTimeoutError(
                    f"step board: rank {self.rank} waited {timeout_s:g} s for rank(s) {missing} to post step {step}",
                    peer=missing[0],
                )
            _pause(now - begin)

    def _check_alive(self, ranks: list[int], step: int) -> None:
        for rank in ranks:
            if _start_time(self._pids[rank]) != self._starts[rank]:
                raise PeerFailedError(
                    f"step board: rank {rank}'s process {self._pids[rank]} is gone (it posted no step {step})", peer=rank
                )

    def close(self) -> None:
        """Unmap the board (local; idempotent). Peers keep their own mappings."""
        if self._mapped is not None:
            self._words = None
            try:
                self._mapped.close()
            except BufferError:  # a view still exported (cannot happen here): leave it to the GC
                pass
            self._mapped = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, comm: Communicator, *, timeout_s: float | None = None) -> "StepBoard | None":
        """A board over ``comm``'s ranks where every rank can map it, else None on every rank.

        Collective over ``comm`` (a CPU group: two small all-reduces, each bounded by
        ``timeout_s``). Rank 0 creates the file; it is unlinked once every rank has answered."""
        world, rank = comm.world_size, comm.rank
        if world == 1:
            return None
        wanted = bool(int_setting(BOARD_ENV, 1, minimum=0, what="0 or 1")) and sys.platform.startswith("linux") and os.path.isdir(SHM_DIR)
        start = _start_time(os.getpid()) if wanted else None
        nbytes = 8 * (_HEADER_WORDS + 4 * world)
        path, mapped, nonce = None, None, 0
        if rank == 0 and wanted and start is not None:
            try:
                nonce = secrets.randbits(62) | 1
                path = os.path.join(SHM_DIR, f"eplb_triton-step-{os.getpid()}-{nonce:016x}")
                mapped = _map(path, nbytes, create=True)
                words = np.frombuffer(mapped, dtype=np.uint64)
                words[1], words[2], words[0] = nonce, world, _MAGIC
                del words
            except OSError:
                path, mapped, nonce = _drop(path, mapped), None, 0
        # every rank's (able, host, pid, start time); rank 0 adds the file's nonce and its pid
        table = torch.zeros(world, 5, dtype=torch.int64)
        able = wanted and start is not None and (rank != 0 or mapped is not None)
        table[rank] = torch.tensor([int(able), _host_id() if able else 0, os.getpid(), start or 0, nonce])
        try:
            comm.all_reduce_max(table, timeout_s=timeout_s)
            rows = table.tolist()
            ok = all(row[0] for row in rows) and len({row[1] for row in rows}) == 1
            pids, starts = [row[2] for row in rows], [row[3] for row in rows]
            if ok and rank != 0:
                ok = False
                path = os.path.join(SHM_DIR, f"eplb_triton-step-{pids[0]}-{rows[0][4]:016x}")
                try:
                    mapped = _map(path, nbytes, create=False)
                    words = np.frombuffer(mapped, dtype=np.uint64)
                    ok = int(words[0]) == _MAGIC and int(words[1]) == rows[0][4] and int(words[2]) == world
                    del words
                except OSError:
                    mapped = None
            if ok:  # the same process table: each peer's start time as it saw it itself
                ok = all(_start_time(pid) == s for pid, s in zip(pids, starts))
            verdict = torch.tensor([0 if ok else 1], dtype=torch.int64)
            comm.all_reduce_max(verdict, timeout_s=timeout_s)
        finally:
            if rank == 0 and path is not None:
                _drop(path, None)  # every rank answered: mapped by now, or not at all
        if int(verdict[0]) or mapped is None:
            if mapped is not None:
                mapped.close()
            return None
        return cls(np.frombuffer(mapped, dtype=np.uint64), mapped, rank, world, pids, starts)


def _map(path: str, nbytes: int, *, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        elif os.fstat(fd).st_size != nbytes:
            raise OSError(f"{path}: {os.fstat(fd).st_size} bytes, expected {nbytes}")
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _drop(path: str | None, mapped: mmap.mmap | None) -> None:
    if mapped is not None:
        mapped.close()
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass
    return None

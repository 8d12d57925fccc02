"""A second transport inside one node: peers pull each other's packed experts over NVLink.

(Over 400 lines: the transport, its agreement on buffer sizes and its device barriers read as one.)

``transport="nccl"`` (the process group's own isend/irecv, :mod:`eplb_triton.comm`) moves the
bytes with NCCL kernels, which take SMs from the forward pass. ``transport="p2p"`` moves them
with the copy engines: every rank of the EP group maps a *symmetric* staging buffer of every
other rank (``torch.distributed._symmetric_memory``: one allocation per rank, the same size
everywhere, exchanged once), and each receiver copies its messages straight out of the
senders' buffers (``dst.copy_(peer_view)``: a device-to-device memcpy, no SM).

One exchange (one staging pass of one layer, or a stack)::

    caller's stream:  pack sends into MY symmetric send region (the slot's offset)
    side stream (waits for the caller's stream up to that pack):
        barrier  -- every rank packed; every peer has finished reading my previous pass here
        for each peer p that sends to me:
            my receive region[p]  <-  copy  <-  p's send region[offset of p's message to me]
        barrier  -- every rank's pulls are done: senders may overwrite their send region
        record an event
    caller's stream: wait for the event; unpack / verify as today

The pulls and barriers run on the transport's own side stream, so the caller's packs and
unpacks of the other slot run beside them: with a budget of two layers' staging the blocking
loop alternates two slots of the buffer (:func:`acquire_slots` agrees their size and count, so a
sender's messages lie at the same offset on every rank), packing layer ``i + 1`` while layer
``i`` is pulled, as the NCCL path does with NCCL's own stream. The barrier is torch's
symmetric-memory barrier: a one-block kernel (``handle.barrier(channel=0)``), so the host never
waits for the device per layer; with ``timeout_s`` the host polls the exchange's event against
the deadline, as :meth:`Communicator.wait` polls NCCL requests.

A pushed pass (the blocking call's one-pass layers, :attr:`PassWork.pushed`, the default) moves
the bytes with SMs instead, all on the caller's stream: the pack kernel writes each peer's rows
straight into that peer's slot (:func:`receive_spans`: receives in ascending sender order from
the slot's start), then one barrier; with two slots that one barrier per layer also frees the
slot for the layer after next (:meth:`_PassExchange.push_packed`), and the blocking loop writes
layer ``i`` with layer ``i + 1``'s pack in one launch (:func:`eplb_triton.layout.move_pair`).

Where a peer's message lies in its send region is not communicated: every rank holds the
global plan, and a round's ``traffic`` matrix (experts each rank sends to each other rank)
fixes every sender's layout (messages in ascending receiver order, each ``count *
expert_bytes`` plus, with ``verify``, its checksum trailer; the worker's ``verify`` keeps the
trailers after all the data: :func:`message_spans`). Every exchange also checks that this
rank's own sends sit exactly where its peers will look for them (the same function applied
to its own row), so a layout bug raises instead of moving wrong bytes.

Buffer sizes are agreed without a round trip where the plan fixes them (the worker: the
largest send region of any rank in any round), else with one small all-reduce per call (the
blocking path: its whole staging lives in the buffer). A plan that needs more re-creates the
buffer on every rank (same decision everywhere). Barriers involve every rank: every rank runs
every exchange, even one in which it moves nothing; a round in which no rank moves anything
over the network is skipped by all ranks (the plan says so everywhere).

Timeouts: torch's barrier with a ``timeout_ms`` traps the device (the CUDA context is lost),
so barriers wait without one and the host enforces ``timeout_s``; on expiry it releases its
own stuck barriers by writing the signal words those barriers wait for (a copy on a side
stream), marks the transport broken (re-created by the next call; the old buffer is kept
mapped, since a late peer may still touch it) and raises :class:`PeerTimeoutError` naming
the layer (and the peer when the group has two ranks).

When ``"auto"`` picks it (:func:`resolve_transport`): for now only when asked through the
environment (``EPLB_TRITON_TRANSPORT=p2p``). The blocking call is faster over p2p on every config
measured (run 67), the worker is not (run 65), and without ``timeout_s`` a dead peer leaves a
barrier spinning for good where NCCL's watchdog would end the process: picking p2p by default
needs an agreed one-node probe per group and a deadline, not built yet. ``"p2p"`` needs a NCCL
group on CUDA devices of one host with symmetric memory in this torch, and refuses anything
else with the same ``ValueError`` on every rank before any weight is touched. NVLink multicast
stays off: ``TORCH_SYMM_MEM_DISABLE_MULTICAST`` is set to 1 before the first allocation unless
the caller set it.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .checksum import trailer_bytes
from .comm import Communicator, PeerTimeoutError, poll_pause

__all__ = [
    "TRANSPORTS",
    "TRANSPORT_ENV",
    "P2PTransport",
    "acquire_slots",
    "check_transport",
    "largest_send_region",
    "message_spans",
    "p2p_unavailable_reason",
    "receive_spans",
    "release_cached",
    "resolve_transport",
    "send_region_bytes",
]

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "nccl", "p2p")
#: ``"auto"`` resolves to this transport when set (``nccl`` or ``p2p``); must match on every rank
TRANSPORT_ENV = "EPLB_TRITON_TRANSPORT"
_BARRIER_CHANNEL = 0
_RELEASE_S = 2.0  # how long a timed-out rank keeps releasing its stuck barriers
_GRANULE = 2 << 20  # buffer sizes are rounded up to this: fewer re-creations as plans vary


# -- the option ---------------------------------------------------------------------------
def check_transport(value) -> str:
    """``value`` if it is one of :data:`TRANSPORTS`, else ``ValueError``/``TypeError``."""
    if not isinstance(value, str):
        raise TypeError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, got {type(value).__name__}")
    if value not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, got {value!r}")
    return value


def symmetric_memory():
    """``torch.distributed._symmetric_memory`` when this torch has what the transport uses, else None."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return None
    if not all(hasattr(symm_mem, name) for name in ("empty", "rendezvous")):
        return None
    return symm_mem


def p2p_unavailable_reason(comm: Communicator, device: torch.device | None) -> str | None:
    """Why ``transport="p2p"`` cannot work for ``comm`` on ``device`` (this rank's view), or
    None. The node check and the mapping itself are collective (:meth:`P2PTransport.create`)."""
    if comm.world_size == 1:
        return None  # nothing crosses ranks: nothing to map
    if comm.dist_backend != "nccl":
        return f"the EP group's backend is {comm.dist_backend!r}; p2p needs a NCCL group on CUDA devices"
    if device is None or device.type != "cuda":
        return f"the weights are on {device}; p2p needs CUDA devices"
    if symmetric_memory() is None:
        return f"torch {torch.__version__} has no usable torch.distributed._symmetric_memory"
    return None


def resolve_transport(value, comm: Communicator, device: torch.device | None) -> str:
    """The transport ``value`` means here: ``"nccl"`` (the process group's own p2p ops: NCCL
    on GPUs, gloo on CPU) or ``"p2p"``. ``"auto"`` is ``"nccl"`` unless
    ``EPLB_TRITON_TRANSPORT`` says ``p2p`` (and p2p can work, else NCCL, logged). An explicit
    ``"p2p"`` that cannot work raises ``ValueError`` (a verdict of the input check, so every
    rank raises). One rank alone moves nothing over a network: always ``"nccl"``."""
    value = check_transport(value)
    if value == "auto":
        wanted = os.environ.get(TRANSPORT_ENV, "").strip().lower()
        if wanted not in ("", "auto", "nccl", "p2p"):
            raise ValueError(f"{TRANSPORT_ENV} must be 'nccl', 'p2p' or 'auto', got {wanted!r}")
        if wanted != "p2p" or comm.world_size == 1:
            return "nccl"
        reason = p2p_unavailable_reason(comm, device)
        if reason is not None:
            log.info("transport='auto' with %s=p2p keeps NCCL: %s", TRANSPORT_ENV, reason)
            return "nccl"
        return "p2p"
    if value == "p2p":
        if comm.world_size == 1:
            return "nccl"
        reason = p2p_unavailable_reason(comm, device)
        if reason is not None:
            raise ValueError(f"transport='p2p' cannot work here: {reason}")
    return value


# -- where each sender's messages lie ---------------------------------------------------------
def _sends_of(traffic: np.ndarray, sender: int) -> np.ndarray:
    """Experts ``sender`` sends to each rank over the network (its row, diagonal cleared)."""
    row = np.array(traffic[sender], dtype=np.int64)
    row[sender] = 0
    return row


def message_spans(
    traffic: np.ndarray, sender: int, expert_bytes: int, *, verify: bool = False, split: bool = False
) -> list[dict[int, tuple[int, int]]]:
    """Where ``sender``'s message to each receiver lies in its send region: per exchange call,
    ``{receiver: (byte offset, bytes)}``.

    ``traffic``: the round's ``(ep, ep)`` expert counts (:attr:`LayerPlan.traffic`; the
    diagonal, local copies, is ignored). Messages follow each other in ascending receiver
    order. ``split=False``: one call; each message is ``count * expert_bytes`` plus, with
    ``verify``, its checksum trailer (the blocking path's framed message). ``split=True``
    (the worker with ``verify``): two calls: the data of every message, back to back, then
    the trailers of every message, back to back.
    """
    counts = _sends_of(traffic, sender)
    receivers = [int(r) for r in np.flatnonzero(counts)]
    data, trailers, offset = {}, {}, 0
    if not split:
        for r in receivers:
            size = int(counts[r]) * expert_bytes + (trailer_bytes(int(counts[r])) if verify else 0)
            data[r] = (offset, size)
            offset += size
        return [data]
    for r in receivers:
        data[r] = (offset, int(counts[r]) * expert_bytes)
        offset += int(counts[r]) * expert_bytes
    for r in receivers:
        trailers[r] = (offset, trailer_bytes(int(counts[r])))
        offset += trailer_bytes(int(counts[r]))
    return [data, trailers]


def receive_spans(traffic: np.ndarray, receiver: int, expert_bytes: int) -> dict[int, tuple[int, int]]:
    """Where each sender's message to ``receiver`` lands in the receiver's slot in a pushed pass
    (:attr:`~eplb_triton.passes.PassWork.pushed`): ``{sender: (byte offset, bytes)}``, messages
    in ascending sender order from the slot's start, ``count * expert_bytes`` each (such a
    pass's staging starts with its receives)."""
    counts, before = _receive_layout(_network_of(traffic))
    return {s: (before[s][receiver] * expert_bytes, counts[s][receiver] * expert_bytes) for s in range(len(counts)) if counts[s][receiver]}


def _network_of(traffic: np.ndarray) -> np.ndarray:
    """A round's ``traffic`` without its diagonal (local copies): experts each rank sends each other rank."""
    network = np.array(traffic, dtype=np.int64, copy=True)
    np.fill_diagonal(network, 0)
    return network


def _receive_layout(network: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
    """``(counts, before)`` as lists: ``counts[s][r]`` experts from sender ``s`` to ``r`` and
    ``before[s][r]`` those of senders ``< s`` ahead of them in ``r``'s slot (:func:`receive_spans`
    for every receiver at once; plain ints: ~20 us of host less per layer than numpy per peer)."""
    return network.tolist(), (np.cumsum(network, axis=0) - network).tolist()


def send_region_bytes(traffic: np.ndarray, sender: int, expert_bytes: int, *, verify: bool = False) -> int:
    """Bytes of ``sender``'s send region in a round (data and, with ``verify``, trailers)."""
    counts = _sends_of(traffic, sender)
    counts = counts[counts > 0]
    return int(counts.sum()) * expert_bytes + (sum(trailer_bytes(int(c)) for c in counts) if verify else 0)


def largest_send_region(rounds: Sequence[tuple[np.ndarray, int]], *, verify: bool = False) -> int:
    """The largest send region of any rank in any of ``rounds`` (``(traffic, expert_bytes)``):
    the same number on every rank (the plan is global)."""
    best = 0
    for traffic, expert_bytes in rounds:
        for sender in range(len(traffic)):
            best = max(best, send_region_bytes(traffic, sender, expert_bytes, verify=verify))
    return best


# -- the transport ------------------------------------------------------------------------------
@dataclass
class _Pending:
    """What :meth:`_PassExchange.exchange` returns: an event after the exchange's last barrier."""

    event: torch.cuda.Event | None  # None: already complete (a CPU stand-in in tests), or not made yet (in_order)
    peers: list[int]
    #: the exchange ran on the caller's stream (a pushed pass): nothing to wait for but with a
    #: deadline, for which :meth:`P2PTransport.wait` records the event then
    in_order: bool = False


def _record_event() -> torch.cuda.Event | None:
    """An event on the current CUDA stream (a seam: CPU tests emulate the transport)."""
    event = torch.cuda.Event()
    event.record()
    return event


class P2PTransport:
    """A symmetric staging buffer mapped by every rank of a NCCL group on one host.

    Build it with :meth:`create` (collective) or get the cached one of a group with
    :func:`acquire_slots`; :meth:`exchange_for` gives the Communicator-like object one round's
    exchange calls use; :meth:`close` releases the buffer (local; every rank closes its own).
    """

    #: the slot offset of the last exchange when it was pushed (:meth:`_PassExchange.push_packed`),
    #: else None; every call starts at None (:func:`acquire_slots`)
    pushed_slot: int | None = None

    def __init__(self, comm: Communicator, device: torch.device, buffer: torch.Tensor, handle, host: str):
        self.comm = comm
        self.device = device
        self.buffer = buffer  # this rank's symmetric memory, uint8
        self.handle = handle
        self.host = host
        self.broken = False
        self.closed = False
        n = buffer.numel()
        # every peer's buffer as seen from here (same size everywhere)
        self._peers = {p: handle.get_buffer(p, (n,), torch.uint8, 0) for p in range(comm.world_size) if p != comm.rank}

    @property
    def nbytes(self) -> int:
        return int(self.buffer.numel())

    @classmethod
    def create(
        cls,
        comm: Communicator,
        device: torch.device,
        nbytes: int,
        *,
        control: Communicator | None = None,
        timeout_s: float | None = None,
    ) -> "P2PTransport":
        """Allocate ``nbytes`` (the same on every rank) of symmetric memory and map every peer's.

        Collective over ``comm`` (its group is the one the buffer is mapped over); the checks
        before the mapping agree over ``control`` (default ``comm``): every rank raises the
        same ``ValueError`` when a rank cannot allocate or the ranks are not on one host.
        """
        control = comm if control is None else control
        symm_mem = symmetric_memory()
        host = socket.gethostname()
        hosts = control.gather_texts(host, timeout_s=timeout_s)
        error: BaseException | None = None
        buffer = None
        if len(set(hosts)) > 1:
            where = ", ".join(f"rank {r}: {h}" for r, h in enumerate(hosts))
            error = ValueError(f"transport='p2p' needs every EP rank on one node; the ranks run on {where}")
        elif symm_mem is None:
            error = ValueError(f"transport='p2p': torch {torch.__version__} has no usable symmetric memory")
        else:
            _multicast_off()
            try:
                with torch.cuda.device(device):
                    buffer = symm_mem.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)
            except Exception as exc:  # noqa: BLE001 - any failure is this rank's verdict
                error = ValueError(f"transport='p2p': allocating {nbytes} bytes of symmetric memory failed: {exc}")
        control.agree(error, timeout_s=timeout_s)  # the same ValueError on every rank
        try:
            with torch.cuda.device(device):
                handle = symm_mem.rendezvous(buffer, comm.group.group_name)
            transport = cls(comm, device, buffer, handle, host)
            error = None
        except Exception as exc:  # noqa: BLE001 - peers that mapped fine learn of it below
            error, transport = ValueError(f"transport='p2p': mapping the peers' buffers failed: {exc}"), None
        control.agree(error, timeout_s=timeout_s)
        with torch.cuda.device(device):
            # Load the barrier's kernel here, where every rank is, on the caller's thread: its
            # first load on a worker thread waits for the running kernels, which may wait for a
            # peer (CUDA lazy loading; see eplb_triton/worker/staging.py, _load_kernels).
            transport.barrier()
            torch.cuda.current_stream(device).synchronize()
        log.info(
            "rank %d: p2p transport on %s: %d ranks map %d-byte symmetric buffers (device %s, symmetric memory "
            "backend %s, multicast disabled=%s)",
            comm.rank, host, comm.world_size, transport.nbytes, device, _backend_name(symm_mem, device),
            os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST"),
        )
        return transport

    # -- one round ---------------------------------------------------------------------------
    def exchange_for(
        self,
        traffic: np.ndarray | None,
        expert_bytes: int,
        *,
        verify: bool = False,
        split: bool = False,
        slot_offset: int = 0,
    ) -> "_PassExchange":
        """The exchange of one round, for code written against :class:`Communicator`
        (``exchange``/``wait``/``rank``/``world_size``): ``traffic`` is the round's plan
        (:attr:`PassWork.pass_traffic`); see :func:`message_spans` for ``verify``/``split``.
        ``slot_offset``: where in the buffer the round's staging starts (the same on every rank:
        :func:`acquire_slots`); every sender's messages lie from there (a pushed pass: every
        receiver's messages, :func:`receive_spans`)."""
        if traffic is None:
            raise RuntimeError("p2p needs the pass's traffic matrix (PassWork.pass_traffic)")
        return _PassExchange(self, traffic, expert_bytes, verify, split, slot_offset)

    def side_stream(self) -> "torch.cuda.Stream":
        """The stream the pulls and their barriers run on (made on first use): the packs and
        unpacks of other slots run beside them on the caller's stream."""
        stream = getattr(self, "_side", None)
        if stream is None:
            stream = self._side = torch.cuda.Stream(device=self.device)
        return stream

    def barrier(self) -> None:
        self.handle.barrier()  # channel 0 (_BARRIER_CHANNEL), no device timeout: see _give_up

    def mark_used(self) -> None:
        """Record where the current stream's last use of the buffer ends; the next user (maybe
        on another stream) waits for it (:meth:`wait_used`)."""
        if self.device.type == "cuda":
            self._last_use = torch.cuda.Event()
            self._last_use.record()

    def wait_used(self) -> None:
        last = getattr(self, "_last_use", None)
        if last is not None:
            torch.cuda.current_stream(self.device).wait_event(last)

    def peer_bytes(self, peer: int, offset: int, nbytes: int) -> torch.Tensor:
        return self._peers[peer][offset : offset + nbytes]

    def wait(self, requests: list, *, timeout_s: float | None = None, where: str = "exchange") -> None:
        """Order the caller's stream after the exchange (it ran on :meth:`side_stream`); with
        ``timeout_s``, first poll the exchange's event until the deadline, then release and raise
        PeerTimeoutError (the caller's stream never waited for it). A pushed exchange ran on
        the caller's stream: only a deadline needs its event (recorded here, right after it)."""
        if not requests:
            return
        if all(request.in_order for request in requests):
            if timeout_s is None or self.device.type != "cuda":
                return
            for request in requests:
                request.event = request.event or _record_event()
        if timeout_s is not None:
            self._poll(requests, timeout_s, where)
        for request in requests:
            if request.event is not None and not request.in_order:
                torch.cuda.current_stream(self.device).wait_event(request.event)

    def _poll(self, requests: list, timeout_s: float, where: str) -> None:
        begin = time.monotonic()
        deadline = begin + timeout_s
        for request in requests:
            while request.event is not None and not request.event.query():
                if time.monotonic() > deadline:
                    self._give_up(request.event, in_order=request.in_order)
                    peers = request.peers
                    who = f"peers {peers}"
                    message = (
                        f"{where}: rank {self.comm.rank} waited {timeout_s:g} s (timeout_s) for {who} at a p2p barrier; "
                        "the p2p transport was released (the next call maps a new one)"
                    )
                    log.error("%s", message)
                    raise PeerTimeoutError(message, peer=peers[0] if len(peers) == 1 else None)
                poll_pause(time.monotonic() - begin)

    def _give_up(self, event: torch.cuda.Event, *, in_order: bool = False) -> None:
        """Let this rank's stuck barriers finish: write the signal words they wait for (mine,
        from each peer: 1; each peer's, from me: 0, so my own signal can be posted) from a
        side stream until ``event`` completes, and every exchange queued after it on
        :meth:`side_stream` (two slots: the next layer's is queued already), or until
        :data:`_RELEASE_S` passed. ``in_order``: the stuck exchange is a pushed one, on the
        caller's stream, where nothing is queued after it (``event``). Marks the transport
        broken; its memory is kept (a late peer may still write a signal into it)."""
        self.broken = True
        _BROKEN.append(self)
        _drop_cached(self)
        pulls = getattr(self, "_side", None)
        if pulls is not None and not in_order:  # the last exchange queued, not only the one that timed out
            event = torch.cuda.Event()
            event.record(pulls)
        get_pad = getattr(self.handle, "get_signal_pad", None)
        if get_pad is None:
            log.error("rank %d: this torch cannot release a stuck p2p barrier; the stream stays blocked", self.comm.rank)
            return
        world, me = self.comm.world_size, self.comm.rank
        try:
            words = max(world * (_BARRIER_CHANNEL + 1), 1)
            mine = get_pad(me, (words,), torch.int32, 0)
            theirs = {p: get_pad(p, (words,), torch.int32, 0) for p in range(world) if p != me}
            side = torch.cuda.Stream(device=self.device)
            # Copies from pinned host words, not fill_ kernels: the first launch of a kernel not
            # loaded yet (CUDA lazy loading) waits for the running kernels, i.e. for the stuck
            # barrier itself: the survivor hung there on two H200. A host-to-device copy runs on
            # the copy engine and loads nothing.
            one, zero = torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
            if self.device.type == "cuda":
                one, zero = one.pin_memory(), zero.pin_memory()
            end = time.monotonic() + _RELEASE_S
            while not event.query() and time.monotonic() < end:
                with torch.cuda.stream(side):
                    for p, pad in theirs.items():
                        at, theirs_at = world * _BARRIER_CHANNEL + p, world * _BARRIER_CHANNEL + me
                        mine[at : at + 1].copy_(one, non_blocking=True)
                        pad[theirs_at : theirs_at + 1].copy_(zero, non_blocking=True)
                side.synchronize()
                time.sleep(1e-3)
            if not event.query():
                log.error("rank %d: a p2p barrier is still stuck after %.1f s of releasing", me, _RELEASE_S)
        except Exception:  # noqa: BLE001 - best effort: we are failing already
            log.exception("rank %d: releasing the stuck p2p barriers failed", me)

    def close(self) -> None:
        """Release the symmetric buffer (this rank's mapping of every peer's, and its own).
        Call when no exchange is pending on any stream; a broken transport is kept mapped."""
        if self.closed:
            return
        self.closed = True
        _drop_cached(self)
        if self.broken:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing queued may still read or write it
        self._peers = {}
        self.handle = None
        self.buffer = None
        gc.collect()
        log.debug("rank %d: p2p transport released", self.comm.rank)


class _PassExchange:
    """One round's ``exchange``/``wait`` as :class:`Communicator` offers them, over a
    :class:`P2PTransport`: the n-th ``exchange`` call of the round pulls span n of
    :func:`message_spans` from every sender; a pushed pass's :meth:`push_packed` packs each
    message into its receiver's slot instead."""

    def __init__(
        self,
        transport: P2PTransport,
        traffic: np.ndarray,
        expert_bytes: int,
        verify: bool,
        split: bool,
        slot_offset: int = 0,
    ):
        self.transport = transport
        self._slot_offset = int(slot_offset)
        self.rank = transport.comm.rank
        self.world_size = transport.comm.world_size
        self.dist_backend = "p2p"
        self._traffic = traffic
        self._expert_bytes = expert_bytes
        self._verify = verify
        self._split = split
        self._calls = 0
        self._network = _network_of(traffic)
        self.active = bool(self._network.any())  # the same on every rank: the plan is global
        #: :meth:`push_packed` stops before its pack launches (the caller may launch them with
        #: another layer's unpack) and leaves ``held = (layout, [(peer's region, rows)])``
        #: for :meth:`push_held`
        self.hold = False
        self.held = None

    def exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], *, where: str = "exchange") -> list:
        call = self._calls
        self._calls += 1
        if not self.active:
            return []  # nobody moves anything in this round: every rank skips it
        t, eb = self.transport, self._expert_bytes
        if t.broken or t.closed:
            raise RuntimeError(f"{where}: the p2p transport is {'broken' if t.broken else 'closed'}")
        t.pushed_slot = None  # the next pushed pass's first barrier is needed again
        mine = message_spans(self._traffic, self.rank, eb, verify=self._verify, split=self._split)[call]
        base = t.buffer.data_ptr() + self._slot_offset
        placed = {p: (x.data_ptr() - base, x.numel()) for p, x in sends.items() if x.numel()}
        if placed != mine:  # where peers will read must be where this rank packed
            raise RuntimeError(f"{where}: rank {self.rank}: p2p send layout {placed} differs from the plan's {mine}")
        senders = {int(p) for p in np.flatnonzero(np.asarray(self._traffic)[:, self.rank]) if p != self.rank}
        if {p for p, x in recvs.items() if x.numel()} != senders:
            raise RuntimeError(f"{where}: rank {self.rank}: p2p receives from {sorted(recvs)}, the plan from {sorted(senders)}")
        sources = {}
        for peer, dst in recvs.items():
            offset, size = message_spans(self._traffic, peer, eb, verify=self._verify, split=self._split)[call].get(
                self.rank, (0, 0)
            )
            if size != dst.numel():
                raise RuntimeError(f"{where}: rank {self.rank}: {dst.numel()} bytes expected from peer {peer}, plan says {size}")
            sources[peer] = self._slot_offset + offset
        if t.device.type != "cuda":  # CPU stand-ins (tests): in order, on the host
            return self._pull(recvs, sources)
        caller = torch.cuda.current_stream(t.device)
        side = t.side_stream()
        side.wait_stream(caller)  # the packs queued so far, this exchange's among them
        with torch.cuda.stream(side):
            return self._pull(recvs, sources)

    def push_packed(self, layout, work, recvs: dict[int, torch.Tensor], backend: str | None, *, where: str = "exchange") -> list:
        """A pushed pass (:attr:`PassWork.pushed`), on the caller's stream: the pack kernel writes
        each peer's rows straight into that peer's slot (:func:`receive_spans`), then a barrier
        (every message into every slot landed: receivers may unpack, senders overwrite rows).

        A barrier comes first too (every receiver is done with its slot's previous pass) unless
        the transport's previous exchange, in this call, was a pushed one into the other slot:
        its barrier came after every rank queued the unpack of this slot's previous pass (the
        blocking loop queues a pushed layer's unpack before the next layer's barrier: alone, or in
        one launch with the next layer's pack), so it certifies that.
        ``recvs``: this rank's receive region by peer, checked against the plan first. With
        :attr:`hold` set, stops before the pack launches (see :meth:`push_held`)."""
        t, eb, me = self.transport, self._expert_bytes, self.rank
        if t.broken or t.closed:
            raise RuntimeError(f"{where}: the p2p transport is {'broken' if t.broken else 'closed'}")
        if not self.active:
            return []
        counts, before = _receive_layout(self._network)
        base = t.buffer.data_ptr() + self._slot_offset
        placed = {p: (x.data_ptr() - base, x.numel()) for p, x in recvs.items() if x.numel()}
        expected = {s: (before[s][me] * eb, counts[s][me] * eb) for s in range(self.world_size) if counts[s][me]}
        if placed != expected:
            raise RuntimeError(f"{where}: rank {me}: p2p receive layout {placed} differs from the plan's {expected}")
        targets, at = [], 0
        for peer, count in zip(work.send_peers, work.send_counts):
            if counts[me][peer] != count:
                raise RuntimeError(f"{where}: rank {me}: {count} experts to push to peer {peer}, the plan says {counts[me][peer]}")
            targets.append((peer, self._slot_offset + before[me][peer] * eb, at, count))
            at += count
        if t.pushed_slot is None or t.pushed_slot == self._slot_offset:
            t.barrier()
        rows = work.device_rows(layout.device)["send"] if at else None
        # SMs write over NVLink: no staging on this side
        packs = [(t.peer_bytes(peer, offset, count * eb), rows if count == at else rows[first : first + count])
                 for peer, offset, first, count in targets]
        self.held = (layout, packs)
        if not self.hold:
            self.push_held(backend)
        return [_Pending(None, sorted(p for p in range(self.world_size) if p != me), in_order=True)]

    def push_held(self, backend: str | None, *, packed: bool = False) -> None:
        """The rest of :meth:`push_packed`: the pack launches (unless ``packed``: the caller
        launched them, :func:`eplb_triton.layout.move_pair`), then the barrier."""
        layout, packs = self.held
        if not packed:
            for remote, rows in packs:
                layout.move("pack", remote, src_rows=rows, backend=backend)
        self.held = None
        t = self.transport
        t.barrier()
        t.pushed_slot = self._slot_offset

    def _pull(self, recvs: dict[int, torch.Tensor], sources: dict[int, int]) -> list:
        """Barrier, every pull, barrier, on the current stream; the pending exchange."""
        t = self.transport
        t.barrier()  # every sender packed; every reader of my previous pass in this slot is done
        for peer, dst in recvs.items():
            if dst.numel():
                dst.copy_(t.peer_bytes(peer, sources[peer], dst.numel()))  # copy engine, over NVLink
        t.barrier()  # every pull done: the send regions may be overwritten
        event = _record_event()
        peers = sorted({p for p in range(self.world_size) if p != self.rank})
        return [_Pending(event, peers)]

    def wait(self, requests: list, *, timeout_s: float | None = None, labels=None, where: str = "exchange") -> None:
        self.transport.wait(requests, timeout_s=timeout_s, where=where)


# -- caching (blocking API) -------------------------------------------------------------------
_CACHE: dict[tuple[str, int], P2PTransport] = {}
_BROKEN: list[P2PTransport] = []  # timed out: kept mapped until the process ends
_CACHE_LOCK = threading.Lock()


def _key(comm: Communicator, device: torch.device) -> tuple[str, int]:
    return (str(comm.group.group_name), int(device.index if device.index is not None else torch.cuda.current_device()))


def _drop_cached(transport: P2PTransport) -> None:
    with _CACHE_LOCK:
        for key, value in list(_CACHE.items()):
            if value is transport:
                del _CACHE[key]


def acquire_slots(
    comm: Communicator, device: torch.device, slot_bytes: int, slots: int, *, timeout_s: float | None = None
) -> tuple[P2PTransport, int, int]:
    """The cached transport of ``comm``'s group on ``device`` with room for ``slots`` (1 or 2)
    staging slots of ``slot_bytes``; returns it with the agreed slot size and count.

    Agreed with one MAX all-reduce over ``comm``: the slot size is every rank's largest (rounded
    up to 256 bytes, so a slot starts aligned), the count every rank's smallest (two slots only
    if every rank asked for two), so every rank finds each sender's messages at the same offset.
    When the cached buffer is smaller, or there is none, every rank re-creates it (collective;
    the same decision everywhere since the agreed size and the cached sizes are the same)."""
    key = _key(comm, device)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    held = 0 if cached is None else cached.nbytes
    # one all-reduce: the largest slot, the fewest slots, and the smallest and largest cached size
    # (a rank whose transport broke has none: then every rank re-creates, so the rendezvous meets)
    values = torch.tensor([int(slot_bytes), -int(slots), -held, held], dtype=torch.int64, device=comm.collective_device)
    slot, fewest, smallest, largest = comm.all_reduce_max(values, timeout_s=timeout_s).tolist()
    slot, count, smallest = -(-slot // 256) * 256, -fewest, -smallest
    need = slot * count
    size = max(_GRANULE, -(-need // _GRANULE) * _GRANULE)
    if cached is not None and smallest == largest and held >= need:
        cached.wait_used()  # a previous call's unpack may still read it on another stream
        cached.pushed_slot = None
        return cached, slot, count
    if cached is not None:
        log.info("rank %d: p2p buffer re-created: %d bytes held (ranks hold %d..%d), %d needed", comm.rank, held, smallest, largest, need)
        cached.close()
    transport = P2PTransport.create(comm, device, size, timeout_s=timeout_s)
    with _CACHE_LOCK:
        _CACHE[key] = transport
    return transport, slot, count


def release_cached() -> None:
    """Release every cached transport of this process (the blocking API's; local, no peer
    needed). The next ``transport="p2p"`` call maps new buffers."""
    with _CACHE_LOCK:
        transports = list(_CACHE.values())
    for transport in transports:
        transport.close()


def _multicast_off() -> None:
    """No NVLink multicast object: torch's symmetric memory reads this before mapping."""
    value = os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")
    if value is None:
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    elif value != "1":
        log.warning("TORCH_SYMM_MEM_DISABLE_MULTICAST=%s: torch may create NVLink multicast objects", value)


def _backend_name(symm_mem, device: torch.device) -> str:
    try:
        return str(symm_mem.get_backend(device))
    except Exception:  # noqa: BLE001 - older torch: no such query
        return "default"

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

Reliability (``timeout_s``, ``verify``): every wait of the worker thread on its peers is
bounded by ``timeout_s`` (:meth:`Communicator.wait`, errors name the layer, round and peer),
and so is the agreement of ``step()`` on the control group. The agreement also carries each
rank's entry time: a rank that reaches it more than ``timeout_s`` after another (which gave
up) raises instead of swapping, so a stalled rank that resumes cannot apply layers its
peers abandoned. With ``verify`` every peer message is followed by a second, small message
holding one checksum per expert (:func:`~eplb_triton.checksum.expert_checksums`, padded to
:func:`~eplb_triton.checksum.trailer_bytes` as in the blocking path); the worker thread
checks the received experts before publishing the layer. (The trailer cannot share the
data's message here: received experts land back to back in the slot so that the swap is
one unpack.)

Pacing (:mod:`eplb_triton.pacing`): with ``layers_per_step``/``bytes_per_step``/
``steps_per_layer`` the worker thread waits, before starting a layer, until ``step()`` was
called as often as the pace's schedule says (computed at ``submit`` from the global plan, so
every rank's gate opens on the same layers with no collective of its own); ``wait()`` lifts it.

Thread safety: ``submit``/``step``/``wait``/``close`` are meant for one (the serving) thread.
The worker's p2p runs on ``transfer_group``; the agreements of ``submit`` and ``step`` run on
a CPU (gloo) control group, never on the group the worker thread uses (a NCCL or gloo
communicator must not be used by two threads at once).
"""

from __future__ import annotations

import datetime
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .checksum import CHECKSUM_BYTES, expert_checksums, trailer_bytes
from .comm import (
    ChecksumMismatchError,
    Communicator,
    PeerError,
    PeerFailedError,
    PeerTimeoutError,
    TransferError,
)
from .inputs import agree_inputs, check_worker_inputs, weights_signature
from .layout import ExpertLayout, index_tensors, resolve_backend
from .maps import EPGroup, ExpertMap
from .pacing import PaceGate, Pacing, TransferProgress, check_pacing, layer_gate_bytes
from .p2p import P2PTransport, largest_send_region, resolve_transport
from .transfer import LayerWork, RoundWork, TransferStats, prepare_layers, staging_bound, upload_rows

__all__ = ["TransferWorker"]

log = logging.getLogger(__name__)

_POLL_MIN_S = 20e-6  # first sleep of a poll loop: the GIL is free for the serving thread meanwhile
_POLL_MAX_S = 2e-4  # longest sleep: bounds the latency added to a layer that just finished (a
# layer of a reference config moves in 0.1-0.7 ms on NVLink: a 1 ms cap added up to 1 ms per layer)
_WAIT_SLICE_S = 0.05  # wait() re-agrees at least this often, so a failure on a peer is seen
_DRAIN_STREAM_S = 30.0  # how long a drain waits for the transfer stream before giving up
_MESSAGE_BYTES = 480  # failure message bytes each rank shares when a worker fails

#: Where events and the current stream come from (``torch.cuda``). A test seam: a fake with
#: ``Event`` and ``current_stream`` (plus a fake ``worker._stream``) records the order of the
#: worker's record/wait calls on CPU, where no CUDA stream exists.
_cuda = torch.cuda

#: Test-only fault injection, called on the worker thread as ``fault_hook(point, **info)`` at
#: ``layer_start`` (rank, layer), ``before_send`` (rank, layer, round), ``in_flight`` (rank,
#: layer, round, ``received``: each peer's received packed experts, before they are checked)
#: and ``before_publish`` (rank, layer). It may raise, sleep, exit or corrupt ``received``.
fault_hook: Callable[..., None] | None = None

# failure kinds shared with the peers (see TransferWorker._share_failures)
_KIND_OTHER, _KIND_PEER_FAILED, _KIND_PEER_TIMEOUT, _KIND_CHECKSUM = 1, 2, 3, 4
_KIND_CLASSES = {_KIND_PEER_FAILED: PeerFailedError, _KIND_PEER_TIMEOUT: PeerTimeoutError, _KIND_CHECKSUM: ChecksumMismatchError}


def _fault(point: str, **info) -> None:
    if fault_hook is not None:
        fault_hook(point, **info)


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


# Process groups of finished workers, by (ranks, backend), for the next worker to reuse.
# Groups made with use_local_synchronization=True are named after their ranks and the number
# of live groups, so destroying one and making another with the same ranks reuses its name and
# its stale rendezvous keys: seen hanging the second worker's constructor at world 4 on gloo.
# Reusing groups avoids both that and a leak of one group per worker.
_GROUP_POOL: dict[tuple[tuple[int, ...], str], list] = {}
_GROUP_POOL_LOCK = threading.Lock()


def _acquire_group(ranks: list[int], backend: str):
    """A process group over ``ranks`` not used by any live worker (collective over ``ranks``
    when a new one must be made; every EP rank takes the same branch as long as workers are
    created and closed alike on all of them)."""
    live = dist.distributed_c10d._world.pg_group_ranks
    with _GROUP_POOL_LOCK:
        free = _GROUP_POOL.get((tuple(ranks), backend), [])
        while free:
            group = free.pop()
            if group in live:  # skip groups destroyed since (e.g. with the default group)
                return group
    # Only the EP ranks take part (several EP groups may build workers at once).
    return dist.new_group(ranks, backend=backend, use_local_synchronization=True, **_keep_rank_order(ranks))


def _keep_rank_order(ranks: list[int]) -> dict:
    """``new_group`` keywords that keep ``ranks`` in the EP group's order.

    ``new_group`` sorts ranks, which renumbers a group whose global ranks are not ascending;
    ``sort_ranks=False`` prevents that but only exists in newer torch (torch 2.11 rejects it).
    Ascending ranks (the usual EP group) need nothing.
    """
    if list(ranks) == sorted(ranks):
        return {}
    if "sort_ranks" in inspect.signature(dist.new_group).parameters:
        return {"sort_ranks": False}
    raise ValueError(
        f"the EP group's global ranks {list(ranks)} are not ascending, and this torch's new_group cannot keep "
        "that order (no sort_ranks): pass transfer_group= (same ranks, same order) or use ascending ranks"
    )


def _release_group(group, ranks: tuple[int, ...], backend: str) -> None:
    with _GROUP_POOL_LOCK:
        _GROUP_POOL.setdefault((ranks, backend), []).append(group)


# Constructions of a TransferWorker per EP group, in this process: names each rendezvous.
_RENDEZVOUS_COUNT: dict[tuple[int, str], int] = {}


def _rendezvous(ep: Communicator, timeout_s: float | None) -> None:
    """Wait until every EP rank is constructing a worker, bounded by ``timeout_s``.

    ``new_group`` blocks in the store until every member calls it, ignoring ``timeout_s``;
    so the ranks first meet here, through the default store, before any group is created.
    On expiry nothing was created and this rank withdraws its arrival key (a peer that
    arrives later then times out too instead of going on alone) and raises
    :class:`PeerTimeoutError` naming the ranks that did not arrive. Every rank counts its
    constructions per EP group, so the n-th construction of each rank meet (when every rank
    gave up on the same one, the next ones still meet).
    """
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no default store: group creation stays unbounded
        return
    name = getattr(ep.group, "group_name", None) or "-".join(map(str, dist.get_process_group_ranks(ep.group)))
    with _GROUP_POOL_LOCK:
        generation = _RENDEZVOUS_COUNT.get((id(store), name), 0)
        _RENDEZVOUS_COUNT[(id(store), name)] = generation + 1
    keys = [f"eplb_triton/worker/{name}/{generation}/{r}" for r in range(ep.world_size)]
    store.set(keys[ep.rank], "1")
    try:
        if timeout_s is None:
            store.wait(keys)
        else:
            store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - the store reports a timeout as a generic error
        try:
            store.delete_key(keys[ep.rank])
        except Exception:  # noqa: BLE001 - best effort
            pass
        missing = [r for r, key in enumerate(keys) if r != ep.rank and not store.check([key])]
        waited = "the store's timeout" if timeout_s is None else f"{timeout_s:g} s (timeout_s)"
        message = (
            f"TransferWorker: rank {ep.rank} waited {waited} for EP rank(s) {missing} to construct their "
            f"TransferWorker (every EP rank must construct one, collectively); nothing was created: {exc}"
        )
        log.error("%s", message)
        raise PeerTimeoutError(message, peer=missing[0] if missing else None) from exc


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
    device_rows: torch.Tensor | None = None  # ``rows`` on the GPU, copied by the worker thread
    device_lists: dict[str, torch.Tensor] | None = None  # local sources and duplicate positions, likewise

    def upload(self, device: torch.device) -> None:
        """``rows``, local sources and duplicate positions to ``device`` in one pinned copy."""
        out = index_tensors(
            {"rows": self.rows, "local_src": self.local_src, "dup_src": self.dup_src_pos, "dup_dst": self.dup_dst_pos}, device
        )
        self.device_rows = out["rows"] if self.rows.size else None
        self.device_lists = out

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
    verify: bool = False
    send_sums: torch.Tensor | None = None  # verify: checksum trailers of one round's sends
    recv_sums: torch.Tensor | None = None  # verify: checksum trailers of one round's receives
    broken: bool = False  # a peer error: the transfer group is unusable, do not drain
    layer: int | None = None  # the layer the worker thread is transferring (error reports)
    gate: PaceGate = None  # pacing: which layers the worker thread may start (see pacing.py)
    lift_requested: bool = False  # wait() asks the ranks to lift the pace at the next step
    submitted_at: float = 0.0  # time.monotonic() of submit (progress)
    finished_at: float | None = None  # of the last swap
    p2p: P2PTransport | None = None  # transport="p2p": send_buffer is its symmetric buffer


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


def _round_trailer_bytes(work: RoundWork) -> tuple[int, int]:
    return sum(trailer_bytes(c) for c in work.send_counts), sum(trailer_bytes(c) for c in work.recv_counts)


def _fill_send_trailers(job: "_Job", work: RoundWork, send_buf: torch.Tensor) -> dict[int, torch.Tensor]:
    """Checksum every packed expert in ``send_buf`` into each peer's trailer; returns the trailers."""
    eb = work.expert_bytes
    sums = expert_checksums(send_buf, eb) if send_buf.numel() else None
    trailers = _trailers(job.send_sums, work.send_peers, work.send_counts)
    first = 0
    for peer, count in zip(work.send_peers, work.send_counts):
        trailers[peer][: count * CHECKSUM_BYTES].view(torch.int64).copy_(sums[first : first + count])
        first += count
    return trailers


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
        timeout_s: the longest any wait on peers may take: the construction (the ranks
            meeting, then agreeing on the weights), each exchange of the worker thread, the
            agreements of :meth:`submit` and :meth:`step`, and each exchange of a drain. ``None`` (default) = the process groups' own timeouts. When a peer
            exits or stalls (stops sending, or stops calling :meth:`step`), every other
            rank raises a :class:`~eplb_triton.comm.PeerError` from :meth:`step`/
            :meth:`wait` within about ``timeout_s`` (at most about ``2 * timeout_s`` plus
            a grace of ``max(0.5, timeout_s / 4)`` s), naming the layer and the peer where
            this rank knows them; layers not swapped keep their old weights. So every rank
            must call :meth:`step` within ``timeout_s`` of the others while busy, and
            :meth:`submit` raises a ``PeerError`` too when a peer misses its agreement. The groups
            are then broken (the control group too, which is ``ep_group`` itself when that
            is a gloo group distinct from ``transfer_group``): re-create them.
        verify: send a checksum per expert with every message and check the received
            experts on the worker thread before the layer is published (``False`` by
            default; it must be the same on every rank). A mismatch raises
            :class:`~eplb_triton.comm.ChecksumMismatchError` (layer, expert, peer) on
            every rank at the next :meth:`step`/:meth:`wait`; that layer is not applied.
            Costs one checksum pass over the sent and the received experts, on the worker
            thread and stream, and 8 bytes per expert on the wire (padded to 16 per peer).
        transport: ``"auto"`` (default), ``"nccl"`` or ``"p2p"`` as for
            :func:`~eplb_triton.rearrange_expert_weights_inplace`: with ``"p2p"`` peers pull
            each round's messages from this worker's symmetric send buffer over NVLink (copy
            engines; mapped at the first submit that needs it, released by :meth:`close`).
            Same on every rank; one that cannot work is refused here on every rank.
        reserve: allocate the staging every later :meth:`submit` needs here, once, for the
            worst plan these weights and options allow (two slots of one layer's local rows
            packed, plus one round's send buffer), and keep it: a runtime's profile run then
            counts it and no rebalance allocates staging. Without it (default) each submit
            allocates what its plan needs. A submit with a larger ``max_buffer_bytes`` or
            with ``verify`` turned on after construction allocates again.

        layers_per_step, bytes_per_step, steps_per_layer: pacing, keyword-only, ``None``
            (default) = as fast as possible (see :mod:`eplb_triton.pacing`). The worker thread
            starts at most ``layers_per_step`` layers' transfers between two :meth:`step`
            calls (vLLM's async EPLB moves one layer per forward step: ``1``), at most
            ``bytes_per_step`` bytes of them (counting each layer's busiest rank; a larger
            layer moves alone), or one layer every ``steps_per_layer`` calls (for steps
            shorter than one layer's transfer). The first step's worth may start right after
            :meth:`submit`. The same on every rank (agreed at construction); the gate needs no
            collective of its own and a gated worker is not a stalled peer for ``timeout_s``.
            :meth:`wait` lifts the pace. Layers that move nothing on any rank are free.
        log_progress: log :attr:`progress` at INFO on the ``eplb_triton.worker`` logger at
            each :meth:`step` that swaps layers.

    ``max_buffer_bytes`` and ``verify`` are read by each :meth:`submit`: they may be changed
    (the same on every rank) between rearrangements. The pace is fixed at construction.

    Constructing is collective over ``ep_group`` when it has more than one rank (it may
    create process groups). It validates ``expert_weights`` (a list of layers, each a list of
    tensors as above; ``[]`` = zero layers, every later submit must then have zero layers)
    and the options, and agrees on them like :meth:`submit`: bad or differing weights (types,
    dtypes, shapes, strides, devices) raise the same ``TypeError``/``ValueError`` on every
    rank. ``timeout_s`` bounds it too: the EP ranks first meet through the default store,
    so a rank whose peers do not construct their worker within ``timeout_s`` raises
    :class:`~eplb_triton.comm.PeerTimeoutError` naming them, having created nothing (a peer
    that arrives after that times out as well). The worker thread starts at once and waits
    for work.

    The worker moves the tensors it was built with. If the runtime replaces a tensor in
    ``expert_weights`` (or resizes it, or re-points it at other memory) afterwards, the next
    :meth:`submit` refuses with the same ``ValueError`` on every rank naming the layer and
    tensor: build a new worker after replacing weights. A replacement while a rearrangement
    is in flight is not noticed: that rearrangement still writes into the old tensors.

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
    includes the worker's frames); the others raise a
    :class:`~eplb_triton.comm.TransferError` (a ``RuntimeError``) naming the failing rank(s)
    and their messages, of the failing rank's class when that is a ``PeerError`` or
    ``ChecksumMismatchError``, with ``.layer``/``.peer`` (and ``.expert``) as that rank
    reported them (``.peer`` is the failing rank itself for other errors). No rank swaps a
    layer in the step that reports a failure, so every rank keeps the same layers: those
    swapped before stay swapped, the others keep their old weights (each layer entirely
    old or entirely new). One exception: a rank that dies *during* a step agreement can
    leave the survivors disagreeing on that step, since a collective a rank leaves half-way
    may complete on some survivors and fail on others (seen with gloo's all-reduce); each
    survivor's layers are still entirely old or entirely new. The worker is closed (after a
    non-peer error its thread ends after running the remaining exchanges with junk, so no
    peer is left blocked): make a new one to retry.
    """

    def __init__(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        ep_group: EPGroup = None,
        *,
        transfer_group: EPGroup = None,
        max_buffer_bytes: int | None = None,
        backend: str | None = None,
        timeout_s: float | None = None,
        verify: bool = False,
        reserve: bool = False,
        layers_per_step: int | None = None,
        bytes_per_step: int | None = None,
        steps_per_layer: int | None = None,
        log_progress: bool = False,
        transport: str = "auto",
    ):
        # A non-group ep_group/transfer_group is a TypeError here, before torch.distributed.
        ep = Communicator.from_group(ep_group)
        moves = ep if transfer_group is None else Communicator.from_group(transfer_group)
        pacing = Pacing()

        def check_options(_checked) -> dict[str, object]:  # inside the input stage: errors become the verdict
            nonlocal pacing
            if not isinstance(log_progress, bool):
                raise TypeError(f"log_progress must be a bool, got {type(log_progress).__name__}")
            pacing = check_pacing(layers_per_step, bytes_per_step, steps_per_layer)
            device = _checked.layouts[0].device if _checked.layouts else None
            # the gates must open on the same layers everywhere, and one transport: agreed
            return {**pacing.options(), "transport": resolve_transport(transport, moves, device)}

        # Checked like submit()'s input, with the same agreement: every rank raises the same
        # TypeError/ValueError (after the rendezvous below, so no rank is left waiting).
        checked = check_worker_inputs(
            expert_weights, moves, max_buffer_bytes=max_buffer_bytes, verify=verify, timeout_s=timeout_s,
            more_checks=check_options,
        )
        self.transport = transport
        self.expert_weights = expert_weights
        self.max_buffer_bytes = max_buffer_bytes
        self.backend = backend
        self.timeout_s = checked.timeout_s
        self.verify = verify
        self._pacing = pacing
        self._log_progress = log_progress
        self._last_progress = TransferProgress()
        self._device = checked.layouts[0].device if checked.layouts else torch.device("cpu")
        self._owned_groups: list = []
        if ep.world_size > 1:
            _rendezvous(ep, checked.timeout_s)  # bounds group creation by timeout_s
        self._transfer, self._control = self._make_communicators(ep_group, transfer_group)
        try:
            agree_inputs(self._control, checked)
        except (TypeError, ValueError):
            self._release_owned_groups()  # the agreement completed: the groups are healthy
            raise
        # submit() refuses tensors replaced since (see the class docstring)
        self._weights_signature = weights_signature(expert_weights)
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
        self._abandon = False  # the step agreement failed: the thread must not wait on peers any more
        self._last_stats = TransferStats.empty(self._transfer.rank, self._transfer.world_size)
        self._p2p: P2PTransport | None = None  # mapped by the first submit that moves bytes with p2p
        self._reserved = self._reserve_storage() if reserve else None
        self._thread = threading.Thread(target=self._run, name=f"eplb-transfer-rank{self._transfer.rank}", daemon=True)
        self._thread.start()

    # -- setup ------------------------------------------------------------------------------
    def _reserve_storage(self) -> torch.Tensor | None:
        """The worst case of :meth:`submit`'s storage for these weights and options: two slots
        of a layer's local rows packed, one round's sends (at most the round budget) and, with
        ``verify``, trailers of at most 16 bytes per expert sent and received in a round."""
        try:
            layouts = [ExpertLayout(tensors) for tensors in self.expert_weights]
        except (TypeError, ValueError, IndexError):
            return None  # malformed weights: submit() reports them on every rank
        slot = max((lay.num_local * lay.expert_bytes for lay in layouts), default=0)
        budget = staging_bound(self.expert_weights, self.max_buffer_bytes, verify=self.verify)
        rows = max((budget // lay.expert_bytes for lay in layouts), default=0)
        sums = 2 * 16 * rows if self.verify else 0
        return torch.empty(max(2 * slot + budget + sums, 1), dtype=torch.uint8, device=self._device)

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
        group = _acquire_group(ranks, backend)
        self._owned_groups.append((group, tuple(ranks), backend))
        return group

    # -- public API ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True from a successful :meth:`submit` until its last layer is swapped (or an error)."""
        return self._job is not None and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def layers_per_step(self) -> int | None:
        return self._pacing.layers_per_step

    @property
    def bytes_per_step(self) -> int | None:
        return self._pacing.bytes_per_step

    @property
    def steps_per_layer(self) -> int | None:
        return self._pacing.steps_per_layer

    @property
    def progress(self) -> TransferProgress:
        """Where the current (else the last) rearrangement stands on this rank: layers
        swapped / moved / total, bytes exchanged, time elapsed and an estimate of the time
        left (:class:`~eplb_triton.pacing.TransferProgress`). Local and cheap."""
        job = self._job
        return self._last_progress if job is None else self._progress_of(job)

    def submit(self, old_global_expert_indices: ExpertMap, new_global_expert_indices: ExpertMap) -> None:
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
            verify=self.verify,
            timeout_s=self.timeout_s,
            expected_weights=self._weights_signature,
            transport=self.transport,
        )
        rank = self._transfer.rank
        stages = [_Stage.build(layer, rank) for layer in layers]
        slot_bytes = max((s.nbytes for s in stages), default=0)
        send_bytes = max((s.send_bytes for s in stages), default=0)
        trailers = [_round_trailer_bytes(w) for s in stages for w in s.layer.rounds] if self.verify else []
        send_sums = max((t[0] for t in trailers), default=0)
        recv_sums = max((t[1] for t in trailers), default=0)
        p2p = self._map_p2p(layers)
        if p2p is not None:  # sends (and their trailers) live in the symmetric buffer
            send_bytes = send_sums = 0
        # One allocation on the current stream; nothing frees it while the worker may use it.
        need = 2 * slot_bytes + send_bytes + send_sums + recv_sums
        if self._reserved is not None and self._reserved.numel() >= need:
            storage = self._reserved[:need]  # reserve=True: the previous job's swaps are ordered before start_event
        else:
            storage = torch.empty(need, dtype=torch.uint8, device=self._device)
        sums_at = 2 * slot_bytes + send_bytes
        stats = TransferStats.empty(rank, self._transfer.world_size)
        stats.peak_staging_bytes = int(storage.numel())
        # The pace's schedule comes from the global plan: the same on every rank.
        schedule = None
        if self._pacing.paced:
            schedule = self._pacing.schedule(
                [layer_gate_bytes(s.layer.plan.traffic, s.layer.layout.expert_bytes) for s in stages]
            )
        start_event = None
        if self._stream is not None:
            # The worker reads live weights on its own stream: after what the current stream
            # queued before this call (the previous rearrangement's swaps, a weight load).
            start_event = _cuda.Event()
            start_event.record(_cuda.current_stream(self._device))
        job = _Job(
            stages=stages,
            slots=[_Slot(storage[:slot_bytes]), _Slot(storage[slot_bytes : 2 * slot_bytes])],
            send_buffer=storage[2 * slot_bytes : sums_at] if p2p is None else p2p.buffer,
            stats=stats,
            start_event=start_event,
            backend=self.backend,
            verify=self.verify,
            send_sums=storage[sums_at : sums_at + send_sums] if self.verify else None,
            recv_sums=storage[sums_at + send_sums :] if self.verify else None,
            gate=PaceGate(schedule),
            submitted_at=time.monotonic(),
            p2p=p2p,
        )
        log.info(
            "rank %d: submitted %d layers, staging %d bytes (2 x %d slot + %d send)%s",
            rank, len(stages), storage.numel(), slot_bytes, send_bytes,
            f", paced over {schedule[-1] + 1} steps ({self._pacing.options()})" if schedule else "",
        )
        with self._cond:
            if not stages:
                self._last_stats = stats
                self._last_progress = TransferProgress.of(0, 0, 0, 0, 0, 0.0)
                return
            self._job = job
            self._cond.notify_all()

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
            [(w.round_traffic, w.expert_bytes) for layer in layers for w in layer.rounds], verify=self.verify
        )
        if self._p2p is not None and self._p2p.nbytes >= need:
            return self._p2p
        if self._p2p is not None:
            self._p2p.close()
        self._p2p = P2PTransport.create(self._transfer, device, need, control=self._control, timeout_s=self.timeout_s)
        return self._p2p

    def step(self) -> list[int]:
        """Swap in every layer whose transfer finished on all ranks; returns their indices.

        The same indices, in ascending order, on every rank. Collective over the EP group
        while :attr:`busy` (each rank must call it equally often); returns ``[]`` at once when
        idle. Swaps run on the current CUDA stream, so kernels queued before read the old
        rows and kernels queued after read the new ones; no device-wide sync. With a pace,
        each call while busy lets the worker thread start the next step's worth of layers.
        """
        self._check_open()
        job = self._job
        if job is None:
            return []
        with self._cond:
            ready, failed = job.published, self._error is not None
            lift = job.lift_requested and not job.gate.lifted
        try:
            ready, lift = self._agree_ready(ready, failed, lift)
        except BaseException:
            if not self._closed:
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
        with self._cond:  # one more collective step: the pace's credit (the same count on every rank)
            job.gate.on_step()
            if lift:  # agreed: every rank lifts the pace at this step
                job.gate.lift()
            self._cond.notify_all()
        if job.swapped == len(job.stages):
            job.finished_at = time.monotonic()
            self._last_stats = job.stats
            self._last_progress = self._progress_of(job)
            self._job = None
        if done:
            log.debug("rank %d: swapped layers %s", self._transfer.rank, done)
            if self._log_progress:
                log.info("rank %d: %s", self._transfer.rank, self._progress_of(job))
        return done

    def wait(self) -> TransferStats:
        """Swap in every remaining layer (collective while busy); returns this rank's stats.

        Lifts the pace, on every rank at the same step (the request rides in the step agreement).

        ``layer_times_s[l]`` is the worker's transfer time of layer ``l``; when idle, returns
        the stats of the last rearrangement.
        """
        self._check_open()
        while self._job is not None:
            job = self._job
            with self._cond:
                job.lift_requested = True  # the pace is lifted at the next step, on every rank
                # Re-agree at least every slice even without local progress: a peer's failure
                # (our worker may be blocked on that peer) is only learnt through step().
                self._cond.wait_for(
                    lambda: job.published > job.swapped or self._error is not None or not job.gate.lifted,
                    timeout=_WAIT_SLICE_S,
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
        Process groups the worker created go back to a pool for the next worker once it ended cleanly.
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
        now_us = int(time.time() * 1e6)  # wall clock: comparable across hosts (NTP)
        flags = torch.tensor([-ready, int(failed), now_us, -now_us, int(lift)], dtype=torch.int64)
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
            if spread_s > self.timeout_s:
                self._agreement_failed(
                    None, f"found the ranks reached it {spread_s:.2f} s apart, so the earliest gave up"
                )
        ready, any_failed = -int(flags[0]), bool(flags[1])
        if any_failed:
            self._raise_failure()
        return ready, bool(flags[4])

    def _next_layer(self) -> int | None:
        job = self._job
        return job.stages[job.swapped].layer.index if job is not None and job.swapped < len(job.stages) else None

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
        if job is not None and job.swapped < len(job.stages):
            next_layer = job.stages[job.swapped].layer.index
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

    def _progress_of(self, job: _Job) -> TransferProgress:
        with self._cond:
            done, moved = job.swapped, job.published
        end = job.finished_at if job.finished_at is not None else time.monotonic()
        stats = job.stats  # counted by the worker thread: at worst one round behind
        return TransferProgress.of(
            len(job.stages), done, moved, stats.total_bytes_sent, stats.total_bytes_received, end - job.submitted_at
        )

    def _swap(self, job: _Job, stage: _Stage) -> None:
        slot = job.slots[job.swapped % 2]
        if stage.rows.size:
            layout = stage.layer.layout
            with self._kernel_lock:
                if stage.device_rows is not None and resolve_backend(job.backend, self._device) == "triton":
                    # rows come from the plan (distinct, in range): the unchecked launch is safe
                    layout.launch("unpack", slot.buffer[: stage.nbytes], dst_rows=stage.device_rows)
                    stage.device_rows.record_stream(_cuda.current_stream(self._device))
                else:
                    layout.unpack(slot.buffer[: stage.nbytes], stage.rows, backend=job.backend)
        event = None
        if self._stream is not None and stage.rows.size:
            event = _cuda.Event()
            event.record(_cuda.current_stream(self._device))
        with self._cond:
            if event is not None:
                slot.event = event
            job.swapped += 1
            self._cond.notify_all()

    def _shutdown(self, timeout_s: float = 10.0) -> None:
        if self._job is not None:  # what stays readable once the job is dropped
            self._last_progress = self._progress_of(self._job)
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
            self._release_owned_groups()
            if self._p2p is not None:
                self._p2p.close()
                self._p2p = None

    def _release_owned_groups(self) -> None:
        """Hand the groups this worker made back to the pool for the next worker (see
        :func:`_acquire_group`); called only after a clean stop, when no op is pending."""
        for group, ranks, backend in self._owned_groups:
            _release_group(group, ranks, backend)
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
        if self._stream is not None:  # every round's row lists in one copy, on the worker stream
            upload_rows([work for stage in job.stages for work in stage.layer.rounds], self._device)
        # Layer i+1 is queued on the worker stream before layer i is waited for and published,
        # so the GPU never idles between layers while this thread polls and publishes.
        pending = None
        for index, stage in enumerate(job.stages):
            if not job.gate.allows(index):  # paced: offer the last layer, then wait for credit
                if pending is not None:
                    self._publish(job, *pending)
                    pending = None
                self._wait_gate(job, index)
            begin = time.perf_counter()
            job.layer = stage.layer.index
            if self._stream is not None:
                # The swap's row list goes to the GPU here, on the worker stream (synchronised
                # before publishing), so step() launches its unpack without host work on the rows;
                # the layer's other lists come along in the same copy.
                stage.upload(self._device)
            if pending is not None and stage.nbytes and job.swapped < index - 1:
                self._publish(job, *pending)  # this layer waits for a slot: offer the last one first
                pending = None
            checks = self._transfer_layer(job, index, stage)
            self._compile_swap(job, index, stage)
            if self._stream is None:  # CPU: the transfer already ran; nothing to overlap
                self._publish(job, index, stage, checks, None, begin)
                continue
            done = _cuda.Event()
            done.record(self._stream)
            if pending is not None:
                self._publish(job, *pending)
            pending = (index, stage, checks, done, begin)
        if pending is not None:
            self._publish(job, *pending)

    def _wait_gate(self, job: _Job, index: int) -> None:
        """Block until the pace lets layer ``index`` start (a step() call or wait()), or stop.

        Nothing is posted meanwhile: every rank's gate opens at the same step, so no peer
        waits in an exchange for this rank (see :mod:`eplb_triton.pacing`)."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop or job.gate.allows(index))
            if self._stop:
                raise _Stopped

    def _publish(self, job: _Job, index: int, stage: _Stage, checks: list, done, begin: float) -> None:
        """Wait until layer ``index``'s transfer ran (``done``), check it, and offer it to step()."""
        in_flight, job.layer = job.layer, stage.layer.index  # a failure here is this layer's
        self._finish_stream(event=done)
        if checks:
            self._check_received(job, stage, checks)
        _fault("before_publish", rank=self._transfer.rank, layer=stage.layer.index)
        with self._cond:
            job.stats.layer_times_s.append(time.perf_counter() - begin)
            job.published = index + 1
            self._cond.notify_all()
        job.layer = in_flight

    def _compile_swap(self, job: _Job, index: int, stage: _Stage) -> None:
        """Compile the swap's unpack here, so the serving thread's first step() does not
        (about 50 ms once per kernel specialisation on an H100)."""
        if stage.device_rows is None or resolve_backend(job.backend, self._device) != "triton":
            return
        slot = job.slots[index % 2]
        with self._kernel_lock:
            stage.layer.layout.launch("unpack", slot.buffer[: stage.nbytes], dst_rows=stage.device_rows, compile_only=True)

    def _transfer_layer(self, job: _Job, index: int, stage: _Stage) -> list:
        """Stage every row this rank writes in the layer; reads live weights, writes none.

        Returns, with ``verify``, ``(round work, slot offset, mismatch flags)`` per round
        that received experts; the flags are checked once the stream has finished.
        """
        layout, eb, backend = stage.layer.layout, stage.layer.layout.expert_bytes, job.backend
        rank, layer_index = self._transfer.rank, stage.layer.index
        slot = job.slots[index % 2]
        if stage.nbytes:
            with self._cond:  # the slot's previous layer (index - 2) must have been swapped
                self._cond.wait_for(lambda: self._stop or job.swapped >= index - 1)
                if self._stop:
                    raise _Stopped
                event = slot.event
            if event is not None:
                self._stream.wait_event(event)  # GPU-side: the swap's unpack has read the slot
        _fault("layer_start", rank=rank, layer=layer_index)
        buf = slot.buffer[: stage.nbytes]
        if stage.local_src.size:
            local = buf[stage.local_offset : stage.local_offset + stage.local_src.size * eb]
            with self._kernel_lock:
                if stage.device_lists is not None:
                    layout.move("pack", local, src_rows=stage.device_lists["local_src"], backend=backend)
                else:
                    layout.pack(stage.local_src, local, backend=backend)
        checks = []
        rounds = len(stage.layer.rounds)
        for number, (work, offset) in enumerate(zip(stage.layer.rounds, stage.recv_offsets)):
            if self._stop:
                raise _Stopped
            send_buf = job.send_buffer[: work.send_rows.size * eb]
            recv_buf = buf[offset : offset + work.recv_rows.size * eb]
            where = f"layer {layer_index}, round {number + 1}/{rounds}"
            mover = self._mover(job, work)
            if job.verify:  # framed: data, then a second batch with the checksum trailers
                if work.send_rows.size:
                    with self._kernel_lock:
                        layout.pack(work.send_rows, send_buf, backend=backend)
                sends = _per_peer(send_buf, work.send_peers, work.send_counts, eb)
                recvs = _per_peer(recv_buf, work.recv_peers, work.recv_counts, eb)
            _fault("before_send", rank=rank, layer=layer_index, round=number)
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
            work.count_into(job.stats, len(labels))
            _fault("in_flight", rank=rank, layer=layer_index, round=number, received=recvs)
            if job.verify and work.recv_rows.size:
                received = torch.cat(
                    [t[: c * CHECKSUM_BYTES].view(torch.int64) for t, c in zip(
                        _trailers(job.recv_sums, work.recv_peers, work.recv_counts).values(), work.recv_counts
                    )]
                )
                data = buf[offset : offset + work.recv_rows.size * eb]
                with self._kernel_lock:
                    checks.append((number, work, expert_checksums(data, eb) != received))
                job.stats.verified_experts += int(work.recv_rows.size)
        if stage.dup_dst_pos.size:  # replicas: copies of packed experts already in the slot
            table = buf.view(-1, eb)
            lists = stage.device_lists
            if lists is None:
                lists = index_tensors({"dup_src": stage.dup_src_pos, "dup_dst": stage.dup_dst_pos}, buf.device)
            table[lists["dup_dst"]] = table[lists["dup_src"]]
        return checks

    def _mover(self, job: _Job, work: RoundWork):
        """What moves ``work``'s bytes: the transfer group, or the round's p2p exchange (with
        ``verify`` the trailers follow all the data in the send buffer: two pulls per peer)."""
        if job.p2p is None:
            return self._transfer
        return job.p2p.exchange_for(work.round_traffic, work.expert_bytes, verify=job.verify, split=job.verify)

    def _post(
        self, job: _Job, work: RoundWork, send_buf: torch.Tensor, sends: dict, recvs: dict, where: str = "exchange",
        comm=None,
    ) -> tuple[list, list]:
        """Start a round's exchange (and with ``verify`` its trailers' exchange, right after).

        Two batches per round with ``verify``: every rank posts them in the same order, so
        each peer pair matches data with data and trailer with trailer. ``comm``: the round's
        mover (default: the transfer group).
        """
        comm = self._transfer if comm is None else comm
        if job.p2p is not None:  # the trailers right after the data, where peers read them
            job.send_sums = job.send_buffer[send_buf.numel() :]
        requests = comm.exchange(sends, recvs, where=where)
        labels = Communicator.op_labels(sends, recvs)
        if job.verify:
            with self._kernel_lock:
                sum_sends = _fill_send_trailers(job, work, send_buf)
            sum_recvs = _trailers(job.recv_sums, work.recv_peers, work.recv_counts)
            requests = requests + comm.exchange(sum_sends, sum_recvs, where=f"{where}, checksums")
            labels = labels + Communicator.op_labels(sum_sends, sum_recvs)
        return requests, labels

    def _check_received(self, job: _Job, stage: _Stage, checks: list) -> None:
        """Raise :class:`ChecksumMismatchError` for the first received expert whose checksum differs."""
        rank, layer_index = self._transfer.rank, stage.layer.index
        for number, work, flags in checks:
            bad = torch.nonzero(flags.cpu()).flatten().tolist()
            if not bad:
                continue
            position = bad[0]
            peers = np.repeat(np.asarray(work.recv_peers, dtype=np.int64), work.recv_counts)
            peer, row = int(peers[position]), int(work.recv_rows[position])
            expert = stage.layer.expert_at(rank, row)
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            message = (
                f"layer {layer_index}, round {number + 1}/{len(stage.layer.rounds)}: rank {rank}: checksum mismatch "
                f"for expert {expert} received from peer {peer} (row {row}){more}; layer {layer_index} was not applied"
            )
            log.error("%s", message)
            raise ChecksumMismatchError(message, layer=layer_index, peer=peer, expert=expert)

    def _drain(self, job: _Job) -> None:
        """Post every exchange of the job this rank has not posted yet, with junk, and wait.

        Stopping mid-job must not leave a peer blocked in an exchange that expects ours (nor
        leave unmatched ops in the group), so on close() or after a failure the remaining
        exchanges run anyway: junk sent, received bytes dropped, no slot touched, no swap.
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
        first_layer, first_round = job.cursor
        pending = [
            (stage, number)
            for stage in job.stages[first_layer:]
            for number in range(first_round if stage is job.stages[first_layer] else 0, len(stage.layer.rounds))
        ]
        try:
            junk_recv = None
            for stage, number in pending:
                if self._abandon:
                    return
                work, eb = stage.layer.rounds[number], stage.layer.layout.expert_bytes
                need = work.recv_rows.size * eb
                if junk_recv is None or junk_recv.numel() < need:
                    junk_recv = torch.empty(need, dtype=torch.uint8, device=self._device)
                send_buf = job.send_buffer[: work.send_rows.size * eb]
                where = f"drain: layer {stage.layer.index}, round {number + 1}/{len(stage.layer.rounds)}"
                mover = self._mover(job, work)
                if job.verify:
                    sends = _per_peer(job.send_buffer, work.send_peers, work.send_counts, eb)
                    recvs = _per_peer(junk_recv, work.recv_peers, work.recv_counts, eb)
                    requests, labels = self._post(job, work, send_buf, sends, recvs, where=where, comm=mover)
                else:  # the same batches as a peer still transferring posts
                    requests, labels, _ = work.post_batches(
                        stage.layer.layout, send_buf, junk_recv, mover, job.backend, pack=False, where=where
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
            event = _cuda.Event()
            event.record(self._stream)
        delay = _POLL_MIN_S
        while not event.query():
            if deadline is None and self._stop:
                raise _Stopped
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the transfer stream did not finish (a NCCL peer is gone?)")
            time.sleep(delay)
            delay = min(2 * delay, _POLL_MAX_S)

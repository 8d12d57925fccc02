"""The serving thread's side of :class:`TransferWorker`: construct, submit, step, wait, close.

The other jobs live in mixins, one file each: :mod:`.groups` (process groups),
:mod:`.staging` (the staging buffers and the swap), :mod:`.agreement` (step agreement, failures) and
:mod:`.thread` (the worker thread). The package docstring draws the whole picture.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

import torch

from ..comm import Communicator
from ..inputs import agree_inputs, check_worker_inputs, default_budget_bytes, weights_signature
from ..layout import resolve_backend
from ..maps import EPGroup, ExpertMap
from ..pacing import Pacing, TransferProgress, check_pacing
from ..p2p import P2PTransport, resolve_transport
from ..prepare import prepare_layers
from ..settings import int_setting
from ..stacked import layers_per_exchange
from ..stats import TransferStats
from .agreement import AgreementMixin
from .board import StepBoard
from .groups import GroupsMixin, _rendezvous
from .staging import StagingMixin, _Job
from .thread import ThreadMixin

log = logging.getLogger("eplb_triton.worker")  # one logger for the package (documented name)

#: Layers' local rows one staging pass of the worker may hold by default (sends and receives;
#: the receives wait in the staging buffers, so this bounds the send buffer). Balancer placements
#: send and receive more rows than a layer holds (qwen3-30b-a3b preset: 71-87 of 66 per rank), so
#: at one layer every layer took two passes. Two H200, 16 layers, the default worker (2 buffers),
#: two layers / one (bench/results/link_speed-16layers-pass9-h200x2-run43.md): the preset 1.796 /
#: 2.520 ms per layer; the reference configs, one pass either way, 1.032 / 1.019 (qwen3-30b-a3b-bf16),
#: 1.392 / 1.389 (deepseek-v3-fp8), 0.950 / 0.990 (tiny-bf16).
PASS_LAYERS = 2
PASS_LAYERS_ENV = "EPLB_TRITON_WORKER_PASS_LAYERS"  # overrides it (1: one layer, as before session 9)

_WAIT_SLICE_S = 0.05  # wait() re-agrees at least this often, so a failure on a peer is seen


class TransferWorker(GroupsMixin, StagingMixin, AgreementMixin, ThreadMixin):
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
        max_buffer_bytes: bounds one staging pass (sends + receives + local moves per rank,
            as in the blocking API), which bounds the send buffer; received rows are kept
            until their swap in ``layers_ahead`` staging buffers of at most one layer's local
            rows each. Default (None): two layers' local rows per pass (``PASS_LAYERS``), so a
            layer that sends and receives most of its rows moves in one pass; the send buffer
            holds what the largest pass sends.
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
            each pass's messages from this worker's symmetric send buffer over NVLink (copy
            engines; mapped at the first submit that needs it, released by :meth:`close`).
            Same on every rank; one that cannot work is refused here on every rank.
        reserve: allocate the staging every later :meth:`submit` needs here, once, for the
            worst plan these weights and options allow (``layers_ahead`` staging buffers of one layer's
            local rows packed, plus one pass's send buffer), and keep it: a runtime's profile run then
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
        layers_ahead: keyword-only, the most layers the worker thread may have transferred and
            not yet swapped (2, the default: double buffering); each takes a staging buffer of
            at most one layer's local rows. More lets one :meth:`step` swap several layers for
            one agreement when steps come less often than layers finish (a tight loop of
            ``step()`` calls, or :meth:`wait`). The same on every rank (agreed at construction).
            From 4 on, without ``verify`` or a pace, up to ``min(4, layers_ahead // 2)``
            consecutive layers of the same row shapes share one exchange (a stack, as in the
            blocking API: one pack, one message per peer, one unpack at the swap; the staging
            then holds ``layers_ahead // k`` buffers of ``k`` layers, and the send buffer a
            stack's sends: at most ``k`` layers' local rows, or ``max_buffer_bytes`` when that
            is set).

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
        layers_ahead: int = 2,
    ):
        # A non-group ep_group/transfer_group is a TypeError here, before torch.distributed.
        ep = Communicator.from_group(ep_group)
        moves = ep if transfer_group is None else Communicator.from_group(transfer_group)
        pacing = Pacing()

        def check_options(_checked) -> dict[str, object]:  # inside the input stage: errors become the verdict
            nonlocal pacing
            if not isinstance(log_progress, bool):
                raise TypeError(f"log_progress must be a bool, got {type(log_progress).__name__}")
            if isinstance(layers_ahead, bool) or not isinstance(layers_ahead, int):
                raise TypeError(f"layers_ahead must be an int, got {type(layers_ahead).__name__}")
            if layers_ahead < 1:
                raise ValueError(f"layers_ahead must be at least 1, got {layers_ahead}")
            pacing = check_pacing(layers_per_step, bytes_per_step, steps_per_layer)
            device = _checked.layouts[0].device if _checked.layouts else None
            if device is not None:
                resolve_backend(backend, device)  # a bad pack/unpack backend: refused on every rank
            # the gates must open on the same layers everywhere, and one transport: agreed
            return {**pacing.options(), "transport": resolve_transport(transport, moves, device), "layers_ahead": layers_ahead}

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
        self._layers_ahead = layers_ahead
        self._last_progress = TransferProgress()
        self._device = checked.layouts[0].device if checked.layouts else torch.device("cpu")
        self._layer_rows_bytes = default_budget_bytes(checked.layouts or [], verify=False)  # one layer's local rows, packed
        self._owned_groups: list = []
        if ep.world_size > 1:
            _rendezvous(ep, checked.timeout_s)  # bounds group creation by timeout_s
        self._transfer, self._control = self._make_communicators(ep_group, transfer_group)
        try:
            agree_inputs(self._control, checked)
        except (TypeError, ValueError):
            self._release_owned_groups()  # the agreement completed: the groups are healthy
            raise
        # step()'s agreement over shared memory where every rank can map it (one host), else gloo
        self._board = StepBoard.create(self._control, timeout_s=checked.timeout_s)
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
        if job is not None:
            return self._progress_of(job)
        if not isinstance(self._last_progress, TransferProgress):  # a finished job's numbers, summed up when asked
            stats, total, elapsed_s = self._last_progress
            self._last_progress = TransferProgress.of(
                total, total, total, stats.total_bytes_sent, stats.total_bytes_received, elapsed_s
            )
        return self._last_progress

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
        options = self._prepare_options()
        layers = prepare_layers(
            old_global_expert_indices,
            new_global_expert_indices,
            self.expert_weights,
            self._control,
            options.pop("max_buffer_bytes", self.max_buffer_bytes),
            verify=self.verify,
            timeout_s=self.timeout_s,
            expected_weights=self._weights_signature,
            transport=self.transport,
            **options,
        )
        job = self._build_job(layers)
        self._load_kernels(job)  # before the worker thread may launch anything (see there)
        with self._cond:
            if not job.prepared_layers:
                self._last_stats = job.stats
                self._last_progress = TransferProgress.of(0, 0, 0, 0, 0, 0.0)
                return
            self._job = job
            self._cond.notify_all()

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
        try:
            done = self._swap_ready(job, ready, lift)  # and the step's pace credit
        except BaseException:  # a failed launch here is not recoverable: stop the thread, no leak
            self._shutdown()
            raise
        if job.swapped == len(job.prepared_layers):
            job.finished_at = time.monotonic()
            self._last_stats = job.stats
            # made a TransferProgress when asked (progress): 15-30 us less host time in this step()
            self._last_progress = (job.stats, job.layers_in(len(job.prepared_layers)), job.finished_at - job.submitted_at)
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

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TransferWorker is closed (close() was called or a transfer failed); create a new one")

    def _stack_most(self) -> int:
        """The most layers one exchange of the next submit may carry (1: no stacks): stacks
        need two staging buffers of them, and neither ``verify`` nor a pace (which opens
        layer by layer)."""
        if self.verify or self._pacing.paced:
            return 1
        return max(1, min(layers_per_exchange(), self._layers_ahead // 2))

    def _pass_layers(self) -> int:
        """Layers' local rows one staging pass may hold when ``max_buffer_bytes`` is None
        (:data:`PASS_LAYERS`, or ``EPLB_TRITON_WORKER_PASS_LAYERS``; agreed through the budget
        it sets)."""
        return int_setting(PASS_LAYERS_ENV, PASS_LAYERS, minimum=1)

    def _prepare_options(self) -> dict[str, object]:
        """:func:`prepare_layers`' budget and stacking arguments for the next submit.

        By default (``max_buffer_bytes`` None) a pass may take :meth:`_pass_layers` layers'
        local rows of sends and receives: the receives wait in the staging buffers, so this
        bounds the sends, and a layer that sends and receives most of its rows (as balancer
        placements do) moves in one pass rather than two. Stacks: at most :meth:`_stack_most`
        (``k``) layers each, within ``max(k, pass layers)`` layers' local rows, or within
        ``max_buffer_bytes`` when that is set."""
        most = self._stack_most()
        options: dict[str, object] = {}
        if self.max_buffer_bytes is None:
            passes = self._pass_layers()
            options["max_buffer_bytes"] = passes * self._layer_rows_bytes
            slot = max(most, passes) * self._layer_rows_bytes
        else:
            slot = self.max_buffer_bytes
        if most >= 2:
            options.update(stack=True, stack_most=most, stack_slot_bytes=slot)
        return options

    def _send_bound(self, budget: int) -> int:
        """The most bytes one item's sends may take (``reserve=True`` sets them aside), given the
        budget of ``max_buffer_bytes`` (or one layer's local rows when it is None)."""
        if self.max_buffer_bytes is not None:
            return budget
        return max(self._stack_most(), self._pass_layers()) * budget

    def _progress_of(self, job: _Job) -> TransferProgress:
        with self._cond:
            done, moved = job.layers_in(job.swapped), job.layers_in(job.published)
        end = job.finished_at if job.finished_at is not None else time.monotonic()
        stats = job.stats  # counted by the worker thread: at worst one pass behind
        return TransferProgress.of(
            job.layers_in(len(job.prepared_layers)), done, moved, stats.total_bytes_sent, stats.total_bytes_received,
            end - job.submitted_at,
        )

"""Transfer: the blocking whole-model API, and the public entry to the blocking path.

A rearrangement flows through one module per idea, in this order::

    prepare.py   check and agree on the inputs, plan, schedule -> per layer a LayerWork of PassWork
    passes.py    PassWork: one staging pass's rows, staging layout and per-peer message format
    executor.py  LayerWork.run (pack, exchange, verify, write, roll back) and the blocking loop
    transfer.py  rearrange_expert_weights_inplace, reserve, staging_bound, finish_transfer (confirmation)
    stats.py     TransferStats, what each rank did (the worker fills it too)

Every row a pass reads is read before that pass writes anything, so a row may be both a
source and a destination. When a layer does not fit in ``max_buffer_bytes`` it runs in
several passes, ordered so that a row is never overwritten before the last pass that reads
its old contents; a cycle of moves too big for one pass is broken by stashing one row (see
:mod:`eplb_triton.schedule`).

Reliability (see :func:`rearrange_expert_weights_inplace`):

* no row is written before the receives of its pass completed; a layer that needs several
  passes saves the old contents of what it overwrites (undo buffer) and is rolled back on
  failure, so after any failure each layer on each rank is entirely old or entirely new;
* ``timeout_s`` bounds every wait on peers (:meth:`Communicator.wait`), and a final tiny
  all-to-all (:meth:`Communicator.confirm`) makes every rank learn about a failure anywhere
  (with ``timeout_s``, ``verify`` or gloo; over NCCL without them nothing can report a failure,
  and the call returns once its work is queued: :func:`_confirms`);
* ``verify=True`` sends a checksum per expert (:mod:`eplb_triton.checksum`) and checks it
  before anything is written.

The building blocks (:func:`prepare_layers`, :class:`LayerWork`, :class:`PassWork`,
:func:`finish_transfer`) are what the background worker drives;
:func:`rearrange_expert_weights_inplace` is the blocking API.

Network rounds (``rounds=True|"pair"|"expert"``, see :func:`eplb_triton.plan.network_rounds`):
each pass's exchange is split into planner rounds in which a rank sends to at most one peer
and receives from at most one (one isend + one irecv at most), waited on one after the other.
Everything is still packed once per pass before the first exchange and written after the
last, so atomicity and ``verify`` are unchanged; a planner round moves a slice of a per-peer
message (``"pair"``: the whole message; ``"expert"``: one expert, the last one with the
checksum trailer).

Testing hook: :data:`fault_hook`, when set, is called as ``fault_hook(point, **info)`` at the
named points ``layer_start``, ``before_send``, ``posted`` (after each batch of p2p ops is
issued; ``info["ops"]``: its ``(peer, "send"|"recv")`` labels, ``info["network_round"]``: the
planner round inside the pass, 0 without ``rounds=``), ``in_flight`` (``info["received"]``: the
received messages, by peer, before they are checked), ``pass_applied`` (a pass written) and
``before_confirm``; ``info["pass_index"]`` is the staging pass's index. It may raise,
sleep, exit or corrupt ``received`` to simulate failures. It is the one hook of both paths: the
worker thread calls it too, at the points :func:`eplb_triton.worker.hooks.fault` lists.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from .comm import ChecksumMismatchError, Communicator, PeerError, TransferError
from .executor import LayerWork, defer_layer_times, layer_times, run_layers, staging_view
from .inputs import default_budget_bytes
from .layout import ExpertLayout
from .maps import EPGroup, ExpertMap, RankMapping
from .passes import PassWork
from .prepare import agree_on_inputs, prepare_layers
from .stats import TransferStats

__all__ = [
    "ChecksumMismatchError",
    "LayerWork",
    "PeerError",
    "PassWork",
    "TransferError",
    "TransferStats",
    "finish_transfer",
    "prepare_layers",
    "rearrange_expert_weights_inplace",
    "reserve",
    "staging_bound",
    "staging_view",
]

logger = logging.getLogger("eplb_triton.transfer")  # one logger for the blocking path (documented name)

#: Test-only fault injection: ``fault_hook(point, **info)`` at named points (module docstring).
fault_hook: Callable[..., None] | None = None


def fault(point: str, **info) -> None:
    """Call :data:`fault_hook` if set (both paths call this one hook)."""
    hook = fault_hook
    if hook is not None:
        hook(point, **info)


def staging_bound(expert_weights: Sequence[Sequence[torch.Tensor]], max_buffer_bytes: int | None = None, *, verify: bool = False) -> int:
    """The most staging bytes one rank's blocking rearrangement of these weights can use:
    ``max_buffer_bytes``, or by default the largest layer's local rows packed (with
    ``verify``, plus their checksum trailers). Any plan fits in it (see :func:`schedule_layer`)."""
    layouts = [ExpertLayout(tensors) for tensors in expert_weights]
    if max_buffer_bytes is not None:
        return int(max_buffer_bytes)
    return default_budget_bytes(layouts, verify)


def reserve(
    expert_weights: Sequence[Sequence[torch.Tensor]],
    *,
    max_buffer_bytes: int | None = None,
    verify: bool = False,
    atomic: bool = False,
) -> torch.Tensor:
    """Allocate, up front, the staging a blocking rearrangement of these weights will use.

    Pass the result as ``staging=`` (with the same ``max_buffer_bytes`` and ``verify``) to
    :func:`rearrange_expert_weights_inplace`: it then allocates no staging of its own, so
    the memory can be counted by a runtime's profile run and the first rebalance allocates
    nothing. ``atomic=True`` adds room for the undo copy of layers that need several passes
    (one layer's local rows, packed); without it such a call allocates that copy when needed
    (or pass ``atomic=False`` to the rearrangement as well).

    Returns a uint8 tensor on the weights' device; keep it for as long as rearrangements run.
    """
    bound = staging_bound(expert_weights, max_buffer_bytes, verify=verify)
    if atomic:
        bound += max(ExpertLayout(tensors).num_local * ExpertLayout(tensors).expert_bytes for tensors in expert_weights)
    device = expert_weights[0][0].device
    return torch.empty(max(bound, 1), dtype=torch.uint8, device=device)


def finish_transfer(
    comm: Communicator,
    layers: Sequence[LayerWork],
    stats: TransferStats,
    errors: Sequence[ChecksumMismatchError] = (),
    *,
    timeout_s: float | None = None,
    confirm: bool = True,
) -> None:
    """The last step of a rearrangement: every rank learns whether every rank succeeded.

    Runs :meth:`Communicator.confirm` (a tiny all-to-all bounded by ``timeout_s``) when any
    layer moves data over the network, so a rank that died or stalled is named on every rank,
    and a checksum failure on one rank (``errors``: this rank's, its layers already rolled
    back) is raised on all of them. Without network traffic no rank depends on another and
    nothing is exchanged; nor with ``confirm=False`` (see :func:`_confirms`).

    Raises:
        PeerError: a peer did not confirm (dead, stalled, or failed earlier).
        ChecksumMismatchError: some rank's ``verify`` failed; the message lists every
            failing rank's first error (``.layer``/``.peer``/``.expert`` are this rank's own,
            if it failed).
    """
    failed = bool(errors)
    if confirm and any(layer.has_network for layer in layers) and comm.world_size > 1:
        fault("before_confirm", rank=comm.rank)
        failed_ranks = comm.confirm(failed, timeout_s=timeout_s, where="final confirmation")
        stats.control_ops += 2 * (comm.world_size - 1)
    else:
        failed_ranks = [comm.rank] if failed else []
    if not failed_ranks:
        return
    mine = "; ".join(str(e) for e in errors) if errors else None
    messages = comm.all_gather_object(mine) if comm.world_size > 1 else [mine]
    text = " | ".join(m for m in messages if m)
    first = errors[0] if errors else None
    if first is None:
        text = f"rank {comm.rank} applied all its layers, but: {text}"
    raise ChecksumMismatchError(
        text,
        layer=first.layer if first else None,
        peer=first.peer if first else None,
        expert=first.expert if first else None,
    )


def _run_times(times: list[tuple[list[LayerWork], list]]) -> list[float]:
    """Seconds per layer of every run (:func:`layer_times` of each run's items and marks)."""
    return [t for items, marks in times for t in layer_times(items, marks)]


def _confirms(comm: Communicator, timeout_s: float | None, verify: bool, forced: bool = False) -> bool:
    """Whether the call ends with the final confirmation. Not over NCCL without ``timeout_s``
    or ``verify``: no rank can fail there but by a NCCL error, which no exchange reports (a
    dead peer hangs the confirmation as it hangs an exchange, until the group's own timeout),
    so it would only make the host wait for the device (0.3 ms after the last layer, run 45).
    The call then returns once every exchange is queued on the stream, as vLLM's does.
    ``forced``: the agreed ``EPLB_TRITON_CONFIRM=1`` (the behaviour before session 10)."""
    return forced or timeout_s is not None or verify or comm.dist_backend != "nccl"


def rearrange_expert_weights_inplace(
    old_global_expert_indices: ExpertMap,
    new_global_expert_indices: ExpertMap,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    ep_group: EPGroup = None,
    *,
    max_buffer_bytes: int | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
    verify: bool = False,
    atomic: bool = True,
    log_traffic: bool = False,
    rank_mapping: RankMapping | None = None,
    rounds: bool | str | None = None,
    ranks_per_node: int | None = None,
    staging=None,
    transport: str = "auto",
) -> TransferStats:
    """Rearrange this rank's expert weights in place so every row holds its new expert.

    Args:
        old_global_expert_indices: ``(num_layers, num_physical)`` (or ``(num_physical,)``)
            map of the current placement, torch tensor or numpy array; ``-1`` = empty slot.
        new_global_expert_indices: the target placement, same shape.
        expert_weights: ``expert_weights[layer][i]`` is a tensor ``(num_local, ...)`` of any
            dtype with contiguous rows; all on one device (CPU for gloo, CUDA for NCCL).
        ep_group: the EP process group (default: the world group; none initialised = a
            single rank).
        max_buffer_bytes: staging memory bound per rank (default: one layer's local weights,
            packed, or two experts where a rank holds one: enough for every valid pair of
            maps); a layer that needs more runs in passes. A budget too small for some layer
            raises ValueError stating the smallest budget that works. A budget that holds two
            layers' staging is used for two slots: layer i+1 is packed and posted while layer
            i is on the wire (``TransferStats.overlapped_layers``). Where half the budget holds
            several consecutive one-pass layers of the same row shapes, up to 4 of them share
            one pack, one exchange and one unpack (``TransferStats.stacked_layers``,
            :mod:`eplb_triton.stacked`; not with ``verify`` or ``rounds``): on two H200 a
            budget of 8 layers brought 48 qwen3 layers from 1.71x (the default budget; 1.59x
            with two slots) to 1.26x the time of one NCCL message per layer.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for pack/unpack/copy.
        timeout_s: the longest any wait on peers may take (each exchange, the input
            agreement and the final confirmation); ``None`` = the process group's timeout.
            When a peer dies or stalls, every surviving rank raises :class:`PeerError`
            naming the layer (if any) and the peer within about ``timeout_s`` (up to twice
            that when the failure cascades through a rank that was itself waiting).
        verify: send a checksum with every expert and check it before writing; a mismatch
            leaves that layer old on the receiving rank and raises
            :class:`ChecksumMismatchError` on every rank after all layers were exchanged.
            Costs one checksum pass over the sent and the received bytes and 8 bytes per
            expert on the wire (trailer padded to 16 per peer).
        atomic: keep an undo copy for layers that run in several passes, so a failure rolls
            the layer back (memory: the rows written by all passes but the last, at most one
            layer's local rows, on the weights' device, on top of ``max_buffer_bytes``;
            reported as ``peak_undo_bytes``). Single-pass layers need no copy. With
            ``atomic=False`` such layers may be left half-applied by a failure.
        log_traffic: log this rank's per-peer bytes at INFO on logger ``eplb_triton.transfer``
            (otherwise at DEBUG).
        rank_mapping: elastic EP, old rank -> new rank (``-1`` = removed); the maps then
            have different EP sizes. Scale-down runs on the old (larger) group and removed
            ranks only send; scale-up runs on the new group and new ranks only receive.
            See :func:`eplb_triton.plan.normalize_elastic_maps`.
        rounds: ``None`` (default): each pass exchanges with every peer at once (one
            isend + one irecv per peer). ``True`` or ``"pair"`` / ``"expert"``: the exchange
            is split into the planner's network rounds (:func:`eplb_triton.plan.network_rounds`),
            in which every rank sends to at most one peer and receives from at most one, run
            one after the other (``"pair"``: whole per-peer messages, fewest rounds;
            ``"expert"``: one expert per rank and round). Bytes moved and results are the
            same; all reads of a pass still precede its writes. Same value on every rank.
        ranks_per_node: ranks per node; a sender on the receiver's node is preferred (see
            :func:`eplb_triton.plan.plan_rearrangement`). Same value on every rank.
        staging: a buffer the caller already holds (a runtime's scratch buffer, or
            :func:`reserve`'s result): one contiguous tensor or a list of tensors (the
            largest contiguous one is used). The staging then lives in it and its bytes cap
            ``max_buffer_bytes``, so no staging memory is allocated; with ``atomic`` the
            undo copy (layers that need several passes) is taken from what the staging
            leaves free, else allocated. Its contents are overwritten.
        transport: ``"nccl"``: the EP group's own isend/irecv (NCCL on GPUs, gloo on CPU).
            ``"p2p"``: every rank maps the others' symmetric staging buffer (:mod:`eplb_triton.p2p`;
            a NCCL group on one node; the staging then lives in that buffer, cached per group
            and device until :func:`eplb_triton.p2p.release_cached`); a one-pass layer's pack
            kernel writes each message straight into its receiver's slot over NVLink
            (``EPLB_TRITON_P2P_PUSH=0``: receivers pull them with the copy engines), each layer
            written before the next is packed (not counted in ``overlapped_layers``). ``"auto"`` (default): ``"nccl"``,
            or ``"p2p"`` when ``EPLB_TRITON_TRANSPORT=p2p`` and it can work. Same on every
            rank; ``"p2p"`` where it cannot work raises ``ValueError`` on every rank.

    Returns:
        This rank's :class:`TransferStats`. Over NCCL without ``timeout_s`` or ``verify`` the
        call returns once every layer's work is queued on the current CUDA stream, as torch
        ops and vLLM's rearrangement do: work queued after it on that stream sees the new
        weights (another stream must wait for this one); reading ``layer_times_s`` waits
        for the device. Otherwise it returns after every rank confirmed its layers.

    Raises:
        ValueError, TypeError: bad input, raised on every rank before any weight is touched.
        PeerError: a peer failed or missed ``timeout_s``; the process group must be
            re-created. Each layer on each rank is entirely old or entirely new.
        ChecksumMismatchError: ``verify`` failed somewhere (the group is still usable).
    """
    comm = Communicator.from_group(ep_group)
    agreed = agree_on_inputs(
        old_global_expert_indices,
        new_global_expert_indices,
        expert_weights,
        comm,
        max_buffer_bytes,
        rank_mapping,
        verify=verify,
        timeout_s=timeout_s,
        rounds=rounds,
        ranks_per_node=ranks_per_node,
        staging=staging,
        transport=transport,
        backend=backend,
        stack=True,
        plan_ahead=True,
        direct_sends=True,
        pushed_sends=True,
    )
    stats = TransferStats.empty(comm.rank, comm.world_size)
    runs = agreed.layer_runs()
    # Each run of layers is built (planned, scheduled) while the one before is on the wire:
    # the host queues a run's exchanges without waiting for them. The first run alone delays
    # the first exchange; a failure in any run leaves every later layer untouched.
    layers: list[LayerWork] = []
    errors: list[ChecksumMismatchError] = []
    times: list[tuple[list[LayerWork], list]] = []  # (items, marks) per run, read at the end
    for first, stop in runs:
        items = agreed.build(first, stop)
        if not items:
            continue
        try:
            more, marks = run_layers(
                items, comm, backend, stats, staging=staging, atomic=atomic, timeout_s=timeout_s, transport=transport,
                max_buffer_bytes=max_buffer_bytes, first_mark=sum(len(m) for _, m in times),
            )
        except TransferError:
            stats.failed_layers.extend(range(stop, agreed.num_layers))  # never started: old everywhere here
            raise
        layers += items
        errors += more
        times.append((items, marks))
    if not layers:
        return stats
    confirm = _confirms(comm, timeout_s, verify, forced=bool(agreed.checked.extra_options.get("confirm")))
    try:
        finish_transfer(comm, layers, stats, errors, timeout_s=timeout_s, confirm=confirm)
    except ChecksumMismatchError as exc:  # every exchange completed: the times can be read
        stats.layer_times_s = _run_times(times)
        exc.stats = stats
        raise
    except TransferError as exc:  # a peer failed: the stream may never reach the last mark
        exc.stats = stats
        raise
    # read when asked (CUDA events: after the device ran the layers), not here
    defer_layer_times(stats, lambda: _run_times(times))
    if logger.isEnabledFor(logging.DEBUG) or log_traffic:
        for index, seconds in enumerate(stats.layer_times_s):
            logger.debug("rank %d layer %d: %.6f s", comm.rank, index, seconds)
        logger.log(logging.INFO if log_traffic else logging.DEBUG, "%s", stats.traffic_summary())
    return stats

"""Prepare a rearrangement: check and agree on the inputs, plan, schedule, and build each
layer's per-rank work (:class:`~eplb_triton.executor.LayerWork` of
:class:`~eplb_triton.passes.PassWork`); touches no weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from .comm import Communicator
from .executor import LayerWork, staging_view
from .inputs import CheckedInputs, WeightsSignature, agree_inputs_start, check_inputs, default_budget_bytes, row_cost
from .layout import resolve_backend
from .maps import ExpertMaps
from .p2p import resolve_transport
from .passes import PassWork
from .plan import LayerPlan, RearrangementPlan, _check_options, plan_from_maps, rank_views, sends_one_run, with_rounds
from .schedule import capacity_rows, fits_one_pass, one_pass_rows_all, schedule_layer, smallest_budget_bytes
from .settings import int_setting
from .stacked import StackedLayout, layers_per_exchange, stack_groups, stack_key, stacked_rank_views

__all__ = [
    "AgreedInputs", "CHUNK_ENV", "PIPELINE_CHUNK_BYTES", "PLAN_AHEAD_ENV", "PLAN_AHEAD_LAYERS", "PLAN_AHEAD_MIN_LAYER_BYTES",
    "agree_on_inputs",
    "layer_runs", "pipeline_chunk_bytes", "plan_ahead_layers", "prepare_layers",
]


def _network_rounds(plan: LayerPlan, rank: int) -> list[tuple[int, int, int, int, int, int]]:
    """:attr:`PassWork.network_rounds` of ``rank`` from a plan with network rounds (rounds it is idle in are
    dropped: nobody waits for it there)."""
    out = []
    for send_peer, send_pos, recv_peer, recv_pos in plan.round_slices(rank):
        if send_peer < 0 and recv_peer < 0:
            continue
        span = []
        for pos in (send_pos, recv_pos):
            start, stop = (int(pos[0]), int(pos[-1]) + 1) if pos.size else (0, 0)
            if not np.array_equal(pos, np.arange(start, stop)):  # one contiguous slice per peer
                raise RuntimeError(f"rank {rank}: a network round moves non-contiguous positions {pos.tolist()}")
            span.append((start, stop))
        out.append((send_peer, *span[0], recv_peer, *span[1]))
    return out


#: Pieces of a per-peer message moved as separate batches, so the pack of piece ``i + 1`` overlaps
#: the wire time of piece ``i``. Off (0) by default: on two H200 over NVLink (NCCL 2.28.9,
#: bench/results/link_speed-h200x2-run1.json) pieces made every config slower: qwen3 1.45 ms per
#: layer whole vs 2.78 (4 MiB pieces) / 2.19 (16 MiB) / 1.99 (32 MiB); deepseek-fp8 2.29 vs
#: 2.59 / 2.52 / 3.60; the per-batch cost of a NCCL group exceeds the pack time it hides.
PIPELINE_CHUNK_BYTES = 0
CHUNK_ENV = "EPLB_TRITON_CHUNK_BYTES"  # overrides it (0 = whole messages); must match on every rank


def pipeline_chunk_bytes(dist_backend: str | None) -> int:
    """Bytes per message piece for this process group's backend (0 = whole messages).

    NCCL only by default: on gloo the pack is not asynchronous to the wire, so pieces only add
    messages. ``EPLB_TRITON_CHUNK_BYTES`` overrides it for any backend (tests use it on gloo).
    """
    default = PIPELINE_CHUNK_BYTES if dist_backend == "nccl" else 0
    return int_setting(CHUNK_ENV, default, minimum=0, what="an integer number of bytes")


#: The blocking API builds (plans, schedules) the first this many layers before its first
#: exchange, and each later run of layers (twice as long as the one before) while the previous
#: run is on the wire, where the budget leaves no error to find later (see agree_on_inputs).
#: On two H200, 48 layers: the first exchange left 3.8 ms (qwen3-30b-a3b-bf16, budget of 8
#: layers) to 6.6 ms (tiny-bf16) after the call began, against ~0.3 ms of wire per layer
#: (bench/results/gpu-session-h200x2-run37.log). A multiple of LAYERS_PER_EXCHANGE, so runs
#: end where stacks may.
PLAN_AHEAD_LAYERS = 4
PLAN_AHEAD_ENV = "EPLB_TRITON_PLAN_AHEAD"  # overrides it (0 = every layer before the first exchange); agreed
#: ... and only where the first run's busiest rank moves at least this many bytes in a layer: a
#: run costs the host fixed work (planning, views, the row upload, a drained pipeline at its
#: end), which pays only where the wire leaves the host idle. Two H200, runs on / off, ms per
#: layer (bench/results/link_speed-{48,16}layers-runs-h200x2-run39.md): deepseek-v3-fp8 (176 MB
#: per layer) 0.865 / 0.919 at 48 layers, 0.945 / 0.982 at 16; qwen3-30b-a3b-bf16 (75.5 MB) 0.491
#: / 0.498 and 0.567 / 0.577 (budget of 8 layers: 0.464 / 0.444 at 16); tiny-bf16 (25 MB) 0.318 /
#: 0.329 and 0.818 / 0.562.
PLAN_AHEAD_MIN_LAYER_BYTES = 128 << 20


def plan_ahead_layers(dist_backend: str | None) -> int:
    """The layers built before the first exchange: :data:`PLAN_AHEAD_LAYERS` on NCCL, 0 (all)
    elsewhere (a gloo exchange blocks the host: nothing would overlap the building; on the
    2-core CPU runs made 16 tiny layers 1.37 -> 1.95 ms each); ``EPLB_TRITON_PLAN_AHEAD``
    overrides it for any backend (tests use it on gloo)."""
    default = PLAN_AHEAD_LAYERS if dist_backend == "nccl" else 0
    return int_setting(PLAN_AHEAD_ENV, default, minimum=0)


def layer_runs(total: int, first: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the runs of ``total`` layers: ``first`` layers, then each run twice
    as long as the one before; one run of every layer when ``first`` is 0 or covers them."""
    if not first or total <= first:
        return [(0, total)] if total else []
    runs, at, size = [], 0, first
    while at < total:
        runs.append((at, min(total, at + size)))
        at, size = at + size, 2 * size
    return runs


#: 1: the blocking call sends a message straight from the weights where it can
#: (``agree_on_inputs(direct_sends=True)``); must match on every rank. Off by default: on two H200
#: (run 49, ms per layer at the default budget, on / off) it won only on deepseek-v3-fp8 at 48
#: layers (0.742 / 0.840) and lost on tiny-bf16 (0.397 / 0.272 at 48 layers, 1.039 / 0.809 at 4):
#: one op per tensor costs ~20 us of host each where the loop is host-bound, and the tiny scale
#: tensors' ops add latency; qwen3-30b-a3b-bf16 was even (0.438 / 0.440).
DIRECT_SENDS_ENV = "EPLB_TRITON_DIRECT_SENDS"
DIRECT_SENDS_DEFAULT = 0

#: 1: over the p2p transport the blocking call's pack kernel writes each one-pass layer's (or
#: stack's) messages straight into the receivers' slots (``agree_on_inputs(pushed_sends=True)``;
#: :meth:`eplb_triton.p2p._PassExchange.push_packed`); must match on every rank. 0: packed into
#: this rank's slot and pulled by copy engines. On two H200 (bench/p2p_pack_remote.py, session 11)
#: the pack into a peer's buffer ran at the copy engines' pull speed (qwen3-30b-a3b-bf16 layer
#: 0.223 ms, 0.77x one NCCL message) with one launch and one barrier less per layer.
P2P_PUSH_ENV = "EPLB_TRITON_P2P_PUSH"
P2P_PUSH_DEFAULT = 1

#: 1: the blocking call always ends with the final confirmation (before session 10 it did over
#: NCCL without ``timeout_s`` or ``verify`` too, waiting for the device); must match on every rank
CONFIRM_ENV = "EPLB_TRITON_CONFIRM"


def _chunk_experts(expert_bytes: int, chunk_bytes: int) -> int | None:
    """Experts per message piece (at least one), or None for whole messages."""
    return max(1, chunk_bytes // expert_bytes) if chunk_bytes else None


def prepare_layers(*args: Any, **kwargs: Any) -> list[LayerWork]:
    """Validate everything, agree with every rank, plan and schedule every layer; touches no
    weight. Takes :func:`agree_on_inputs`' arguments; returns one :class:`LayerWork` per layer
    or stack, in layer order.

    Raises the same ValueError/TypeError on every rank when any rank's input is bad.
    """
    agreed = agree_on_inputs(*args, **kwargs)
    return agreed.build(0, agreed.num_layers)


@dataclass
class AgreedInputs:
    """Inputs every rank checked and agreed on, planned for the layers of :attr:`planned`
    (the rest on demand): :meth:`build` makes the :class:`LayerWork` of a range of layers.

    :func:`prepare_layers` builds every layer at once; the blocking API may build them in
    runs (:meth:`layer_runs`), the next run while the previous one is on the wire.
    """

    checked: CheckedInputs
    rank: int
    verify: bool
    stack: bool
    stack_slot_bytes: int | None
    ranks_per_node: int | None
    plan: RearrangementPlan | None  # layers [0, planned), made while the agreement was in flight
    planned: int = 0

    @property
    def num_layers(self) -> int:
        return 0 if self.checked.maps is None else self.checked.maps.num_layers

    def layer_runs(self) -> list[tuple[int, int]]:
        """``(first, stop)`` of each run of layers to build and move in turn: the agreed
        ``plan_ahead`` first layers, then runs twice as long as the one before (each run is
        built while the one before is on the wire), or every layer at once. The same on every
        rank (agreed)."""
        return layer_runs(self.num_layers, self.checked.extra_options.get("plan_ahead", 0))

    def plan_of(self, first: int, stop: int) -> RearrangementPlan:
        """The plan of layers ``[first, stop)`` (its ``layers[i]`` is layer ``first + i``): the
        layers planned during the agreement are reused, the others planned now (layers are
        planned independently, so the result equals one plan of the range)."""
        if self.plan is not None and (first, stop) == (0, self.planned):
            return self.plan
        maps = _maps_of(self.checked.maps, first, stop)
        reuse = self.plan.layers[first : min(stop, self.planned)] if self.plan is not None else []
        if not reuse:
            return plan_from_maps(maps, ranks_per_node=self.ranks_per_node)
        # Large maps plan the first run during the agreement (PLAN_AT_ONCE_SLOTS); planning those
        # layers again cost 0.45-1.3 ms per 48-layer call on the H200 hosts (run 45).
        rest = maps.num_layers - len(reuse)
        later = plan_from_maps(_maps_of(maps, len(reuse), maps.num_layers), ranks_per_node=self.ranks_per_node).layers if rest else []
        return RearrangementPlan(layers=list(reuse) + later, maps=maps)

    def build(self, first: int, stop: int) -> list[LayerWork]:
        """The :class:`LayerWork` items of layers ``[first, stop)`` (stacks inside the range)."""
        if stop <= first:
            return []
        return _build_layers(self, self.plan_of(first, stop), first)


def agree_on_inputs(
    old_global_expert_indices,
    new_global_expert_indices,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    comm: Communicator,
    max_buffer_bytes: int | None = None,
    rank_mapping=None,
    *,
    verify: bool = False,
    timeout_s: float | None = None,
    rounds: bool | str | None = None,
    ranks_per_node: int | None = None,
    staging=None,
    expected_weights: WeightsSignature | None = None,
    transport: str = "auto",
    backend: str | None = None,
    stack: bool = False,
    stack_most: int | None = None,
    stack_slot_bytes: int | None = None,
    plan_ahead: bool = False,
    direct_sends: bool = False,
    pushed_sends: bool = False,
) -> AgreedInputs:
    """Check the inputs and agree on them with every rank, planning meanwhile (the first half
    of :func:`prepare_layers`); raises the same ValueError/TypeError on every rank when any
    rank's input is bad. Touches no weight.

    ``verify`` and ``rounds`` must be the same on every rank (they change the wire format
    and which ops meet; the agreement checks them). ``timeout_s`` bounds the agreement
    collective. ``rounds`` (``True``/``"pair"``/``"expert"``) splits each pass's exchange
    into planner rounds (:attr:`PassWork.network_rounds`). ``ranks_per_node``: prefer same-node
    senders (see :func:`~eplb_triton.plan.plan_rearrangement`). ``staging``: a caller-provided
    buffer (see :func:`rearrange_expert_weights_inplace`); its bytes cap the budget.

    Input checking and the agreement are :mod:`eplb_triton.inputs`; ``expected_weights``
    refuses tensors replaced since that signature was taken (the background worker).
    ``transport`` (``"auto"``/``"nccl"``/``"p2p"``, :func:`eplb_triton.p2p.resolve_transport`)
    is resolved and agreed here; ``"p2p"`` moves whole messages (no pieces, no ``rounds``).
    ``backend`` (pack/unpack: ``None``/``"auto"``/``"triton"``/``"torch"``) is checked here, so a bad
    value is refused on every rank (a rank may pick another valid one: it is not agreed).
    ``stack``: join consecutive one-pass layers into stacks that share one exchange where half
    the agreed budget holds them (:func:`eplb_triton.stacked.stack_groups`; not with ``verify``,
    ``rounds`` or message pieces); the result then has fewer items than layers. ``stack_most``
    (default :func:`~eplb_triton.stacked.layers_per_exchange`) caps the layers per stack and
    ``stack_slot_bytes`` (default half the budget) caps a stack's staging rows on each rank; both
    must be the same on every rank (``stack_most`` is agreed).

    ``direct_sends``: where every sender's rows for each receiver are one run of consecutive
    rows (:func:`~eplb_triton.plan.sends_one_run`), send each message straight from the weights'
    rows, nothing packed (:meth:`PassWork.from_view`; one-pass layers outside stacks, the NCCL
    transport, dense rows, no ``verify``, planner rounds or message pieces) when
    ``EPLB_TRITON_DIRECT_SENDS=1`` (agreed; off by default: :data:`DIRECT_SENDS_DEFAULT`).

    ``pushed_sends``: over the p2p transport, one-pass layers (and stacks) whose receives fit
    the staging are packed straight into the receivers' slots (:data:`P2P_PUSH_ENV`, agreed;
    :attr:`PassWork.pushed`).

    ``plan_ahead``: allow building the layers in runs (:meth:`AgreedInputs.layer_runs`, the
    first :func:`plan_ahead_layers` planned here) when nothing can fail after this stage
    (transport ``"nccl"``, a budget with room for any plan: every layer's local rows) and the
    first run's busiest rank moves :data:`PLAN_AHEAD_MIN_LAYER_BYTES` in a layer. Otherwise every
    layer is planned here; a budget too small for some layer raises in
    :meth:`AgreedInputs.build`, on every rank, before anything moves.
    """
    def more_checks(checked: CheckedInputs) -> dict[str, object]:
        # part of the input stage: errors become this rank's verdict; the result is agreed on
        options: dict[str, object] = {"chunk_bytes": pipeline_chunk_bytes(comm.dist_backend)}  # which ops meet
        if stack:  # which layers share a message
            options["layers_per_exchange"] = layers_per_exchange() if stack_most is None else stack_most
        device = checked.layouts[0].device if checked.layouts else None
        if device is not None:
            resolve_backend(backend, device)  # a bad value raises here, inside the agreed stage
        options["transport"] = resolve_transport(transport, comm, device)  # same on every rank
        if options["transport"] == "p2p":  # one pull per peer message: no pieces, no planner rounds
            options["chunk_bytes"] = 0
            if checked.round_kind is not None:
                raise ValueError(f"transport='p2p' moves whole messages; rounds={rounds!r} needs transport='nccl'")
        if ranks_per_node is not None:
            _check_options(checked.maps.ep_size, "balanced", ranks_per_node)
        options["ranks_per_node"] = ranks_per_node  # it changes the senders: every rank must use the same
        if direct_sends:  # the wire format of some messages: every rank must use the same
            options["direct_sends"] = int_setting(DIRECT_SENDS_ENV, DIRECT_SENDS_DEFAULT, minimum=0, what="0 or 1")
        if pushed_sends and options["transport"] == "p2p":  # the wire format: every rank must use the same
            options["p2p_push"] = int_setting(P2P_PUSH_ENV, P2P_PUSH_DEFAULT, minimum=0, what="0 or 1")
        if plan_ahead:  # which layers share a run, hence a stack: every rank must build the same runs
            options["plan_ahead"] = plan_ahead_layers(comm.dist_backend)
            # whether the call ends with the final confirmation (eplb_triton.transfer._confirms)
            options["confirm"] = int_setting(CONFIRM_ENV, 0, minimum=0, what="0 or 1")
        if staging is not None and checked.layouts:  # the caller's buffer is the staging: its size is the budget
            held = staging_view(staging, checked.layouts[0].device).numel()
            largest = max(row_cost(lay, verify) for lay in checked.layouts)
            if held < largest:
                raise ValueError(f"staging holds {held} bytes, less than one packed expert ({largest} bytes)")
            budget = checked.max_buffer_bytes
            checked.max_buffer_bytes = held if budget is None else min(budget, held)
        return options

    checked = check_inputs(
        old_global_expert_indices,
        new_global_expert_indices,
        expert_weights,
        comm,
        max_buffer_bytes,
        rank_mapping,
        verify=verify,
        timeout_s=timeout_s,
        rounds=rounds,
        expected_weights=expected_weights,
        more_checks=more_checks,
    )
    finish_agreement = agree_inputs_start(comm, checked)
    valid = checked.error is None and checked.maps is not None
    if valid and checked.extra_options.get("plan_ahead", 0) and not _nothing_fails_later(checked):
        checked.extra_options["plan_ahead"] = 0  # from inputs the agreement checks: the same on every rank
    ahead = checked.extra_options.get("plan_ahead", 0) if valid else 0
    planned = checked.maps.num_layers if valid else 0
    if ahead and checked.maps.old.size > PLAN_AT_ONCE_SLOTS:  # large maps: the first run only, the rest later
        planned = min(ahead, checked.maps.num_layers)
    plan = _plan_while_agreeing(checked, ranks_per_node, planned)
    finish_agreement()  # raises the same error on every rank; nothing touched yet
    agreed = AgreedInputs(
        checked=checked, rank=comm.rank, verify=verify, stack=stack, stack_slot_bytes=stack_slot_bytes,
        ranks_per_node=ranks_per_node, plan=plan, planned=planned if plan is not None else 0,
    )
    if ahead and ahead < agreed.num_layers and _busiest_layer_bytes(agreed.plan_of(0, planned), checked) < PLAN_AHEAD_MIN_LAYER_BYTES:
        checked.extra_options["plan_ahead"] = 0  # from the plan, the same on every rank: build everything now
    return agreed


#: Maps of at most this many slots (layers x physical) are planned at once during the agreement
#: even where layers are built in runs: planning is mostly a fixed cost per call (~100 numpy calls,
#: 0.45-1.1 ms on the H200 hosts, run 45 and the session-10 timeline of 16 tiny layers), so
#: planning the first run, then the rest, paid it twice; above this, planning every layer first
#: would delay the first exchange (58 x 288 slots at EP 8: 5.3 ms on the 2-core CPU).
PLAN_AT_ONCE_SLOTS = 16384


def _busiest_layer_bytes(plan: RearrangementPlan, checked: CheckedInputs) -> int:
    """The most bytes any rank sends or receives over the network in one of ``plan``'s layers."""
    most = 0
    for layer, layout in zip(plan.layers, checked.layouts):
        network = layer.traffic - np.diag(np.diag(layer.traffic))
        most = max(most, int(max(network.sum(axis=0).max(), network.sum(axis=1).max())) * layout.expert_bytes)
    return most


def _nothing_fails_later(checked: CheckedInputs) -> bool:
    """Whether every layer can be planned and scheduled later without an error: the NCCL
    transport (p2p takes slots every rank agrees on from all layers) and a budget with room
    for any plan (the default, or every layer's local rows and two rows at least)."""
    if checked.extra_options.get("transport", "nccl") != "nccl":
        return False
    budget = checked.max_buffer_bytes
    if budget is None:
        return True
    return all(
        capacity_rows(layout.num_local, row_cost(layout, checked.verify), budget) >= max(layout.num_local, 2)
        for layout in checked.layouts
    )


def _build_layers(agreed: AgreedInputs, plan: RearrangementPlan, first: int) -> list[LayerWork]:
    """The :class:`LayerWork` items of ``plan``'s layers, layer ``first + i`` for its ``layers[i]``."""
    checked, verify, rank = agreed.checked, agreed.verify, agreed.rank
    maps, kind = checked.maps, checked.round_kind
    layouts = checked.layouts[first : first + len(plan.layers)]
    max_buffer_bytes = checked.max_buffer_bytes
    chunk_bytes = checked.extra_options.get("chunk_bytes", 0)

    costs = [row_cost(layout, verify) for layout in layouts]
    if max_buffer_bytes is not None and costs and max_buffer_bytes < max(costs):
        # same plan and budget on every rank (agreed above): every rank raises this
        what = "one packed expert and its checksum" if verify else "one packed expert"
        raise ValueError(
            f"max_buffer_bytes={max_buffer_bytes} is smaller than {what} ({max(costs)} bytes); "
            f"{_smallest_budget_text(plan, costs, verify)}"
        )
    # the usual case, decided for every layer at once: one pass with every delivery, no stash
    # (what schedule_layer returns first; its per-layer test and this rank's views cost ~80 us
    # of host time per layer on the H200 hosts when done layer by layer)
    capacities = [capacity_rows(maps.num_local, cost, max_buffer_bytes) for cost in costs]
    pass_rows = one_pass_rows_all(plan.layers) if plan.layers else np.zeros((0, maps.ep_size), dtype=np.int64)
    packed_one_pass = fits_one_pass(plan.layers, capacities, pass_rows)
    stacks = _stacks(plan, layouts, pass_rows, packed_one_pass.tolist(), checked, verify, kind, chunk_bytes, agreed.stack, agreed.stack_slot_bytes)
    stacked = {group[0]: (group, view) for group, view in zip(stacks, stacked_rank_views(plan.layers, rank, stacks))}
    inside = {index for group in stacks for index in group[1:]}
    # messages straight from the weights, and pushed p2p passes (packed into the receivers'
    # slots), take no staging for the sends: such a layer is one pass where its receives and
    # staged local moves fit (a swap of every row, say, packed in two). A stacked layer is built
    # as its stack (pushed where p2p pushes), whatever this says.
    direct = _direct_layers(plan, layouts, checked, verify, kind, chunk_bytes)
    pushed_wanted = bool(checked.extra_options.get("p2p_push", 0)) and not verify and kind is None and not chunk_bytes
    pushed = np.array([layer.num_network > 0 for layer in plan.layers], dtype=bool) & ~direct & pushed_wanted
    if direct.any() or pushed.any():
        traffic = plan.traffic
        sends = traffic.sum(axis=2) - np.diagonal(traffic, axis1=1, axis2=2)
        receives_fit = fits_one_pass(plan.layers, capacities, pass_rows - sends)
        direct &= receives_fit
        pushed &= receives_fit
    one_pass = (packed_one_pass | direct | pushed).tolist()
    alone = [layer for index, layer in enumerate(plan.layers) if index not in inside and index not in stacked]
    rank_views(alone, rank)  # cached on the layers
    no_stash = np.zeros(0, dtype=np.int64)
    layers = []
    for index, (layout, layer_plan, cost) in enumerate(zip(layouts, plan.layers, costs)):
        if index in inside:  # part of the stack its first layer builds
            continue
        if index in stacked:
            group, view = stacked[index]
            work = PassWork.from_view(view, layout.expert_bytes, direct_local=True, pushed=pushed_wanted)
            work.pass_traffic = sum(plan.layers[i].traffic for i in group)  # p2p: each peer's message, all layers
            layers.append(
                LayerWork(
                    index=first + index,
                    layout=StackedLayout([layouts[i] for i in group]),
                    plan=layer_plan,  # has network traffic, as every layer of the stack
                    passes=[work],
                    stash_rows=no_stash,
                    layer_count=len(group),
                )
            )
            continue
        stash_anywhere = False
        if one_pass[index]:
            passes, stash_rows = [None], no_stash  # None: every delivery
        else:
            try:  # None: the default budget, one layer (two rows with one row per rank), always enough
                schedule = schedule_layer(layer_plan, cost, max_buffer_bytes)
            except ValueError as exc:
                raise ValueError(f"layer {first + index}: {exc}; {_smallest_budget_text(plan, costs, verify)}") from None
            passes, stash_rows = schedule.passes, schedule.stash_rows(rank, layer_plan.num_local)
            stash_anywhere = bool(schedule.stash_slots.size)
        works = []
        for r in passes:
            whole = r is None or (len(passes) == 1 and r.size == layer_plan.num_deliveries)
            sub = layer_plan if whole else layer_plan.restrict(r)  # one pass: the plan itself
            network_rounds = None
            if kind is not None:
                sub = with_rounds(sub, kind)
                network_rounds = _network_rounds(sub, rank)
            view = sub.rank(rank)
            chunk = _chunk_experts(layout.expert_bytes, chunk_bytes) if network_rounds is None and not verify else None
            works.append(
                PassWork.from_view(
                    view, layout.expert_bytes, stash_rows, verify=verify, network_rounds=network_rounds, chunk_experts=chunk,
                    direct_local=whole and not stash_rows.size,  # what schedule_layer counted on
                    direct_sends=bool(direct[index]),  # one pass (one_pass above), outside stacks
                    pushed=bool(pushed[index]),
                )
            )
            works[-1].pass_traffic = sub.traffic
        layers.append(
            LayerWork(
                index=first + index,
                layout=layout,
                plan=layer_plan,
                passes=works,
                stash_rows=stash_rows,
                expert_ids=maps.new[first + index],
                stash_anywhere=stash_anywhere,
            )
        )
    return layers


def _direct_layers(plan, layouts, checked, verify, kind, chunk_bytes) -> np.ndarray:
    """Per layer of ``plan``: whether its messages may go straight from the weights (the agreed
    ``direct_sends`` option, see :func:`agree_on_inputs`; the caller adds: in one pass, not in a
    stack). The same on every rank: the global plan, the agreed options and the weights' layouts
    (agreed by their signature)."""
    # (over p2p, copies from the weights into a peer's slot were tried in session 11: they lost
    # to pushed passes, and a timed-out rank's queued copies would land in a live peer's staging)
    wanted = checked.extra_options.get("direct_sends", 0) and checked.extra_options.get("transport", "nccl") == "nccl"
    if not wanted or verify or kind is not None or chunk_bytes or not plan.layers:
        return np.zeros(len(plan.layers), dtype=bool)
    dense = np.array([layout.dense_rows for layout in layouts], dtype=bool)
    return sends_one_run(plan.layers) & dense


def _stacks(plan, layouts, pass_rows, one_pass, checked, verify, kind, chunk_bytes, stack, slot_bytes=None) -> list[list[int]]:
    """The layers that share an exchange (:func:`eplb_triton.stacked.stack_groups`): one-pass
    layers with network traffic, whole messages without ``verify`` or planner rounds; each stack
    fits ``slot_bytes``, by default half the agreed budget (two slots of it fit the budget)."""
    most = checked.extra_options.get("layers_per_exchange", 1)
    if not stack or most < 2 or verify or kind is not None or chunk_bytes:
        return []
    if slot_bytes is None:
        budget = checked.max_buffer_bytes if checked.max_buffer_bytes is not None else default_budget_bytes(layouts, verify=False)
        slot_bytes = budget // 2
    stackable = [bool(single) and layer.num_network > 0 for single, layer in zip(one_pass, plan.layers)]
    staging = pass_rows * np.array([layout.expert_bytes for layout in layouts], dtype=np.int64)[:, None]
    return stack_groups(stackable, [stack_key(layout) for layout in layouts], staging, slot_bytes, most)


def _plan_while_agreeing(checked: CheckedInputs, ranks_per_node: int | None, layers: int) -> RearrangementPlan | None:
    """The plan of the first ``layers`` layers of this rank's own (locally valid) maps, made
    while the agreement is in flight; pure numpy, no weight touched. ``None`` when the local
    verdict is bad or planning fails: the caller plans again after the agreement, where any
    error is raised on every rank alike."""
    if checked.error is not None or checked.maps is None:
        return None
    try:
        return plan_from_maps(_maps_of(checked.maps, 0, layers), ranks_per_node=ranks_per_node)
    except Exception:  # noqa: BLE001 - raised again after the agreement, by the same call
        return None


def _maps_of(maps: ExpertMaps, first: int, stop: int) -> ExpertMaps:
    """The maps of layers ``[first, stop)`` (``maps`` itself when that is every layer)."""
    if (first, stop) == (0, maps.num_layers):
        return maps
    return replace(maps, old=maps.old[first:stop], new=maps.new[first:stop])


def _smallest_budget_text(plan: RearrangementPlan, costs: Sequence[int], verify: bool) -> str:
    """The smallest ``max_buffer_bytes`` every layer of ``plan`` can be scheduled in (at least one row)."""
    smallest = max([max(costs)] + [smallest_budget_bytes(layer, cost) for layer, cost in zip(plan.layers, costs)])
    return f"the smallest max_buffer_bytes that works for every layer{' with verify' if verify else ''} is {smallest}"

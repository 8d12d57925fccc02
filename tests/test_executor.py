"""The blocking loop's two staging slots (:func:`eplb_triton.executor.run_layers`): when the
budget holds two layers' staging, layer ``i + 1`` is packed and posted before layer ``i`` is
waited for. Bit-exact either way; the slots are taken only when they fit the budget. When half
the budget holds several layers they share one exchange (:mod:`eplb_triton.stacked`)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from eplb_triton import rearrange_expert_weights_inplace, reserve
from eplb_triton.stacked import layers_per_exchange
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from map_cases import packed_expert_bytes

SPECS = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((2, 3, 3), torch.uint8), TensorSpec((1,), torch.float32)]
EXPERT_BYTES = packed_expert_bytes(SPECS)  # 64: rows padded to 16 bytes
NUM_LOCAL = 8


@pytest.fixture(autouse=True)
def _one_run_of_layers(monkeypatch):
    """The loop's slots and stacks, with every layer built before the first exchange (the
    spawned ranks inherit it); test_layers_are_built_in_runs_* turn the runs back on. Packed
    messages: the swaps here send runs of rows, which would go straight from the weights (and
    take half the staging); test_direct_* turn that back on."""
    monkeypatch.setenv("EPLB_TRITON_PLAN_AHEAD", "0")
    monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", "0")


def swap_maps(layers: int, swapped: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """World 2, ``NUM_LOCAL`` rows per rank: layer ``l`` swaps the first ``swapped[l]`` rows of
    rank 0 with those of rank 1 (0 = the layer only moves one expert locally on each rank)."""
    old = np.tile(np.arange(2 * NUM_LOCAL), (layers, 1))
    new = old.copy()
    for l, k in enumerate(swapped):
        if k:
            new[l, :k], new[l, NUM_LOCAL : NUM_LOCAL + k] = old[l, NUM_LOCAL : NUM_LOCAL + k], old[l, :k]
        else:  # no network: rows 0 and 1 trade places on each rank
            for base in (0, NUM_LOCAL):
                new[l, base], new[l, base + 1] = old[l, base + 1], old[l, base]
    return old, new


def _rank_swap(rank, world, old, new, kwargs, staging_bytes, seed):
    weights = make_rank_weights(SPECS, old.shape[0], NUM_LOCAL)
    fill_rank_weights(weights, old, rank, seed)
    if staging_bytes == "reserve":
        kwargs = dict(kwargs, staging=reserve(weights))
    elif staging_bytes is not None:
        kwargs = dict(kwargs, staging=torch.full((staging_bytes,), 0xA5, dtype=torch.uint8))
    stats = rearrange_expert_weights_inplace(old, new, weights, **kwargs)
    return row_mismatches(weights, old, new, rank, seed), stats


def run_swap(distributed, swapped, staging_bytes=None, **kwargs):
    old, new = swap_maps(len(swapped), swapped)
    results = distributed(2, _rank_swap, old, new, kwargs, staging_bytes, len(swapped))
    for rank, (bad, _) in enumerate(results):
        assert bad == [], f"rank {rank}: rows with wrong bytes (layer, tensor, row): {bad[:10]}"
    return [stats for _, stats in results]


@pytest.mark.parametrize(
    "swapped,budget_rows,overlapped",
    [
        # 2 swapped rows: 4 rows of staging per layer, two slots fit the default budget (8 rows)
        pytest.param([2, 2, 2, 2], None, 3, id="L4-default-budget-fits-two"),
        # 3 swapped: 6 rows per layer; two slots need 12 rows
        pytest.param([3, 3, 3], None, 0, id="L3-default-budget-fits-one"),
        pytest.param([3, 3, 3], 12, 2, id="L3-budget-exactly-two"),
        pytest.param([3, 3, 3], 12 - 1 / EXPERT_BYTES, 0, id="L3-budget-a-byte-short"),
        # a layer without network traffic empties the pipeline: only 3 follows 2
        pytest.param([1, 0, 2, 2], None, 1, id="L4-local-layer-between"),
        pytest.param([2], None, 0, id="L1-nothing-to-overlap"),
    ],
)
def test_two_staging_slots_when_the_budget_holds_them(distributed, swapped, budget_rows, overlapped):
    budget = None if budget_rows is None else round(budget_rows * EXPERT_BYTES)
    stats = run_swap(distributed, swapped, max_buffer_bytes=budget)
    peak = 2 * max(swapped) * EXPERT_BYTES  # sends + receives of the largest layer
    for s in stats:
        assert s.overlapped_layers == overlapped
        assert s.peak_staging_bytes == (2 * peak if overlapped else peak)
        if budget is not None:
            assert s.peak_staging_bytes <= budget


@pytest.mark.parametrize(
    "staging_rows,overlapped",
    [
        pytest.param(12, 2, id="given-holds-two"),
        pytest.param(11, 0, id="given-holds-one"),
    ],
)
def test_given_staging_decides_the_slots(distributed, staging_rows, overlapped):
    stats = run_swap(distributed, [3, 3, 3], staging_bytes=staging_rows * EXPERT_BYTES)
    assert [s.overlapped_layers for s in stats] == [overlapped] * 2


def test_reserved_default_staging_holds_two_slots(distributed):
    stats = run_swap(distributed, [2, 1, 2], staging_bytes="reserve")
    assert [s.overlapped_layers for s in stats] == [2, 2]


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param({"verify": True}, id="verify"), pytest.param({"rounds": True}, id="rounds")],
)
def test_framed_messages_are_not_overlapped(distributed, kwargs):
    stats = run_swap(distributed, [2, 2, 2], max_buffer_bytes=1 << 20, **kwargs)
    assert [s.overlapped_layers for s in stats] == [0, 0]


def test_given_staging_larger_than_the_budget_keeps_to_the_budget(distributed):
    # the caller's buffer holds two slots, max_buffer_bytes only one: the budget wins
    stats = run_swap(distributed, [3, 3, 3], staging_bytes=12 * EXPERT_BYTES, max_buffer_bytes=11 * EXPERT_BYTES)
    assert [s.overlapped_layers for s in stats] == [0, 0]
    assert all(s.peak_staging_bytes <= 11 * EXPERT_BYTES for s in stats)


@pytest.mark.parametrize(
    "swapped,budget_rows,items",
    [
        # 4 rows of staging per layer; half the budget holds two layers: stacks 0-1, 2-3, then 4
        pytest.param([2, 2, 2, 2, 2], 16, [[0, 1], [2, 3], [4]], id="L5-stacks-of-two"),
        pytest.param([2, 2, 2, 2, 2], 16 - 1 / EXPERT_BYTES, [[0], [1], [2], [3], [4]], id="L5-a-byte-short"),
        # a layer without network traffic is never stacked and ends a stack
        pytest.param([2, 0, 2, 2], 16, [[0], [1], [2, 3]], id="L4-local-layer-between"),
        # 2 rows per layer: the default budget (one layer's 8 rows) holds stacks of two
        pytest.param([1] * 6, None, [[0, 1], [2, 3], [4, 5]], id="L6-default-budget"),
        # at most layers_per_exchange() layers per stack
        pytest.param([1] * 9, 1 << 20, [[0, 1, 2, 3], [4, 5, 6, 7], [8]], id="L9-at-most-four"),
    ],
)
def test_layers_share_an_exchange_when_half_the_budget_holds_them(distributed, swapped, budget_rows, items):
    assert layers_per_exchange() == 4  # the items above assume the default
    budget = None if budget_rows is None else round(budget_rows * EXPERT_BYTES)
    stats = run_swap(distributed, swapped, max_buffer_bytes=budget)
    network = [bool(swapped[item[0]]) for item in items]
    for s in stats:
        assert s.stacked_layers == sum(len(item) for item in items if len(item) > 1)
        assert s.exchanges == sum(network)  # one per item with traffic
        assert s.rounds == len(items)  # one pass per item
        assert s.overlapped_layers == sum(len(b) for b, x, y in zip(items[1:], network, network[1:]) if x and y)
        assert len(s.layer_times_s) == len(swapped)
        largest = max(sum(2 * swapped[i] for i in item) for item in items) * EXPERT_BYTES
        assert s.peak_staging_bytes == (2 * largest if sum(network) >= 2 else largest)  # two slots
        if budget is not None:
            assert s.peak_staging_bytes <= budget


def test_one_layer_per_exchange_when_told(distributed, monkeypatch):
    monkeypatch.setenv("EPLB_TRITON_LAYERS_PER_EXCHANGE", "1")  # the spawned ranks inherit it
    stats = run_swap(distributed, [1] * 4)
    assert [(s.stacked_layers, s.exchanges, s.overlapped_layers) for s in stats] == [(0, 4, 3)] * 2


def _rank_mismatched_setting(rank, world, old, new):
    os.environ["EPLB_TRITON_LAYERS_PER_EXCHANGE"] = "1" if rank == 0 else "2"
    weights = make_rank_weights(SPECS, old.shape[0], NUM_LOCAL)
    fill_rank_weights(weights, old, rank, 0)
    try:
        rearrange_expert_weights_inplace(old, new, weights)
    except ValueError as exc:
        return str(exc), row_mismatches(weights, old, old, rank, 0)
    return None, None


def test_layers_per_exchange_must_match_on_every_rank(distributed):
    old, new = swap_maps(4, [1] * 4)
    for text, untouched in distributed(2, _rank_mismatched_setting, old, new):
        assert text is not None and "layers_per_exchange" in text, text
        assert untouched == []  # refused before any weight was touched


def test_stacks_live_in_a_given_staging_buffer(distributed):
    # the caller's 16 rows are the budget: stacks of two layers (8 rows) in two slots of it
    stats = run_swap(distributed, [2, 2, 2, 2], staging_bytes=16 * EXPERT_BYTES)
    assert [(s.stacked_layers, s.exchanges, s.overlapped_layers) for s in stats] == [(4, 2, 2)] * 2
    assert all(s.peak_staging_bytes == 16 * EXPERT_BYTES for s in stats)


def _rank_runs(rank, world, old, new, budget, min_layer_bytes, at_once_slots=None):
    from eplb_triton import prepare, transfer
    from eplb_triton.prepare import AgreedInputs

    prepare.PLAN_AHEAD_MIN_LAYER_BYTES = min_layer_bytes  # a spawned rank: nothing to restore
    if at_once_slots is not None:
        prepare.PLAN_AT_ONCE_SLOTS = at_once_slots

    log = []
    build = AgreedInputs.build

    def logged_build(self, first, stop):
        log.append(("build", first, stop))
        return build(self, first, stop)

    AgreedInputs.build = logged_build  # a spawned rank: nothing to restore
    plan = prepare.plan_from_maps

    def logged_plan(maps, **options):
        log.append(("planned", maps.num_layers))
        return plan(maps, **options)

    prepare.plan_from_maps = logged_plan
    transfer.fault_hook = lambda point, **info: log.append((point, info["layer"])) if point == "posted" else None
    weights = make_rank_weights(SPECS, old.shape[0], NUM_LOCAL)
    fill_rank_weights(weights, old, rank, 3)
    stats = rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=budget)
    return row_mismatches(weights, old, new, rank, 3), stats, log


@pytest.mark.parametrize(
    "plan_ahead,budget_rows,min_layer_bytes,runs",
    [
        # runs of 4, 8, 16 layers: each built once the run before has posted its exchanges
        pytest.param("4", None, 0, [(0, 4), (4, 12), (12, 13)], id="L13-runs-4-8-1"),
        pytest.param("2", 1 << 12, 0, [(0, 2), (2, 6), (6, 13)], id="L13-runs-2-4-7-stacked"),
        pytest.param("0", None, 0, [(0, 13)], id="L13-off"),
        # a budget without room for every plan (below a layer's local rows): everything first
        pytest.param("4", NUM_LOCAL - 1, 0, [(0, 13)], id="L13-small-budget-one-run"),
        # the first run's busiest layer moves 2 experts per rank: below 3, everything first
        pytest.param("4", None, 2 * EXPERT_BYTES, [(0, 4), (4, 12), (12, 13)], id="L13-enough-bytes"),
        pytest.param("4", None, 3 * EXPERT_BYTES, [(0, 13)], id="L13-too-few-bytes-one-run"),
    ],
)
def test_layers_are_built_in_runs_while_the_previous_run_moves(
    distributed, monkeypatch, plan_ahead, budget_rows, min_layer_bytes, runs
):
    monkeypatch.setenv("EPLB_TRITON_PLAN_AHEAD", plan_ahead)
    swapped = [2, 1, 2, 2, 0, 2, 1, 2, 2, 2, 1, 2, 2]  # layer 4 moves nothing over the network
    old, new = swap_maps(len(swapped), swapped)
    budget = None if budget_rows is None else budget_rows * EXPERT_BYTES
    for rank, (bad, stats, log) in enumerate(distributed(2, _rank_runs, old, new, budget, min_layer_bytes)):
        assert bad == [], (rank, bad[:8])
        builds = [(a, b) for kind, *ab in log if kind == "build" for a, b in [ab]]
        assert builds == runs, (rank, log)
        # each layer planned once: the first run's plan is reused when everything is built at once
        assert sum(e[1] for e in log if e[0] == "planned") == len(swapped), (rank, log)
        for (first, stop), (after, _) in zip(runs, runs[1:]):  # built after the run before posted all
            posted = [i for i, e in enumerate(log) if e[0] == "posted" and first <= e[1] < stop]
            assert not posted or max(posted) < log.index(("build", after, _)), (rank, log)
        assert len(stats.layer_times_s) == len(swapped) and stats.failed_layers == []
        if budget_rows == 1 << 12:  # stacks inside runs
            assert stats.stacked_layers > 0, rank
        # small maps: every layer planned in one call, during the agreement (runs only build)
        assert [e[1] for e in log if e[0] == "planned"] == [len(swapped)], (rank, log)


@pytest.mark.parametrize(
    "min_layer_bytes,planned",
    [
        pytest.param(0, [4, 8, 1], id="runs-plan-each-run"),
        pytest.param(3 * EXPERT_BYTES, [4, 9], id="one-run-plans-the-rest-once"),
    ],
)
def test_large_maps_plan_the_first_run_during_the_agreement(distributed, monkeypatch, min_layer_bytes, planned):
    monkeypatch.setenv("EPLB_TRITON_PLAN_AHEAD", "4")
    swapped = [2, 1, 2, 2, 0, 2, 1, 2, 2, 2, 1, 2, 2]
    old, new = swap_maps(len(swapped), swapped)
    for rank, (bad, stats, log) in enumerate(distributed(2, _rank_runs, old, new, None, min_layer_bytes, 0)):
        assert bad == [], (rank, bad[:8])
        assert [e[1] for e in log if e[0] == "planned"] == planned, (rank, log)


# -- messages sent straight from the weights (PassWork.from_view(direct_sends=True)) ------------
def _rank_direct(rank, world, old, new, specs, kwargs):
    weights = make_rank_weights(specs, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, 7)
    stats = rearrange_expert_weights_inplace(old, new, weights, **kwargs)
    return row_mismatches(weights, old, new, rank, 7), stats


def _scattered_destinations() -> tuple[np.ndarray, np.ndarray]:
    """One layer, world 2: rank 0's rows 0-2 (one run) go to rank 1's rows 2, 5, 7 (not a run,
    replicas: rank 0 keeps them); on rank 1 also a local move (row 1 -> row 0), a duplicate of the
    received expert 0 (row 4) and an emptied slot (row 6)."""
    old = np.arange(2 * NUM_LOCAL)[None, :]
    new = old.copy()
    n = NUM_LOCAL
    new[0, n + 2], new[0, n + 5], new[0, n + 7] = 0, 1, 2
    new[0, n + 0], new[0, n + 4], new[0, n + 6] = old[0, n + 1], 0, -1
    return old, new


@pytest.mark.parametrize(
    "swapped,budget_rows,overlapped",
    [
        # receives only: 2 rows of staging per layer, two slots in the default budget (8 rows)
        pytest.param([2, 2, 2, 2], None, 3, id="L4-default-budget"),
        # 3 rows per layer: two slots fit the default budget now (packed messages needed 12 rows)
        pytest.param([3, 3, 3], None, 2, id="L3-two-slots-where-packed-had-one"),
        # the smallest budget the schedule takes for one pass (sends + receives: it counts the
        # sends as packed) holds two slots of receives
        pytest.param([3, 3, 3], 6, 2, id="L3-budget-exactly-two"),
        pytest.param([1, 0, 2, 2], None, 1, id="L4-local-layer-between"),
    ],
)
def test_direct_sends_take_staging_only_for_receives(distributed, monkeypatch, swapped, budget_rows, overlapped):
    monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", "1")
    budget = None if budget_rows is None else round(budget_rows * EXPERT_BYTES)
    stats = run_swap(distributed, swapped, max_buffer_bytes=budget)
    peak = max(swapped) * EXPERT_BYTES  # the receives of the largest layer
    network_layers = sum(1 for k in swapped if k)
    for s in stats:
        assert s.overlapped_layers == overlapped
        assert s.peak_staging_bytes == (2 * peak if overlapped else peak)
        assert s.p2p_ops == 2 * len(SPECS) * network_layers  # one op per tensor each way
        assert s.total_bytes_sent == sum(swapped) * EXPERT_BYTES  # counted as packed bytes


@pytest.mark.parametrize(
    "specs",
    [
        pytest.param(SPECS, id="odd-rows-3d"),
        pytest.param(SPECS[:1] + [TensorSpec((0,), torch.float32)] + SPECS[1:], id="zero-byte-rows"),
        pytest.param([TensorSpec((7170,), torch.bfloat16)], id="one-tensor-14340-bytes"),
    ],
)
def test_direct_sends_into_scattered_rows_with_local_moves_and_duplicates(distributed, monkeypatch, specs):
    monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", "1")
    old, new = _scattered_destinations()
    results = distributed(2, _rank_direct, old, new, specs, {})
    tensors = sum(1 for spec in specs if spec.row_bytes())
    for rank, (bad, stats) in enumerate(results):
        assert bad == [], (rank, bad[:8])
        assert stats.p2p_ops == tensors  # rank 0 sends one op per tensor, rank 1 receives them
        assert stats.local_copies == (2 if rank == 1 else 0)  # the local move and the duplicate


@pytest.mark.parametrize(
    "setting,direct",
    [pytest.param("1", True, id="on"), pytest.param("0", False, id="EPLB_TRITON_DIRECT_SENDS=0")],
)
def test_direct_sends_only_where_every_message_is_a_run_of_rows(distributed, monkeypatch, setting, direct):
    monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", setting)
    old, new = swap_maps(3, [2, 2, 2])
    new[1, :2] = new[1, :2][::-1].copy()  # layer 1: rank 1 sends rows 1, 0 (wire order): packed
    new[1, NUM_LOCAL : NUM_LOCAL + 2] = new[1, NUM_LOCAL : NUM_LOCAL + 2][::-1].copy()
    results = distributed(2, _rank_direct, old, new, SPECS, {})
    for rank, (bad, stats) in enumerate(results):
        assert bad == [], (rank, bad[:8])
        assert stats.p2p_ops == (2 * len(SPECS) * 2 + 2 if direct else 6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_direct_sends_over_nccl_are_bit_exact(monkeypatch):
    """Two GPUs: swaps and the scattered destinations over NCCL, with the default budget's two
    slots of receives."""
    from eplb_triton.testing.launch import run_ranks

    monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", "1")
    for old, new in (swap_maps(4, [3, 2, 3, 1]), _scattered_destinations()):
        for rank, (bad, stats) in enumerate(run_ranks(2, _rank_direct_gpu, old, new, backend="nccl", timeout_s=90.0)):
            assert bad == [], (rank, bad[:8])
            assert stats.p2p_ops > 0 and stats.p2p_ops % len(SPECS) == 0  # one op per tensor


def _rank_direct_gpu(rank, world, old, new):
    device = torch.device("cuda", torch.cuda.current_device())
    weights = make_rank_weights(SPECS, old.shape[0], NUM_LOCAL, device)
    fill_rank_weights(weights, old, rank, 7)
    stats = rearrange_expert_weights_inplace(old, new, weights)
    return row_mismatches(weights, old, new, rank, 7), stats

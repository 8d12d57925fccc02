"""Blocking rearrangement over gloo ranks, compared bit for bit with the expected experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton import plan_rearrangement, rearrange_expert_weights_inplace
from eplb_triton.layout import ExpertLayout
from eplb_triton.plan import sends_one_run
from eplb_triton.prepare import layer_runs, plan_ahead_layers
from eplb_triton.stacked import layers_per_exchange
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from map_cases import expected_received_experts, packed_expert_bytes, random_maps

MIXED_SPECS = [
    TensorSpec((3, 5), torch.bfloat16),  # 30 bytes: odd row size
    TensorSpec((7,), torch.float32),
    TensorSpec((2, 3, 3), torch.uint8),  # 18 bytes, 3-D row
    TensorSpec((1,), torch.int32),  # a per-expert scale
    TensorSpec((5,), torch.float8_e4m3fn),
]


def _rank_transfer(rank, world, old, new, specs, max_buffer_bytes, seed):
    weights = make_rank_weights(specs, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, seed)
    stats = rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=max_buffer_bytes)
    return row_mismatches(weights, old, new, rank, seed), stats


def check_transfer(distributed, world, old, new, specs=MIXED_SPECS, max_buffer_bytes=None, seed=0):
    results = distributed(world, _rank_transfer, old, new, specs, max_buffer_bytes, seed)
    for rank, (bad, _) in enumerate(results):
        assert bad == [], f"rank {rank}: rows with wrong bytes (layer, tensor, row): {bad[:10]}"
    return [stats for _, stats in results]


@pytest.mark.parametrize(
    "world,layers,num_local,logical",
    [
        pytest.param(2, 1, 2, 3, id="W2-L1-N2-E3"),
        pytest.param(2, 2, 3, 4, id="W2-L2-N3-E4"),
        pytest.param(2, 4, 8, 16, id="W2-L4-N8-E16"),
        pytest.param(4, 1, 2, 6, id="W4-L1-N2-E6"),
        pytest.param(4, 2, 2, 5, id="W4-L2-N2-E5"),
        pytest.param(4, 8, 8, 16, id="W4-L8-N8-E16"),
        pytest.param(8, 2, 4, 20, id="W8-L2-N4-E20"),
    ],
)
def test_random_rearrangement(distributed, monkeypatch, world, layers, num_local, logical):
    monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", "1")  # (opt-in) layers whose messages are runs of rows go straight
    rng = np.random.default_rng(world * 100 + layers * 10 + num_local)
    old, new = random_maps(rng, layers, world, num_local, logical)
    stats = check_transfer(distributed, world, old, new)
    plan = plan_rearrangement(old, new, world)
    sent = sum(s.bytes_sent.sum() for s in stats)
    received = sum(s.bytes_received.sum() for s in stats)
    assert sent == received
    tensors = len(MIXED_SPECS)  # a message sent straight from the weights: one op per tensor
    for s in stats:  # never more than 2 * (ep_size - 1) messages per exchange
        assert s.p2p_ops <= 2 * (world - 1) * s.rounds * tensors
    big = check_transfer(distributed, world, old, new, max_buffer_bytes=1 << 30)
    # room for everything: consecutive layers with traffic share an exchange, up to
    # layers_per_exchange() of them, inside each run of layers built together; the layers
    # without traffic stand alone
    off_diagonal = 1 - np.eye(world, dtype=np.int64)
    runs = layer_runs(layers, plan_ahead_layers("gloo"))
    by_run = [stacks_of(plan, layers_per_exchange(), run) for run in runs]
    items = [item for run in by_run for item in run]
    # one pass per item: one isend and one irecv per (sender, receiver) pair with traffic in its
    # layers; one per tensor where a layer alone sends every message as one run of rows
    pairs = [np.count_nonzero(sum(plan.layers[i].traffic for i in item) * off_diagonal) for item in items]
    direct = sends_one_run(plan.layers)
    ops = [tensors if len(item) == 1 and direct[item[0]] else 1 for item in items]
    assert sum(s.p2p_ops for s in big) == 2 * int(sum(p * k for p, k in zip(pairs, ops)))
    # one exchange per item on each rank that sends or receives in it
    talks = [(sum(plan.layers[i].traffic for i in item) * off_diagonal) for item in items]
    assert [s.exchanges for s in big] == [sum(bool(t[r].any() or t[:, r].any()) for t in talks) for r in range(world)]
    # two staging slots fit: each item with traffic that follows one in its run is posted before
    # that one is waited for
    overlapped = 0
    for run in by_run:
        network = [plan.layers[item[0]].num_network > 0 for item in run]
        overlapped += sum(len(item) for item, a, b in zip(run[1:], network, network[1:]) if a and b)
    assert [s.overlapped_layers for s in big] == [overlapped] * world
    assert [s.stacked_layers for s in big] == [sum(len(item) for item in items if len(item) > 1)] * world
    # bytes from the maps alone: each rank receives every expert its new rows need and its old rows lack, once
    expected = [n * packed_expert_bytes(MIXED_SPECS) for n in expected_received_experts(old, new, world)]
    assert sum(expected) > 0  # the maps move experts over the network
    assert [s.total_bytes_received for s in stats] == expected
    assert [s.total_bytes_received for s in big] == expected
    assert sum(s.total_bytes_sent for s in stats) == sum(expected)


def stacks_of(plan, most: int, run: tuple[int, int] | None = None) -> list[list[int]]:
    """The layers :func:`eplb_triton.stacked.stack_groups` stacks with room for everything: runs of
    consecutive layers with network traffic, cut every ``most`` layers (within ``run``, a range of
    layers built together: :func:`eplb_triton.prepare.layer_runs`)."""
    items: list[list[int]] = []
    first, stop = run if run is not None else (0, len(plan.layers))
    for index in range(first, stop):
        layer = plan.layers[index]
        stackable = layer.num_network > 0
        last = items[-1] if items else None
        if stackable and last and plan.layers[last[0]].num_network > 0 and len(last) < most:
            last.append(index)
        else:
            items.append([index])
    return items


def test_no_change_is_untouched_and_silent(distributed):
    rng = np.random.default_rng(1)
    old, _ = random_maps(rng, 3, 4, 4, 10)
    stats = check_transfer(distributed, 4, old, old.copy())
    assert all(s.total_bytes_sent == 0 and s.p2p_ops == 0 and s.local_copies == 0 for s in stats)
    assert plan_rearrangement(old, old, 4).traffic.sum() == 0


@pytest.mark.parametrize("direct", [pytest.param("1", id="straight-from-the-weights"), pytest.param("0", id="packed")])
def test_full_swap_between_two_ranks(distributed, monkeypatch, direct):
    monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", direct)
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = np.array([[4, 5, 6, 7, 0, 1, 2, 3]])
    plan = plan_rearrangement(old, new, 2)
    assert plan.layers[0].traffic.tolist() == [[0, 4], [4, 0]]
    # default budget = one layer (4 experts): 4 packed sends + 4 receives need two passes; sent
    # straight from the weights (rows 0-3, one run), the 4 receives fit one
    stats = check_transfer(distributed, 2, old, new)
    assert [s.rounds for s in stats] == ([1, 1] if direct == "1" else [2, 2])
    assert all(s.peak_staging_bytes <= 4 * packed_expert_bytes(MIXED_SPECS) for s in stats)
    stats = check_transfer(distributed, 2, old, new, max_buffer_bytes=1 << 20)
    # each rank sends rows 0-3 and receives into rows 0-3: straight from the weights, one op per tensor each way
    assert [s.p2p_ops for s in stats] == [2 * len(MIXED_SPECS) if direct == "1" else 2] * 2


def test_hot_expert_fans_out_to_every_rank(distributed):
    world, num_local = 8, 2
    old = np.arange(world * num_local)[None, :]
    new = old.copy()
    new[0, 1::num_local] = 0  # every rank's row 1 now holds expert 0
    check_transfer(distributed, world, old, new)
    traffic = plan_rearrangement(old, new, world).layers[0].traffic
    assert traffic[0, 1:].tolist() == [1] * (world - 1)  # expert 0 is received once per rank


def test_replicas_received_once_and_duplicated(distributed):
    # rank 1 needs expert 0 in all four rows: one network copy, three duplicate fills.
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = np.array([[0, 1, 2, 3, 0, 0, 0, 0]])
    stats = check_transfer(distributed, 2, old, new)
    layer = plan_rearrangement(old, new, 2).layers[0]
    assert layer.traffic.tolist() == [[0, 1], [0, 3]]
    assert stats[1].local_copies == 3


def test_empty_slots(distributed):
    old = np.array([[0, -1, 1, 2, -1, 3]])
    new = np.array([[3, 0, -1, -1, 1, 2]])
    check_transfer(distributed, 3, old, new)


def test_single_expert_single_rank_pair(distributed):
    old = np.array([[0, -1]])
    new = np.array([[-1, 0]])
    check_transfer(distributed, 2, old, new)


def test_budget_forces_rounds(distributed):
    rng = np.random.default_rng(7)
    old, new = random_maps(rng, 3, 4, 6, 12, empty_frac=0.0)
    specs = [TensorSpec((13,), torch.uint8)]  # 16 packed bytes per expert
    stats = check_transfer(distributed, 4, old, new, specs=specs, max_buffer_bytes=4 * 16)
    assert max(s.rounds for s in stats) > 3
    assert all(s.peak_staging_bytes <= 4 * 16 for s in stats)


def test_budget_rounds_swap_cycles(distributed):
    # a 4-rank rotation: every row is both a source and a destination.
    old = np.arange(16)[None, :]
    new = np.roll(old, 4, axis=1)
    specs = [TensorSpec((16,), torch.uint8)]
    stats = check_transfer(distributed, 4, old, new, specs=specs, max_buffer_bytes=2 * 16)
    assert min(s.rounds for s in stats) == 4


def _rank_single(rank, world, old, new):
    return _rank_transfer(rank, world, old, new, MIXED_SPECS, None, 3)


def test_world_size_one_without_process_group():
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[3, 3, 1, -1]])
    weights = make_rank_weights(MIXED_SPECS, 1, 4)
    fill_rank_weights(weights, old, 0)
    stats = rearrange_expert_weights_inplace(old, new, weights)
    assert row_mismatches(weights, old, new, 0) == []
    assert stats.p2p_ops == 0 and stats.local_copies == 3


@pytest.mark.parametrize(
    "dist_backend,timeout_s,verify,forced,confirms",
    [
        pytest.param("nccl", None, False, False, False, id="nccl-nothing-to-report"),
        pytest.param("nccl", None, False, True, True, id="nccl-forced"),
        pytest.param("nccl", 5.0, False, False, True, id="nccl-timeout"),
        pytest.param("nccl", None, True, False, True, id="nccl-verify"),
        pytest.param("gloo", None, False, False, True, id="gloo-errors-come-back"),
    ],
)
def test_final_confirmation_only_where_a_failure_can_be_reported(dist_backend, timeout_s, verify, forced, confirms):
    from eplb_triton.comm import Communicator
    from eplb_triton.transfer import _confirms

    comm = Communicator(group=None, rank=0, world_size=2, dist_backend=dist_backend)
    assert _confirms(comm, timeout_s, verify, forced=forced) == confirms


def test_layer_times_are_read_when_asked_or_before_the_next_call():
    import copy
    import pickle

    old = np.array([[0, 1, 2, 3]] * 3)
    new = np.array([[3, 3, 1, -1]] * 3)
    weights = make_rank_weights(MIXED_SPECS, 3, 4)
    fill_rank_weights(weights, old, 0)
    first = rearrange_expert_weights_inplace(old, new, weights)
    assert first._read_times is not None  # deferred: on GPUs reading them waits for the device
    assert len(pickle.loads(pickle.dumps(first)).layer_times_s) == 3  # pickled with the times read
    assert first._read_times is None and len(first.layer_times_s) == 3
    fill_rank_weights(weights, old, 0)
    second = rearrange_expert_weights_inplace(old, new, weights)
    kept = copy.copy(second)  # copies read them too
    assert kept.layer_times_s == second.layer_times_s and len(kept.layer_times_s) == 3
    fill_rank_weights(weights, old, 0)
    third = rearrange_expert_weights_inplace(old, new, weights)
    fill_rank_weights(weights, old, 0)
    rearrange_expert_weights_inplace(old, new, weights)  # reuses the timing events of this thread:
    assert third._read_times is None and len(third.layer_times_s) == 3  # read before that


@pytest.mark.parametrize(
    "budget_experts",
    [pytest.param(2, id="budget-2-experts"), pytest.param(3, id="budget-3-experts"), pytest.param(5, id="budget-5-experts")],
)
def test_big_rotation_cycle_is_broken_by_a_stash(distributed, budget_experts):
    # every expert moves one rank to the right: one long cycle through all rows of all ranks
    world, num_local = 4, 6
    old = np.arange(world * num_local)[None, :]
    new = np.roll(old, num_local + 1, axis=1)
    specs = [TensorSpec((5,), torch.bfloat16), TensorSpec((3, 2), torch.float32)]
    budget = budget_experts * 48  # 48 packed bytes per expert
    stats = check_transfer(distributed, world, old, new, specs=specs, max_buffer_bytes=budget)
    assert all(s.peak_staging_bytes <= budget for s in stats)
    assert max(s.rounds for s in stats) > 1


def test_reverse_of_a_heavy_rebalance_fits_the_default_budget(distributed):
    from eplb_triton.testing.balancer import make_placements

    old, new = make_placements(2, 16, 4, 1, seed=0)
    check_transfer(distributed, 4, new, old)
    check_transfer(distributed, 4, old, new)


def _rank_pieces(rank, world, old, new, chunk_bytes, seed):
    import os

    os.environ["EPLB_TRITON_CHUNK_BYTES"] = str(chunk_bytes)  # this rank only: a forked process
    return _rank_transfer(rank, world, old, new, MIXED_SPECS, 1 << 30, seed)


@pytest.mark.parametrize(
    "world,chunk_bytes",
    [
        pytest.param(2, 1, id="W2-one-expert-pieces"),
        pytest.param(4, 1, id="W4-one-expert-pieces"),
        pytest.param(4, 2 * 128, id="W4-two-expert-pieces"),
        pytest.param(4, 1 << 30, id="W4-whole-messages"),
    ],
)
def test_split_messages_move_the_same_bytes(distributed, world, chunk_bytes):
    """Messages split into pieces of ``chunk_bytes // expert_bytes`` experts (the NCCL pipeline,
    forced on gloo): same bytes, one op per piece per peer and direction."""
    rng = np.random.default_rng(7)
    old, new = random_maps(rng, 3, world, 6, 4 * world)
    results = distributed(world, _rank_pieces, old, new, chunk_bytes, 0)
    expert_bytes = 128  # MIXED_SPECS: 30 + 28 + 18 + 4 + 5 bytes, each segment 16-aligned
    per_piece = max(1, chunk_bytes // expert_bytes)
    plan = plan_rearrangement(old, new, world)
    for rank, (bad, stats) in enumerate(results):
        assert bad == [], f"rank {rank}: {bad[:10]}"
        pieces = 0
        for layer in plan.layers:
            for peer in range(world):
                if peer != rank:
                    pieces += -(-int(layer.traffic[rank, peer]) // per_piece)  # sends
                    pieces += -(-int(layer.traffic[peer, rank]) // per_piece)  # receives
        assert stats.p2p_ops == pieces

# ---------------------------------------------------------------------------------------
# Caller-provided staging (staging=, reserve()) and same-node senders (ranks_per_node=)
# ---------------------------------------------------------------------------------------


def _rank_given_staging(rank, world, old, new, kind, budget, seed):
    from eplb_triton import reserve

    weights = make_rank_weights(MIXED_SPECS, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, seed)
    if kind == "reserve":
        staging = reserve(weights, max_buffer_bytes=budget, atomic=True)
    else:  # a runtime's per-tensor scratch buffers: the largest one is used
        staging = [torch.empty(t.shape[0] * 4, *t.shape[1:], dtype=t.dtype) for t in weights[0]]
    largest = staging if isinstance(staging, torch.Tensor) else max(staging, key=lambda t: t.numel() * t.element_size())
    largest.view(-1).view(torch.uint8).fill_(0xA5)  # poisoned: used staging no longer reads 0xA5
    stats = rearrange_expert_weights_inplace(old, new, weights, staging=staging, max_buffer_bytes=budget)
    used = int((largest.reshape(-1).view(torch.uint8) != 0xA5).sum())
    nbytes = largest.numel() * largest.element_size()
    return row_mismatches(weights, old, new, rank, seed), stats, used, nbytes


@pytest.mark.parametrize(
    "kind,budget",
    [
        pytest.param("reserve", None, id="reserve-default-budget"),
        pytest.param("reserve", 4 * 128, id="reserve-small-budget-with-undo"),  # 128-byte experts, 6 rows
        pytest.param("runtime-buffers", None, id="runtime-buffer-list"),
    ],
)
def test_given_staging_is_used_and_bounds_the_budget(distributed, kind, budget):
    old, new = random_maps(np.random.default_rng(41), 3, 4, 6, 12)
    results = distributed(4, _rank_given_staging, old, new, kind, budget, 2)
    for rank, (bad, stats, used, nbytes) in enumerate(results):
        assert bad == [], f"rank {rank}: rows with wrong bytes: {bad[:10]}"
        assert 0 < stats.peak_staging_bytes <= nbytes and used > 0
        if budget is not None:
            assert stats.peak_staging_bytes <= budget
    if budget is not None:  # several rounds: the undo copy was written past the staging, in the reserved tail
        assert any(stats.peak_undo_bytes and used > stats.peak_staging_bytes for _, stats, used, _ in results)


def _rank_bad_staging(rank, world, case):
    weights = make_rank_weights(MIXED_SPECS, 1, 2)
    old = np.arange(2 * world)[None] % 3
    fill_rank_weights(weights, old, rank)
    staging = {
        "too-small": torch.empty(8, dtype=torch.uint8),
        "not-a-tensor": "buffer",
        "not-contiguous-on-rank-1": torch.empty(64, 64).t() if rank == 1 else torch.empty(64, 64),
    }[case]
    try:
        rearrange_expert_weights_inplace(old, old[:, ::-1].copy(), weights, staging=staging)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return None


@pytest.mark.parametrize(
    "case,error,match",
    [
        pytest.param("too-small", "ValueError", "less than one packed expert", id="too-small"),
        pytest.param("not-a-tensor", "TypeError", "staging must be a tensor", id="not-a-tensor"),
        pytest.param("not-contiguous-on-rank-1", "ValueError", "no non-empty contiguous tensor", id="not-contiguous-rank-1"),
    ],
)
def test_bad_staging_raises_on_every_rank(distributed, case, error, match):
    results = distributed(2, _rank_bad_staging, case)
    assert all(r is not None and r[0] == error and match in r[1] for r in results), results


def _rank_per_node(rank, world, old, new, per_node):
    weights = make_rank_weights(MIXED_SPECS, 1, old.shape[1] // world)
    fill_rank_weights(weights, old, rank, 5)
    try:
        stats = rearrange_expert_weights_inplace(old, new, weights, ranks_per_node=per_node)
    except ValueError as exc:
        return str(exc)
    return row_mismatches(weights, old, new, rank, 5), stats.bytes_received


def test_ranks_per_node_follows_the_same_node_plan(distributed):
    old = np.array([[5, 3, 2, 4, 3, 5, 0, 1]])
    new = np.array([[3, 2, 0, 4, 4, 5, 3, 1]])
    nodes = plan_rearrangement(old, new, 4, ranks_per_node=2).layers[0].traffic
    assert not np.array_equal(nodes, plan_rearrangement(old, new, 4).layers[0].traffic)
    results = distributed(4, _rank_per_node, old, new, 2)
    eb = ExpertLayout(make_rank_weights(MIXED_SPECS, 1, 2)[0]).expert_bytes
    got = np.stack([received for _, received in results], axis=1) // eb
    assert all(bad == [] for bad, _ in results)
    assert np.array_equal(got, nodes * (1 - np.eye(4, dtype=np.int64)))
    messages = distributed(2, _rank_per_node, old, new, 3)  # 3 does not divide ep_size=2
    assert messages[0] == messages[1] and "ranks_per_node=3" in messages[0]


def _rank_balanced(rank, world, old, new, seed):
    from eplb_triton import TransferWorker

    weights = make_rank_weights(MIXED_SPECS, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, seed)
    stats = rearrange_expert_weights_inplace(old, new, weights)  # the default budget: one layer
    blocking = row_mismatches(weights, old, new, rank, seed)
    fill_rank_weights(weights, old, rank, seed)
    with TransferWorker(weights) as worker:
        worker.submit(old, new)
        worker.wait()
    return blocking, row_mismatches(weights, old, new, rank, seed), stats.rounds


@pytest.mark.parametrize(
    "world,logical,redundant,seed",
    [pytest.param(2, 24, 2, 5, id="W2-E24-R2"), pytest.param(4, 32, 8, 5, id="W4-E32-R8"), pytest.param(8, 16, 8, 5, id="W8-E16-R8")],
)
def test_balanced_placement_copies_local_moves_row_to_row_in_one_pass(distributed, world, logical, redundant, seed):
    """Balancer placements move about as many experts locally as over the wire; counting every
    local move as staged they needed two passes at the default budget. Local moves whose source
    no local move writes are copied row to row when the pass is written (before the received
    rows land), so each layer runs in one pass, bit for bit on both APIs."""
    from eplb_triton.schedule import _rank_load, direct_local_moves, schedule_layer
    from eplb_triton.testing.balancer import make_placements

    old, new = make_placements(3, logical, world, redundant, seed=seed)
    plan = plan_rearrangement(old, new, world)
    eb = packed_expert_bytes(MIXED_SPECS)
    direct = [int(direct_local_moves(l.src_slot, l.dst_slot, l.is_network).sum()) for l in plan.layers]
    passes = [len(schedule_layer(layer, eb).passes) for layer in plan.layers]
    staged_all = [int(_rank_load(layer).sum(axis=0).max()) for layer in plan.layers]  # every local move staged
    assert min(direct) > 0, direct  # the case this is about
    # layers that needed two passes with every local move staged, and now run in one
    assert any(rows > plan.num_local and n == 1 for rows, n in zip(staged_all, passes)), (staged_all, passes)
    if world == 2:
        assert passes == [1] * len(plan.layers), passes
    results = distributed(world, _rank_balanced, old, new, 3)
    for rank, (blocking, worker, rounds) in enumerate(results):
        assert blocking == [] and worker == [], (rank, blocking[:5], worker[:5])
        assert rounds == sum(passes), (rounds, passes)

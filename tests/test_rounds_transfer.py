"""The transfer run round by round (``rounds=``): bit-exact like the default path, at most one
isend + one irecv per rank and planner round, atomicity and ``verify`` kept (gloo ranks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton import plan_rearrangement, rearrange_expert_weights_inplace, transfer
from eplb_triton.testing.balancer import placement_sequence
from eplb_triton.comm import ChecksumMismatchError
from eplb_triton.testing.launch import run_ranks
from eplb_triton.plan import with_rounds
from eplb_triton.schedule import schedule_layer
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from map_cases import packed_expert_bytes, random_maps

SPECS = [
    TensorSpec((3, 5), torch.bfloat16),  # 30 bytes: odd row size
    TensorSpec((2, 3, 3), torch.uint8),  # 3-D rows
    TensorSpec((7,), torch.float32),
]
EXPERT_BYTES = 32 + 32 + 32  # 30, 18 and 28 bytes, each padded to 16 in a packed expert


def _rank_compare(rank, world, old, new, rounds, budget, verify, seed=0):
    """Run the default path and the round-by-round path on equal weights; record each batch."""
    num_local = old.shape[1] // world
    default = make_rank_weights(SPECS, old.shape[0], num_local)
    fill_rank_weights(default, old, rank, seed)
    by_rounds = [[t.clone() for t in layer] for layer in default]
    base = rearrange_expert_weights_inplace(old, new, default, max_buffer_bytes=budget, verify=verify)
    batches = []

    def hook(point, **info):
        if point == "posted":
            batches.append((info["layer"], info["pass_index"], info["network_round"], info["ops"]))

    transfer.fault_hook = hook
    try:
        stats = rearrange_expert_weights_inplace(old, new, by_rounds, max_buffer_bytes=budget, verify=verify, rounds=rounds)
    finally:
        transfer.fault_hook = None
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731 - bytes: NaN patterns compare equal
    same = all(torch.equal(as_bytes(a), as_bytes(b)) for la, lb in zip(default, by_rounds) for a, b in zip(la, lb))
    return same, row_mismatches(by_rounds, old, new, rank, seed), base, stats, batches


assert EXPERT_BYTES == packed_expert_bytes(SPECS)

CASES = [
    pytest.param(2, 2, 3, 4, id="W2-L2-N3-E4"),
    pytest.param(4, 3, 4, 10, id="W4-L3-N4-E10"),
    pytest.param(8, 2, 4, 20, id="W8-L2-N4-E20"),
]


@pytest.mark.parametrize("world,layers,num_local,logical", CASES)
@pytest.mark.parametrize(
    "rounds,budget_rows,verify",
    [
        pytest.param("pair", None, False, id="pair"),
        pytest.param(True, None, True, id="true-verify"),
        pytest.param("expert", None, False, id="expert"),
        pytest.param("expert", 3, True, id="expert-budget3-verify"),
        pytest.param("pair", 3, False, id="pair-budget3"),
    ],
)
def test_rounds_match_default_path(distributed, monkeypatch, world, layers, num_local, logical, rounds, budget_rows, verify):
    monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", "0")  # the default path's packed messages, as the rounds'
    rng = np.random.default_rng(world * 100 + layers * 10 + num_local)
    old, new = random_maps(rng, layers, world, num_local, logical)
    budget = None if budget_rows is None else budget_rows * (EXPERT_BYTES + (16 if verify else 0))
    results = distributed(world, _rank_compare, old, new, rounds, budget, verify)
    kind = "pair" if rounds is True else rounds
    plan = plan_rearrangement(old, new, world)
    for rank, (same, bad, base, stats, batches) in enumerate(results):
        assert bad == [], f"rank {rank}: wrong rows (layer, tensor, row): {bad[:10]}"
        assert same, f"rank {rank}: the round-by-round result differs from the default path"
        # the same bytes move, round by round
        assert np.array_equal(stats.bytes_sent, base.bytes_sent)
        assert np.array_equal(stats.bytes_received, base.bytes_received)
        assert stats.rounds == base.rounds
        # every planner round: at most one isend and one irecv on this rank
        for _, _, _, ops in batches:
            assert sum(k == "send" for _, k in ops) <= 1 and sum(k == "recv" for _, k in ops) <= 1, ops
        assert stats.p2p_ops == sum(len(ops) for *_, ops in batches)
        assert stats.exchanges == len(batches) and stats.max_ops_per_exchange <= 2
        # and the op-count limit of the default path: never more than 2 * (ep_size - 1) per batch
        assert base.max_ops_per_exchange <= 2 * (world - 1)
        assert base.p2p_ops <= 2 * (world - 1) * base.exchanges
        if kind == "pair":  # whole messages: still at most 2 * (ep_size - 1) ops per budget round
            assert stats.p2p_ops <= 2 * (world - 1) * stats.rounds
        # the batches are exactly the planner rounds this rank takes part in
        expected = []
        for l, layer_plan in enumerate(plan.layers):
            cost = EXPERT_BYTES + (16 if verify else 0)
            schedule = schedule_layer(layer_plan, cost, budget if budget is not None else num_local * cost)
            for i, r in enumerate(schedule.passes):
                sub = with_rounds(layer_plan.restrict(r), kind)
                active = [(s, q) for s, _, q, _ in sub.round_slices(rank) if s >= 0 or q >= 0]
                expected += [(l, i, s, q) for s, q in active]
        got = [
            (l, i, next((p for p, k in ops if k == "send"), -1), next((p for p, k in ops if k == "recv"), -1))
            for l, i, _, ops in batches
        ]
        assert got == expected
    # independent of the planner: every send of a budget round meets a receive of its peer
    from collections import Counter

    sends, recvs = Counter(), Counter()
    for rank, (*_, batches) in enumerate(results):
        for l, i, _, ops in batches:
            for peer, k in ops:
                (sends if k == "send" else recvs)[(l, i, rank, peer) if k == "send" else (l, i, peer, rank)] += 1
    assert sends == recvs and sends, (sends - recvs, recvs - sends)


def _rank_corrupt(rank, world, old, new, rounds, seed=0):
    """Flip one received byte on rank 1 in layer 0 (after the planner rounds); report layer states."""
    num_local = old.shape[1] // world
    weights = make_rank_weights(SPECS, old.shape[0], num_local)
    fill_rank_weights(weights, old, rank, seed)
    seen = []

    def hook(point, **info):
        if point == "in_flight" and info["rank"] == 1 and info["layer"] == 0 and info["received"] and not seen:
            message = next(iter(info["received"].values()))
            message[0] ^= 0xFF
            seen.append(True)

    transfer.fault_hook = hook
    error = None
    try:
        rearrange_expert_weights_inplace(old, new, weights, verify=True, rounds=rounds)
    except ChecksumMismatchError as exc:
        error = str(exc)
    finally:
        transfer.fault_hook = None
    not_old = {l for l, _, _ in row_mismatches(weights, old, old, rank, seed)}
    not_new = {l for l, _, _ in row_mismatches(weights, old, new, rank, seed)}
    return error, not_old, not_new


@pytest.mark.parametrize("rounds", [pytest.param("pair", id="pair"), pytest.param("expert", id="expert")])
def test_verify_catches_corruption_with_rounds(distributed, rounds):
    world = 4
    old, new = random_maps(np.random.default_rng(7), 2, world, 4, 10, empty_frac=0.0)
    assert plan_rearrangement(old, new, world).layers[0].rank(1).recv_rows  # rank 1 receives in layer 0
    results = distributed(world, _rank_corrupt, old, new, rounds)
    for rank, (error, not_old, not_new) in enumerate(results):
        assert error is not None and "checksum mismatch" in error, f"rank {rank}: {error}"
        if rank == 1:
            assert 0 not in not_old and 1 not in not_new  # layer 0 left old, layer 1 applied
        else:
            assert not not_new  # every other rank applied everything


def _rank_fail_mid_layer(rank, world, old, new, rounds, budget, seed=0):
    """Every rank raises when posting the second planner round of layer 1's second budget
    round; layer 1 must be rolled back to old everywhere, layer 0 stays new."""
    num_local = old.shape[1] // world
    weights = make_rank_weights(SPECS, old.shape[0], num_local)
    fill_rank_weights(weights, old, rank, seed)
    hits = []

    def hook(point, **info):
        if point == "pass_applied" and info["layer"] == 1 and info["pass_index"] == 0:
            hits.append(True)
            raise RuntimeError("injected after the first budget round")

    transfer.fault_hook = hook
    error = None
    try:
        rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=budget, rounds=rounds, timeout_s=5.0)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        error = type(exc).__name__
    finally:
        transfer.fault_hook = None
    not_old = {l for l, _, _ in row_mismatches(weights, old, old, rank, seed)}
    not_new = {l for l, _, _ in row_mismatches(weights, old, new, rank, seed)}
    return error, bool(hits), not_old, not_new


def test_failure_after_a_budget_round_rolls_the_layer_back():
    world = 2
    seq = placement_sequence(2, 2, 12, 4, world, seed=3)
    old, new = seq[0], seq[1]
    budget = 3 * EXPERT_BYTES
    plan = plan_rearrangement(old, new, world)
    assert len(schedule_layer(plan.layers[1], EXPERT_BYTES, budget).passes) > 1
    results = run_ranks(world, _rank_fail_mid_layer, old, new, "expert", budget, backend="gloo", timeout_s=60.0, group_timeout_s=30.0)
    for rank, (error, hit, not_old, not_new) in enumerate(results):
        assert hit and error == "RuntimeError", (rank, error)
        assert 0 not in not_new and 1 not in not_old, f"rank {rank}: layer 0 must be new and layer 1 old"


def test_bad_rounds_option_raises():
    old = np.array([[0, 1, 2, 3]])
    weights = make_rank_weights(SPECS, 1, 4)
    with pytest.raises(ValueError, match="rounds"):
        rearrange_expert_weights_inplace(old, old[:, ::-1].copy(), weights, rounds="peer")
    with pytest.raises(TypeError, match="rounds"):
        rearrange_expert_weights_inplace(old, old[:, ::-1].copy(), weights, rounds=2)
    # a single rank has no network: rounds change nothing
    fill_rank_weights(weights, old, 0, 0)
    stats = rearrange_expert_weights_inplace(old, old[:, ::-1].copy(), weights, rounds="expert")
    assert stats.p2p_ops == 0 and row_mismatches(weights, old, old[:, ::-1].copy(), 0, 0) == []


def _rank_mixed_rounds(rank, world, old, new):
    weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, 0)
    try:
        rearrange_expert_weights_inplace(old, new, weights, rounds="expert" if rank == 0 else None)
    except ValueError as exc:
        return str(exc), row_mismatches(weights, old, old, rank, 0)
    return None, None


def test_ranks_must_agree_on_rounds(distributed):
    old, new = random_maps(np.random.default_rng(3), 1, 2, 3, 4)
    for rank, (error, changed) in enumerate(distributed(2, _rank_mixed_rounds, old, new)):
        assert error is not None and "different inputs" in error, f"rank {rank}: {error}"
        assert changed == []  # raised before any weight was touched

"""TransferWorker: background per-layer transfers, swaps only in step()/wait().

Every check is bit-exact against the synthetic expert patterns (random-looking bytes, never
zeros) and, where it applies, against the blocking rearrangement of the same maps.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import traceback
from functools import partial

import numpy as np
import pytest
import torch

from eplb_triton import TransferWorker, rearrange_expert_weights_inplace, transfer
from eplb_triton.comm import PeerError
from eplb_triton.testing.launch import run_ranks
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from fault_cases import (
    all_to_all_maps,
    corrupt_in_flight,
    corrupted_peer_and_expert,
    exit_at,
    injected_naming_the_layer,
    raise_at,
    stall_at,
)
from map_cases import expected_received_experts, packed_expert_bytes, random_maps

SPECS = [
    TensorSpec((3, 5), torch.bfloat16),  # 30 bytes: odd row size
    TensorSpec((7,), torch.float32),
    TensorSpec((2, 3, 3), torch.uint8),  # 3-D row
    TensorSpec((1,), torch.int32),  # a per-expert scale
]
PACKED = 32 + 32 + 32 + 16  # bytes of one packed expert of SPECS: 30, 28, 18 and 4 bytes, each padded to 16


assert PACKED == packed_expert_bytes(SPECS)


def rotated_maps(layers, ep, num_local):
    """Every slot takes its neighbour's expert: every rank sends, receives and writes every row."""
    old = np.tile(np.arange(ep * num_local), (layers, 1))
    return old, np.roll(old, 1, axis=1)


def expected_after(old, new, swapped):
    """What each slot holds once the layers in ``swapped`` are applied (the others keep ``old``)."""
    state = old.copy()
    for l in swapped:
        state[l] = np.where(new[l] >= 0, new[l], old[l])
    return state


def rank_weights(rank, world, old, seed=0, specs=SPECS):
    weights = make_rank_weights(specs, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, seed)
    return weights


def as_bytes(weights):
    return [[t.contiguous().view(torch.uint8).clone() for t in layer] for layer in weights]


def same_bytes(a, b) -> bool:
    return all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


def slow_down(worker, seconds, rank_filter=None):
    """Make the worker spend ``seconds`` per layer (stop-aware), to keep a transfer in flight."""
    original = worker._transfer_layer

    def slow(job, index, prepared):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if worker._stop:
                from eplb_triton.worker.thread import _Stopped

                raise _Stopped
            time.sleep(0.002)
        return original(job, index, prepared)

    worker._transfer_layer = slow


@pytest.fixture(params=[pytest.param(True, id="board"), pytest.param(False, id="gloo")])
def step_board(request, monkeypatch):
    """Both step agreements: the shared-memory board (the default on one host) and the gloo
    all-reduce (``EPLB_TRITON_STEP_BOARD=0``, inherited by the forked ranks)."""
    if not request.param:
        monkeypatch.setenv("EPLB_TRITON_STEP_BOARD", "0")
    return request.param


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("eplb-transfer")]


# -- async result == expected == blocking result ---------------------------------------------
def _rank_async_vs_sync(rank, world, old, new, budget, verify, layers_ahead=2):
    seed = 3
    sync_w = rank_weights(rank, world, old, seed)
    sync_stats = rearrange_expert_weights_inplace(old, new, sync_w, max_buffer_bytes=budget, verify=verify)
    weights = rank_weights(rank, world, old, seed)
    timeout_s = 30.0 if verify else None
    with TransferWorker(weights, max_buffer_bytes=budget, verify=verify, timeout_s=timeout_s, layers_ahead=layers_ahead) as worker:
        worker.submit(old, new)
        stats = worker.wait()
        busy_after = worker.busy
        first = row_mismatches(weights, old, new, rank, seed)
        equal_to_sync = same_bytes(as_bytes(weights), as_bytes(sync_w))
        # A second rearrangement on the same worker, from where the first one left the rows.
        state = expected_after(old, new, range(old.shape[0]))
        rng = np.random.default_rng(11)  # the same maps on every rank
        again = np.stack([layer[rng.permutation(layer.size)] for layer in state])
        worker.submit(state, again)
        worker.wait()
        second = row_mismatches(weights, state, again, rank, seed)
    return dict(
        first=first,
        second=second,
        equal_to_sync=equal_to_sync,
        busy_after=busy_after,
        sent=stats.bytes_sent.tolist(),
        sync_sent=sync_stats.bytes_sent.tolist(),
        received=stats.bytes_received.tolist(),
        sync_received=sync_stats.bytes_received.tolist(),
        layers_timed=len(stats.layer_times_s),
        verified=stats.verified_experts,
        sync_verified=sync_stats.verified_experts,
        threads=len(worker_threads()),
        stacked=stats.stacked_layers,
    )


@pytest.mark.parametrize(
    "world,layers,num_local,logical,budget,verify,ahead",
    [
        pytest.param(2, 3, 4, 6, None, False, 2, id="W2-L3-N4-E6"),
        pytest.param(2, 2, 6, 8, 3 * PACKED, False, 2, id="W2-L2-N6-E8-budget3"),
        pytest.param(4, 4, 3, 9, None, False, 2, id="W4-L4-N3-E9"),
        pytest.param(4, 2, 4, 10, 4 * PACKED, False, 2, id="W4-L2-N4-E10-budget4"),
        pytest.param(2, 3, 4, 6, None, True, 2, id="W2-L3-N4-E6-verify"),
        pytest.param(4, 2, 4, 10, 4 * (PACKED + 16), True, 2, id="W4-L2-N4-E10-budget4-verify"),
        pytest.param(4, 6, 3, 9, None, False, 3, id="W4-L6-N3-E9-ahead3"),
        pytest.param(2, 5, 4, 6, 3 * (PACKED + 16), True, 5, id="W2-L5-N4-E6-budget3-verify-ahead5"),
        # stacks: several layers per exchange (at most layers_ahead // 2, at most 4)
        pytest.param(2, 9, 4, 6, None, False, 8, id="W2-L9-N4-E6-ahead8-stacked"),
        pytest.param(4, 6, 6, 18, 24 * PACKED, False, 4, id="W4-L6-N6-E18-budget24-ahead4-stacked"),
        pytest.param(2, 6, 6, 8, 11 * PACKED, False, 16, id="W2-L6-N6-E8-budget11-ahead16-stacked"),
    ],
)
def test_async_equals_sync_and_expected(distributed, world, layers, num_local, logical, budget, verify, ahead):
    rng = np.random.default_rng(world * 1000 + layers * 100 + num_local)
    old, new = random_maps(rng, layers, world, num_local, logical)
    results = distributed(world, _rank_async_vs_sync, old, new, budget, verify, ahead)
    for rank, res in enumerate(results):
        assert res["first"] == [], f"rank {rank}: wrong rows (layer, tensor, row) {res['first'][:8]}"
        assert res["second"] == [], f"rank {rank}: wrong rows after a second submit {res['second'][:8]}"
        assert res["equal_to_sync"], f"rank {rank}: async bytes differ from the blocking rearrangement"
        assert res["sent"] == res["sync_sent"] and res["received"] == res["sync_received"]
        assert not res["busy_after"] and res["layers_timed"] == layers
        assert res["verified"] == res["sync_verified"] and (res["verified"] > 0) == (verify and sum(res["received"]) > 0)
        assert res["threads"] == 0, f"rank {rank}: a worker thread outlived close()"
        assert (res["stacked"] > 0) == (ahead >= 4 and not verify), (rank, res["stacked"])
    expected = [n * PACKED for n in expected_received_experts(old, new, world)]  # from the maps alone
    assert sum(expected) > 0  # the maps move experts over the network
    if not verify:  # with verify, trailers are padded per peer message: that depends on the chosen senders
        assert [sum(r["received"]) for r in results] == expected


# -- step() in a loop: in order, the same on every rank, weights change only in step() --------
def _rank_step_loop(rank, world, old, new, worker_delay_s, step_sleep_s):
    weights = rank_weights(rank, world, old)
    steps, applied, untouched_before_step = [], [], True
    with TransferWorker(weights) as worker:
        on_board = worker._board is not None
        slow_down(worker, worker_delay_s)
        worker.submit(old, new)
        while worker.busy:
            time.sleep(step_sleep_s * (1 + rank))  # ranks reach step() at different times
            before = as_bytes(weights)
            # nothing may change between steps: compare with the state the last step left
            if row_mismatches(weights, old, expected_after(old, new, applied), rank) != []:
                untouched_before_step = False
            done = worker.step()
            steps.append(done)
            applied += done
            bad = row_mismatches(weights, old, expected_after(old, new, applied), rank)
            assert bad == [], f"after step {len(steps)} ({done}): wrong rows {bad[:8]}"
            changed = [l for l in range(old.shape[0]) if not same_bytes([as_bytes(weights)[l]], [before[l]])]
            assert set(changed) <= set(done), f"layers {changed} changed but step returned {done}"
        assert worker.step() == []  # idle: no collective, nothing to do
    return steps, untouched_before_step, on_board


@pytest.mark.parametrize("world", [pytest.param(2, id="W2"), pytest.param(4, id="W4")])
def test_step_loop_applies_layers_in_order_on_every_rank(distributed, world, step_board):
    layers = 6
    old, new = random_maps(np.random.default_rng(world), layers, world, 4, 6)
    results = distributed(world, _rank_step_loop, old, new, 0.02, 0.003)
    steps0 = results[0][0]
    for rank, (steps, untouched, on_board) in enumerate(results):
        assert on_board == step_board, rank  # one host: the board unless turned off
        assert steps == steps0, f"rank {rank} swapped {steps}, rank 0 swapped {steps0}"
        assert untouched, f"rank {rank}: weights changed outside step()"
    assert [l for s in steps0 for l in s] == list(range(layers))
    assert sum(1 for s in steps0 if s) >= 2, f"expected layers to arrive over several steps: {steps0}"


def _rank_layers_ahead(rank, world, old, new, layers_ahead):
    """Before each step, wait (on the worker's condition, not a sleep) until this rank's worker
    has staged as far as its staging buffers allow; record how far ahead it got."""
    weights = rank_weights(rank, world, old)
    steps, ahead = [], []
    kwargs = {} if layers_ahead is None else {"layers_ahead": layers_ahead}
    with TransferWorker(weights, **kwargs) as worker:
        worker.submit(old, new)
        while worker.busy:
            job = worker._job
            with worker._cond:
                staged = worker._cond.wait_for(
                    lambda: job.published >= min(job.swapped + len(job.staging_buffers), len(job.prepared_layers))
                    or worker._error is not None,
                    timeout=30.0,
                )
            assert staged, "the worker did not fill its staging buffers"
            time.sleep(0.05)  # room to go further than its buffers allow, if it wrongly could
            with worker._cond:
                ahead.append(job.layers_in(job.published) - job.layers_in(job.swapped))
            steps.append(worker.step())
        stacked = worker.wait().stacked_layers
    return steps, ahead, stacked, row_mismatches(weights, old, new, rank)


@pytest.mark.parametrize(
    "layers_ahead,steps,ahead,stacked",
    [
        pytest.param(None, [[0, 1], [2, 3], [4, 5]], [2, 2, 2], 0, id="default-two"),
        pytest.param(1, [[0], [1], [2], [3], [4], [5]], [1] * 6, 0, id="one"),
        # 4 buffers' worth: two stacks of two layers (one exchange each) in flight
        pytest.param(4, [[0, 1, 2, 3], [4, 5]], [4, 2], 6, id="four"),
        # 6: stacks of three, two of them
        pytest.param(6, [[0, 1, 2, 3, 4, 5]], [6], 6, id="six"),
        pytest.param(5, [[0, 1, 2, 3], [4, 5]], [4, 2], 6, id="five"),
    ],
)
def test_worker_stages_layers_ahead_of_the_swaps_and_no_further(distributed, layers_ahead, steps, ahead, stacked):
    # With N staging buffers' worth the worker stages N layers ahead of the swaps, and no
    # further, so one step swaps N layers (every rank writes every row of every layer here,
    # so every layer needs staging). From N = 4, stacks of N // 2 layers share an exchange.
    old, new = rotated_maps(6, 2, 3)
    results = distributed(2, _rank_layers_ahead, old, new, layers_ahead)
    for rank, (got_steps, got_ahead, got_stacked, bad) in enumerate(results):
        assert bad == [], f"rank {rank}: wrong rows {bad[:8]}"
        assert got_steps == steps, (rank, got_steps)
        assert got_ahead == ahead, (rank, got_ahead)
        assert got_stacked == stacked, (rank, got_stacked)


def _rank_layers_ahead_refused(rank, world, old, values):
    weights = rank_weights(rank, world, old)
    out = []
    for value in values:
        try:
            TransferWorker(weights, layers_ahead=value[rank] if isinstance(value, tuple) else value).close()
        except (TypeError, ValueError) as exc:
            out.append((type(exc).__name__, str(exc)))
        else:
            out.append(None)
    return out


def test_bad_or_differing_layers_ahead_is_refused_on_every_rank(distributed):
    old, _ = rotated_maps(2, 2, 3)
    values = [0, "3", True, (2, 3)]
    for rank, out in enumerate(distributed(2, _rank_layers_ahead_refused, old, values)):
        assert out[0][0] == "ValueError" and "layers_ahead must be at least 1" in out[0][1], out[0]
        assert out[1][0] == "TypeError" and "layers_ahead must be an int" in out[1][1], out[1]
        assert out[2][0] == "TypeError", out[2]
        assert out[3][0] == "ValueError" and "layers_ahead" in out[3][1], (rank, out[3])


# -- errors -------------------------------------------------------------------------------------
def _rank_bad_maps(rank, world, old, new, bad_new, rank_dependent):
    weights = rank_weights(rank, world, old)
    before = as_bytes(weights)
    with TransferWorker(weights) as worker:
        wrong = bad_new + rank if rank_dependent else bad_new
        try:
            worker.submit(old, wrong)
            error = None
        except (ValueError, TypeError) as exc:
            error = (type(exc).__name__, str(exc))
        untouched = same_bytes(as_bytes(weights), before)
        busy = worker.busy
        worker.submit(old, new)  # still usable after a rejected submit
        worker.wait()
        good = row_mismatches(weights, old, new, rank)
    return error, untouched, busy, good


@pytest.mark.parametrize("world", [pytest.param(2, id="W2"), pytest.param(4, id="W4")])
def test_bad_map_raises_on_every_rank_before_touching_weights(distributed, world):
    old, new = random_maps(np.random.default_rng(5), 2, world, 3, 5, empty_frac=0.0)
    bad = new.copy()
    bad[1, 2] = 99  # no old slot of layer 1 holds expert 99
    for error, untouched, busy, good in distributed(world, _rank_bad_maps, old, new, bad, False):
        assert error is not None and error[0] == "ValueError" and "expert 99" in error[1]
        assert untouched and not busy and good == []


def test_maps_differing_across_ranks_raise_on_every_rank(distributed):
    old, new = rotated_maps(2, 2, 2)
    results = distributed(2, _rank_bad_maps, old, new, np.zeros_like(new), True)
    for error, untouched, busy, good in results:
        assert error is not None and error[0] == "ValueError"
        assert untouched and not busy and good == []


def _rank_second_submit(rank, world, old, new):
    weights = rank_weights(rank, world, old)
    with TransferWorker(weights) as worker:
        slow_down(worker, 0.01)
        worker.submit(old, new)
        try:
            worker.submit(new, old)
            message = None
        except RuntimeError as exc:
            message = str(exc)
        worker.wait()
        return message, row_mismatches(weights, old, new, rank)


def test_second_submit_while_busy_raises(distributed):
    old, new = rotated_maps(3, 2, 2)
    for message, bad in distributed(2, _rank_second_submit, old, new):
        assert message is not None and "in progress" in message
        assert bad == []


class InjectedFailure(Exception):
    pass


def _rank_worker_failure(rank, world, old, new, failing_rank, failing_layer):
    weights = rank_weights(rank, world, old)
    worker = TransferWorker(weights)
    if rank == failing_rank:
        original = worker._transfer_layer

        def transfer_or_fail(job, index, prepared):
            if index == failing_layer:
                raise InjectedFailure(f"disk on fire at layer {index}")
            return original(job, index, prepared)

        worker._transfer_layer = transfer_or_fail
    worker.submit(old, new)
    applied, error = [], None
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            applied += worker.step()
            time.sleep(0.002)
    except Exception as exc:  # noqa: BLE001 - inspected below
        error = exc
    assert error is not None, "the failure never surfaced"
    tb = "".join(traceback.format_exception(error))
    bad = row_mismatches(weights, old, expected_after(old, new, applied), rank)
    try:
        worker.step()
        after = None
    except RuntimeError as exc:
        after = str(exc)
    worker.close()
    return dict(
        type=type(error).__name__,
        is_runtime_error=isinstance(error, RuntimeError),
        where=(getattr(error, "layer", None), getattr(error, "peer", None)),
        message=str(error),
        worker_frame="transfer_or_fail" in tb,
        applied=applied,
        bad=bad,
        closed=worker.closed,
        thread_alive=worker._thread.is_alive(),
        after=after,
    )


@pytest.mark.parametrize("world", [pytest.param(2, id="W2"), pytest.param(4, id="W4")])
def test_worker_failure_surfaces_on_every_rank(distributed, world, step_board):
    old, new = rotated_maps(5, world, 2)
    results = distributed(world, _rank_worker_failure, old, new, 1, 2)
    applied0 = results[0]["applied"]
    for rank, res in enumerate(results):
        if rank == 1:  # the original exception, raised from the worker thread's frames
            assert res["type"] == "InjectedFailure" and res["worker_frame"], res
        else:
            assert res["type"] == "TransferError" and res["is_runtime_error"], res
            assert "rank 1" in res["message"] and "disk on fire" in res["message"]
            assert res["where"] == (2, 1), res  # the failing layer, and the failing rank as the peer
        assert res["applied"] == applied0 and all(l < 2 for l in applied0), res["applied"]
        assert res["bad"] == [], f"rank {rank}: rows changed outside swapped layers {res['bad'][:8]}"
        assert res["closed"] and not res["thread_alive"]
        assert res["after"] is not None and "closed" in res["after"]


def _rank_subgroups(rank, world, old, new, explicit_transfer):
    import torch.distributed as dist

    # Two EP groups of two ranks each (a DP x EP layout); both build workers at the same time.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ep_group = groups[rank // 2]
    ep_rank = rank % 2
    transfer = None
    if explicit_transfer:  # every rank enters every (globally synchronised) new_group call
        transfer = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    weights = rank_weights(ep_rank, 2, old, seed=rank // 2)
    with TransferWorker(weights, ep_group, transfer_group=transfer) as worker:
        worker.submit(old, new)
        applied = []
        while worker.busy:
            applied += worker.step()
        stats = worker.wait()
    return applied, row_mismatches(weights, old, new, ep_rank, seed=rank // 2), stats.total_bytes_sent


@pytest.mark.parametrize("explicit_transfer", [pytest.param(False, id="default-groups"), pytest.param(True, id="explicit-transfer-group")])
def test_two_ep_subgroups_each_with_a_worker(distributed, explicit_transfer):
    old, new = random_maps(np.random.default_rng(8), 3, 2, 3, 5)
    results = distributed(4, _rank_subgroups, old, new, explicit_transfer)
    for rank, (applied, bad, sent) in enumerate(results):
        assert applied == [0, 1, 2], f"rank {rank}: {applied}"
        assert bad == [], f"rank {rank}: wrong rows {bad[:8]}"
    # both EP groups run the same maps; the bytes come from the maps alone
    assert sum(r[2] for r in results) == 2 * PACKED * sum(expected_received_experts(old, new, 2)) > 0


# -- shutdown -------------------------------------------------------------------------------------
def _rank_consecutive_workers(rank, world, old, new):
    from eplb_triton.worker import groups as worker_groups

    weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank)
    bad = []
    for current, target in ((old, new), (new, old), (old, new)):
        with TransferWorker(weights) as w:  # default groups: made once, then reused from the pool
            w.submit(current, target)
            w.wait()
        bad.extend(row_mismatches(weights, current, target, rank))
    pooled = sum(len(groups) for groups in worker_groups._GROUP_POOL.values())
    return bad, pooled


def test_consecutive_workers_with_default_groups(distributed):
    # Regression: a second worker's constructor hung at world 4 when the first one's group was
    # destroyed and the new one reused its name.
    rng = np.random.default_rng(11)
    old, _ = random_maps(rng, 2, 4, 4, 10)
    new = np.stack([rng.permutation(row) for row in old])  # same experts: valid in both directions
    for bad, pooled in distributed(4, _rank_consecutive_workers, old, new, timeout_s=60):
        assert bad == []
        assert pooled == 1  # one gloo transfer group made, reused by the later workers


def _rank_close_during_transfer(rank, world, old, new):
    weights = rank_weights(rank, world, old)
    before = as_bytes(weights)
    worker = TransferWorker(weights)
    slow_down(worker, 0.05)
    worker.submit(old, new)
    time.sleep(0.02)
    begin = time.monotonic()
    worker.close(timeout_s=5.0)
    elapsed = time.monotonic() - begin
    return elapsed, worker._thread.is_alive(), same_bytes(as_bytes(weights), before), worker.busy, len(worker_threads())


def test_close_during_transfer(distributed):
    old, new = rotated_maps(4, 2, 3)
    for elapsed, alive, untouched, busy, threads in distributed(2, _rank_close_during_transfer, old, new):
        assert elapsed < 2.0 and not alive and threads == 0
        assert untouched and not busy


def _rank_close_with_lagging_peer(rank, world, old, new, peer_dies):
    import torch.distributed as dist

    weights = rank_weights(rank, world, old)
    worker = TransferWorker(weights)
    if rank == 1:
        slow_down(worker, 60.0)  # rank 1 does not reach its first exchange
    worker.submit(old, new)
    if rank == 1 and peer_dies:
        time.sleep(0.1)
        # what rank 0 sees when rank 1's process dies: its transfer connections close
        dist.destroy_process_group(worker._transfer.group)
    time.sleep(0.3 if rank == 0 else 0.6)  # rank 0's worker is now blocked waiting for rank 1
    begin = time.monotonic()
    worker.close(timeout_s=5.0)
    return time.monotonic() - begin, worker._thread.is_alive(), worker._error is not None


@pytest.mark.parametrize("peer_dies", [pytest.param(False, id="peer-closes-later"), pytest.param(True, id="peer-connection-lost")])
def test_close_with_a_lagging_or_lost_peer(distributed, peer_dies):
    old, new = rotated_maps(2, 2, 2)
    (elapsed0, alive0, error0), (elapsed1, alive1, _) = distributed(2, _rank_close_with_lagging_peer, old, new, peer_dies)
    assert not alive0 and not alive1
    assert elapsed0 < 2.0 and elapsed1 < 2.0
    # a lagging peer is waited for (its drain completes rank 0's exchange); a lost one fails it
    assert error0 == peer_dies


def _rank_close_with_stalled_peer(rank, world, old, new):
    weights = rank_weights(rank, world, old)
    worker = TransferWorker(weights, timeout_s=TIMEOUT_S)
    if rank == 1:
        slow_down(worker, 60.0)  # rank 1's worker never reaches its first exchange
    worker.submit(old, new)
    time.sleep(0.3)  # rank 0's worker is now blocked waiting for rank 1
    if rank == 1:
        time.sleep(2 * TIMEOUT_S + 1.0)  # alive, but closes only long after rank 0 gave up
    before = as_bytes(weights)
    begin = time.monotonic()
    worker.close(timeout_s=3 * TIMEOUT_S)
    elapsed = time.monotonic() - begin
    return elapsed, worker._thread.is_alive(), type(worker._error).__name__, same_bytes(as_bytes(weights), before)


def test_close_with_a_stalled_peer_ends_within_timeout_s():
    old, new = rotated_maps(2, 2, 2)
    (elapsed0, alive0, error0, same0), (elapsed1, alive1, _, same1) = distributed_faults(
        2, _rank_close_with_stalled_peer, old, new
    )
    # rank 0's drain cannot complete (its peer never posts): its thread gives up after timeout_s
    assert error0 == "PeerTimeoutError" and not alive0 and elapsed0 < TIMEOUT_S + 1.5, (elapsed0, error0)
    assert not alive1 and elapsed1 < TIMEOUT_S + 1.5 and same0 and same1


def distributed_faults(world, fn, *args):
    return run_ranks(world, fn, *args, backend="gloo", timeout_s=60.0, group_timeout_s=20.0)


def test_context_manager_and_single_rank_without_group():
    rng = np.random.default_rng(9)
    old, new = random_maps(rng, 4, 1, 6, 5)
    weights = rank_weights(0, 1, old, seed=1)
    expected = rank_weights(0, 1, old, seed=1)
    rearrange_expert_weights_inplace(old, new, expected)
    with TransferWorker(weights) as worker:
        assert worker.step() == [] and not worker.busy
        worker.submit(old, new)
        assert worker.busy
        deadline = time.monotonic() + 10
        while worker._job.published < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)
        # two layers are staged (both staging buffers full: the worker waits), yet no weight has changed
        assert worker._job.published == 2
        assert row_mismatches(weights, old, old, 0, seed=1) == []
        assert worker.step() == [0, 1] and worker.busy
        assert row_mismatches(weights, old, expected_after(old, new, [0, 1]), 0, seed=1) == []
        stats = worker.wait()
        assert not worker.busy and worker.step() == []
        assert worker.wait() is stats  # idle: the stats of the finished rearrangement
    assert worker.closed and worker_threads() == []
    assert row_mismatches(weights, old, new, 0, seed=1) == []
    assert same_bytes(as_bytes(weights), as_bytes(expected))
    changed = int(((new >= 0) & (new != old)).sum())  # one rank: every changed row is a local write
    assert stats.p2p_ops == 0 and stats.local_copies == changed and len(stats.layer_times_s) == 4
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(old, new)


def test_exception_in_with_block_closes_worker():
    old, new = random_maps(np.random.default_rng(2), 2, 1, 4, 4)
    weights = rank_weights(0, 1, old)
    with pytest.raises(KeyError):
        with TransferWorker(weights) as worker:
            slow_down(worker, 0.05)
            worker.submit(old, new)
            raise KeyError("serving crashed")
    assert worker.closed and not worker._thread.is_alive()
    assert row_mismatches(weights, old, old, 0) == []  # nothing was swapped


def test_bad_weights_raise_at_submit_single_rank():
    old, new = random_maps(np.random.default_rng(4), 2, 1, 4, 4)
    weights = rank_weights(0, 1, old)
    with TransferWorker(weights[:1]) as worker:  # one layer of weights for two layers of maps
        with pytest.raises(ValueError, match="layers"):
            worker.submit(old, new)
        assert not worker.busy


# -- reliability: timeouts, peers that exit or stall, verify ---------------------------------------
TIMEOUT_S = 2.0


def _mark(sync_dir: str, name: str, rank: int) -> None:
    open(os.path.join(sync_dir, f"{name}-{rank}"), "w").close()


def _wait_marks(sync_dir: str, name: str, ranks, timeout_s: float = 30.0) -> bool:
    """Wait until every rank in ``ranks`` has marked ``name`` (a file barrier across the forked
    ranks: synchronisation by events, not by sleeping long enough). False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(sync_dir, f"{name}-{r}")) for r in ranks):
            return True
        time.sleep(0.005)
    return False


# Held by the serving loop of _rank_fault around each step(). A rank that exits on purpose
# (exit_at with lock=_STEP_LOCK) takes it first, so it never dies inside a step agreement: a collective that a rank
# leaves half-way can complete on some survivors and fail on others (gloo's ring all-reduce did
# in 4 of 30 runs), which no agreement can prevent (see TransferWorker's docstring); these tests
# check what the library does guarantee when a rank dies between two steps.
_STEP_LOCK = threading.Lock()


def _rank_fault(rank, world, old, new, hook, kwargs, stall_main, exiting, sync_dir):
    """Submit, then step() in a serving loop until an error surfaces (or the work is done).

    ``hook`` becomes ``eplb_triton.transfer.fault_hook`` (it reads ``info["rank"]``);
    ``stall_main=rank`` makes that rank's serving thread stop calling step() after its first
    step until every other rank has raised (and so has given up on it). A rank whose step()
    raised keeps its process, and so its connections, until every rank that does not exit on
    purpose (``exiting``) is done: a peer still probing never sees a survivor vanish.
    """
    weights = rank_weights(rank, world, old)
    transfer.fault_hook = hook
    worker = TransferWorker(weights, **kwargs)
    worker.submit(old, new)
    others = [r for r in range(world) if r != rank and r not in exiting]
    applied, error, steps, stalled = [], None, 0, None
    begin = time.monotonic()
    deadline = begin + 30
    try:
        while worker.busy and time.monotonic() < deadline:
            with _STEP_LOCK:
                applied += worker.step()
            steps += 1
            if stall_main == rank and steps == 1:
                stalled = _wait_marks(sync_dir, "raised", others)
    except Exception as exc:  # noqa: BLE001 - inspected by the test
        error = exc
    elapsed = time.monotonic() - begin
    _mark(sync_dir, "raised" if error is not None else "finished", rank)
    _mark(sync_dir, "done", rank)
    everyone_done = _wait_marks(sync_dir, "done", others)
    close_begin = time.monotonic()
    worker.close(timeout_s=3.0)
    close_s = time.monotonic() - close_begin
    transfer.fault_hook = None
    summary = None
    if error is not None:
        summary = dict(
            type=type(error).__name__,
            text=str(error),
            layer=getattr(error, "layer", None),
            peer=getattr(error, "peer", None),
            expert=getattr(error, "expert", None),
        )
    return dict(
        error=summary,
        applied=applied,
        bad=row_mismatches(weights, old, expected_after(old, new, applied), rank),
        elapsed=elapsed,
        close_s=close_s,
        closed=worker.closed,
        stalled=stalled,
        everyone_done=everyone_done,
    )


def run_faults(world, old, new, hook, stall_main=None, exiting=(), **kwargs):
    with tempfile.TemporaryDirectory(prefix="eplb-faults-") as sync_dir:
        return run_ranks(
            world, _rank_fault, old, new, hook, kwargs, stall_main, tuple(exiting), sync_dir,
            backend="gloo", timeout_s=60.0, group_timeout_s=20.0, allow_missing=True,
        )


def assert_consistent(results, ranks):
    """Every listed rank swapped the same layers, and each layer is entirely old or entirely new."""
    applied = results[ranks[0]]["applied"]
    for rank in ranks:
        res = results[rank]
        assert res["applied"] == applied, (rank, res["applied"], applied)
        assert res["bad"] == [], f"rank {rank}: rows differ from old/new per swapped layer {res['bad'][:8]}"
        assert res["closed"] and res["close_s"] < 3.5, res
        assert res["everyone_done"], f"rank {rank}: timed out waiting for the other ranks to finish"
    return applied


def test_peer_exits_mid_layer_every_survivor_names_layer_and_peer():
    world = 4
    old, new = all_to_all_maps(world, 4)
    results = run_faults(world, old, new, partial(exit_at, "before_send", 1, 3, lock=_STEP_LOCK), exiting=[3], timeout_s=TIMEOUT_S)
    assert results[3] is None  # it exited
    applied = assert_consistent(results, [0, 1, 2])
    assert all(l < 1 for l in applied), applied
    for rank in range(3):
        error = results[rank]["error"]
        assert error is not None and error["type"] in ("PeerFailedError", "PeerTimeoutError"), (rank, error)
        assert (error["layer"], error["peer"]) == (1, 3), (rank, error)
        assert "layer 1" in error["text"] and "peer 3" in error["text"], error
        assert results[rank]["elapsed"] < TIMEOUT_S + 4.0, results[rank]["elapsed"]  # not the group's 20 s


def test_peer_exits_between_layers_every_survivor_raises(step_board):
    # rank 3 dies once layer 1 is staged everywhere; the survivors' workers may be waiting for a
    # free staging buffer rather than exchanging, so the step agreement is what notices it
    world = 4
    old, new = all_to_all_maps(world, 4)
    results = run_faults(world, old, new, partial(exit_at, "before_publish", 1, 3, lock=_STEP_LOCK), exiting=[3], timeout_s=TIMEOUT_S)
    assert results[3] is None
    applied = assert_consistent(results, [0, 1, 2])
    for rank in range(3):
        error = results[rank]["error"]
        assert error is not None and error["type"] in ("PeerFailedError", "PeerTimeoutError"), (rank, error)
        if "step agreement" in error["text"]:  # this rank's worker was not exchanging with it
            assert error["layer"] == len(applied), error
            # the probe after the failed agreement names the peer that did not answer, if any
            assert error["peer"] is None or (error["peer"] == 3 and "peer 3 did not answer" in error["text"]), error
        else:  # its worker saw a peer fail in layer 2: rank 3, or a survivor whose gloo context
            # closed its connections when its own exchange with rank 3 failed (a cascade)
            assert error["layer"] == 2 and error["peer"] != rank and f"peer {error['peer']}" in error["text"], error
        assert results[rank]["elapsed"] < TIMEOUT_S + 4.0, results[rank]["elapsed"]


def test_stalled_peer_worker_times_out_on_every_rank():
    # rank 3 keeps serving (calls step()), but its worker sends nothing in layer 1
    world = 4
    old, new = all_to_all_maps(world, 3)
    results = run_faults(world, old, new, partial(stall_at, "before_send", 1, 3, 1.5 * TIMEOUT_S), timeout_s=TIMEOUT_S)
    applied = assert_consistent(results, [0, 1, 2, 3])
    assert all(l < 1 for l in applied), applied
    for rank in range(4):
        error = results[rank]["error"]
        assert error is not None and error["type"] == "PeerTimeoutError", (rank, error)
        assert (error["layer"], error["peer"]) == (1, 3), (rank, error)
        assert "timeout_s" in error["text"] and "layer 1" in error["text"], error
        if rank != 3:
            assert 0.8 * TIMEOUT_S < results[rank]["elapsed"] < 2 * TIMEOUT_S + 2.0, results[rank]["elapsed"]


def test_peer_that_stops_calling_step_times_out_on_every_rank(step_board):
    # rank 3's worker is fine, but its serving thread stops calling step() for a while
    world = 4
    old, new = all_to_all_maps(world, 3)
    results = run_faults(world, old, new, None, stall_main=3, timeout_s=TIMEOUT_S)
    assert results[3]["stalled"] is True  # rank 3 resumed only once every other rank had raised
    applied = assert_consistent(results, [0, 1, 2, 3])
    assert applied == [] or applied[-1] < 2, applied  # the step that rank 3 missed swapped nothing
    for rank in range(3):
        error, elapsed = results[rank]["error"], results[rank]["elapsed"]
        assert error is not None and error["type"] == "PeerTimeoutError", (rank, error)
        assert "step agreement" in error["text"] and "timeout_s" in error["text"], error
        assert error["layer"] == len(applied), error  # the next layer to swap
        assert error["peer"] == 3 and "peer 3 did not answer" in error["text"], error  # named by the probe
        # the agreement (timeout_s + grace), then the probe that names the peer (as long)
        assert TIMEOUT_S < elapsed < 2 * (TIMEOUT_S + 0.5) + 2.0, elapsed
    # when rank 3 comes back its peers have given up: it must not swap what they abandoned
    error = results[3]["error"]
    assert error is not None and error["type"].startswith("Peer"), error


@pytest.mark.parametrize(
    "point,pass_index,ahead",
    [
        pytest.param("layer_start", 0, 2, id="layer-start"),
        pytest.param("before_send", 0, 2, id="before-first-send"),
        pytest.param("before_send", 1, 2, id="mid-layer-before-second-pass"),
        pytest.param("in_flight", 1, 2, id="mid-layer-after-second-receive"),
        pytest.param("before_publish", 0, 2, id="between-layers"),
        pytest.param("in_flight", 1, 3, id="mid-layer-after-second-receive-3-ahead"),
    ],
)
def test_injected_failure_leaves_every_layer_old_or_new_on_every_rank(point, pass_index, ahead):
    # a tight budget: every layer runs in several passes, so "mid-layer" really is mid-layer
    world = 4
    old, new = all_to_all_maps(world, 3)
    results = run_faults(
        world, old, new, partial(raise_at, point, 1, pass_index, 2, error=injected_naming_the_layer), timeout_s=10.0,
        max_buffer_bytes=4 * PACKED, layers_ahead=ahead,
    )
    applied = assert_consistent(results, list(range(world)))
    assert all(l < 1 for l in applied), applied
    for rank, res in enumerate(results):
        error = res["error"]
        assert error is not None and f"injected at {point}, layer 1" in error["text"], (rank, error)
        if rank == 2:  # the original exception
            assert error["type"] == "Injected", error
        else:  # names the layer the failing rank was transferring, and that rank
            assert error["type"] == "TransferError" and (error["layer"], error["peer"]) == (1, 2), error


@pytest.mark.parametrize(
    "layer,pass_index,budget",
    [
        pytest.param(1, 0, None, id="single-pass"),
        pytest.param(1, 1, 4 * (PACKED + 16), id="second-pass"),
    ],
)
def test_verify_catches_corruption_in_flight_and_layer_is_not_applied(layer, pass_index, budget):
    world = 4
    old, new = all_to_all_maps(world, 3)
    hook = partial(corrupt_in_flight, layer, pass_index)
    results = run_faults(world, old, new, hook, verify=True, max_buffer_bytes=budget, timeout_s=10.0)
    applied = assert_consistent(results, list(range(world)))
    assert all(l < layer for l in applied), applied  # the corrupted layer is old on every rank
    # the hook corrupted the first expert of the last peer's message in that pass
    want_peer, want_expert = corrupted_peer_and_expert(old, new, world, layer, pass_index, PACKED + 16, budget)
    for rank in range(world):
        error = results[rank]["error"]
        assert error is not None and error["type"] == "ChecksumMismatchError", (rank, error)
        assert (error["layer"], error["peer"], error["expert"]) == (layer, want_peer, want_expert), (rank, error)
        assert f"layer {layer}" in error["text"] and f"expert {want_expert}" in error["text"], error
        assert f"peer {want_peer}" in error["text"] and "rank 1" in error["text"], error


def test_without_verify_the_corruption_goes_through():
    # the hook really corrupts: without checksums the bad byte is swapped into the weights
    world = 4
    old, new = all_to_all_maps(world, 3)
    results = run_faults(world, old, new, partial(corrupt_in_flight, 1, 0))
    assert [r["error"] for r in results] == [None] * world
    assert [l for l, _, _ in results[1]["bad"]] != [] and {l for l, _, _ in results[1]["bad"]} == {1}


class _LateControl:
    """A stand-in control group of two ranks whose peer reached the step agreement late.

    It answers the agreement at once, as gloo does when a stalled rank's all-reduce meets
    contributions its peer left behind before giving up; the probe then finds peer 1 gone.
    """

    rank, world_size = 0, 2

    def __init__(self, late_s):
        self.late_s = late_s

    def all_reduce_max(self, flags, *, timeout_s=None):
        peer = flags.clone()
        peer[2], peer[3] = flags[2] + int(self.late_s * 1e6), flags[3] - int(self.late_s * 1e6)
        flags.copy_(torch.maximum(flags, peer))
        return flags

    def confirm(self, failed, *, timeout_s=None, where=""):
        from eplb_triton.comm import PeerFailedError

        raise PeerFailedError(f"{where}: peer 1 is gone", peer=1)


@pytest.mark.parametrize("late_s,raises", [pytest.param(0.2, False, id="late-within-timeout"), pytest.param(3.0, True, id="late-beyond-timeout")])
def test_step_agreement_reached_too_late_swaps_nothing(late_s, raises):
    old, new = random_maps(np.random.default_rng(3), 3, 1, 4, 4, empty_frac=0.0)
    weights = rank_weights(0, 1, old)
    worker = TransferWorker(weights, timeout_s=TIMEOUT_S)
    worker.submit(old, new)
    deadline = time.monotonic() + 10
    while worker._job.published < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    worker._control = _LateControl(late_s)
    if not raises:
        assert worker.step()[:1] == [0]  # entries close enough: nobody gave up, the layers swap
        worker.close()
        return
    with pytest.raises(PeerError) as info:
        worker.step()
    assert "apart" in str(info.value) and info.value.peer == 1 and info.value.layer == 0, info.value
    assert worker.closed and not worker._thread.is_alive()
    assert row_mismatches(weights, old, old, 0) == []  # nothing swapped


@pytest.mark.parametrize(
    "kwargs,error",
    [
        pytest.param(dict(timeout_s=0), ValueError, id="timeout-zero"),
        pytest.param(dict(timeout_s="2"), TypeError, id="timeout-str"),
        pytest.param(dict(verify=1), TypeError, id="verify-int"),
    ],
)
def test_bad_reliability_arguments_are_rejected(kwargs, error):
    old, _ = random_maps(np.random.default_rng(1), 1, 1, 2, 2)
    with pytest.raises(error):
        TransferWorker(rank_weights(0, 1, old), **kwargs)
    assert worker_threads() == []


def test_verify_single_rank_without_network():
    old, new = random_maps(np.random.default_rng(6), 3, 1, 6, 5)
    weights = rank_weights(0, 1, old)
    with TransferWorker(weights, verify=True, timeout_s=5.0) as worker:
        worker.submit(old, new)
        stats = worker.wait()
    assert row_mismatches(weights, old, new, 0) == [] and stats.verified_experts == 0


# -- GPU: swaps on the current stream while a kernel keeps reading the weights --------------------
GPU_SPECS = [
    TensorSpec((96, 70), torch.bfloat16),
    TensorSpec((3, 5), torch.float32),
    TensorSpec((33, 17, 3), torch.uint8),
]


def _gpu_worker_run(group):
    rng = np.random.default_rng(0)
    layers, num_local = 6, 12
    old = np.stack([rng.permutation(num_local) for _ in range(layers)])
    new = np.stack([rng.choice(num_local, num_local) for _ in range(layers)])
    new[:, 0] = -1
    new[1] = np.roll(old[1], 1)  # a cycle of local moves
    weights = make_rank_weights(GPU_SPECS, layers, num_local, "cuda")
    for layer in weights:
        for t in layer:
            t.view(torch.uint8).fill_(0xA5)  # poison
    # The fill is queued behind a long kernel on the main stream; the worker (own stream) must
    # still read the filled rows, not the poison.
    torch.cuda._sleep(50_000_000)
    fill_rank_weights(weights, old, 0, seed=2)
    applied = []
    with TransferWorker(weights, group) as worker:
        worker.submit(old, new)
        while worker.busy:
            # "serving": a long kernel, then reads of every weight, queued before each swap
            torch.cuda._sleep(2_000_000)
            checksum = sum(t.view(torch.uint8).sum(dtype=torch.int64) for layer in weights for t in layer)
            done = worker.step()
            applied += done
            bad = row_mismatches(weights, old, expected_after(old, new, applied), 0, seed=2)
            assert bad == [], f"after swapping {done}: wrong rows {bad[:8]}"
            assert int(checksum) > 0
    assert applied == list(range(layers))
    assert row_mismatches(weights, old, new, 0, seed=2) == []


@pytest.mark.gpu
def test_gpu_swaps_while_main_stream_reads_weights_no_group():
    _gpu_worker_run(None)


@pytest.mark.gpu
def test_gpu_swaps_while_main_stream_reads_weights_nccl_world1():
    import torch.distributed as dist

    from eplb_triton.testing.launch import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        _gpu_worker_run(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_gpu_step_swaps_through_bound_launches(monkeypatch):
    """step() launches each swap through the launch the worker thread bound (no launcher lookup
    on the serving thread), from the first rebalance on; bit for bit, on a side stream too."""
    from eplb_triton.layout import ExpertLayout

    main_launches = []
    original_launch = ExpertLayout.launch

    def launch(self, mode, *args, **kwargs):
        if threading.current_thread() is threading.main_thread() and not kwargs.get("compile_only"):
            main_launches.append(mode)
        return original_launch(self, mode, *args, **kwargs)

    monkeypatch.setattr(ExpertLayout, "launch", launch)
    rng = np.random.default_rng(3)
    layers, num_local = 5, 10
    state = np.stack([rng.permutation(num_local) for _ in range(layers)])
    weights = make_rank_weights(GPU_SPECS, layers, num_local, "cuda")
    fill_rank_weights(weights, state, 0, seed=9)
    side = torch.cuda.Stream()
    with TransferWorker(weights) as worker:
        for number in range(3):  # the third on a side stream (the serving stream may change)
            target = np.stack([rng.choice(np.unique(row), num_local) for row in state])  # replicas of held experts
            with torch.cuda.stream(side if number == 2 else torch.cuda.current_stream()):
                worker.submit(state, target)
                applied = []
                while worker.busy:
                    torch.cuda._sleep(200_000)
                    applied += worker.step()
            torch.cuda.synchronize()
            assert applied == list(range(layers))
            assert row_mismatches(weights, state, target, 0, seed=9) == [], number
            state = expected_after(state, target, range(layers))
    assert main_launches == [], main_launches  # every swap bound; submit only compiles


@pytest.mark.gpu
def test_gpu_cached_current_stream_follows_the_current_stream():
    """The swap's stream lookup (``hooks.current_stream``, cached by torch's stream id) names the
    stream torch calls current, on the default stream and inside ``torch.cuda.stream(side)``."""
    from eplb_triton.worker import hooks

    device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device=device)
    first = hooks.current_stream(device)
    assert first == torch.cuda.current_stream(device) and hooks.current_stream(device) is first  # cached
    with torch.cuda.stream(side):
        assert hooks.current_stream(device) == side and hooks.current_stream(device).cuda_stream == side.cuda_stream
    assert hooks.current_stream(device) is first


def _rank_nccl_verify(rank, world, corrupt):
    torch.cuda.set_device(rank)
    old, new = all_to_all_maps(world, 3)
    weights = make_rank_weights(GPU_SPECS, 3, world, "cuda")
    fill_rank_weights(weights, old, rank, seed=4)
    expected = make_rank_weights(GPU_SPECS, 3, world, "cuda")
    fill_rank_weights(expected, old, rank, seed=4)
    rearrange_expert_weights_inplace(old, new, expected, verify=True)
    fired = []

    def corrupt_first_delivery(where, **info):
        # Layer 1 runs in two staging passes at world 2 and rank 1 receives in only one of them
        # (seen on two H200: round 0 received nothing): corrupt the first pass that receives.
        if where == "in_flight" and info["rank"] == 1 and info["layer"] == 1 and info["received"] and not fired:
            peer, data = sorted(info["received"].items())[-1]
            data[7] ^= 0x40
            fired.append((info["pass_index"], peer))

    transfer.fault_hook = corrupt_first_delivery if corrupt else None
    applied, error = [], None
    with TransferWorker(weights, verify=True, timeout_s=20.0) as worker:
        worker.submit(old, new)
        try:
            while worker.busy:
                torch.cuda._sleep(1_000_000)  # "serving" on the main stream
                applied += worker.step()
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            error = (type(exc).__name__, getattr(exc, "layer", None), str(exc))
        stats = None if error else worker.wait()
    torch.cuda.synchronize()
    return dict(
        error=error,
        applied=applied,
        bad=row_mismatches(weights, old, expected_after(old, new, applied), rank, seed=4),
        equal_to_sync=same_bytes(as_bytes(weights), as_bytes(expected)),
        verified=None if stats is None else stats.verified_experts,
        fired=fired,
    )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("corrupt", [pytest.param(False, id="clean"), pytest.param(True, id="corrupted")])
def test_nccl_two_gpus_verify(corrupt):
    results = run_ranks(2, _rank_nccl_verify, corrupt, backend="nccl", timeout_s=180.0)
    for rank, res in enumerate(results):
        assert res["bad"] == [], (rank, res["bad"][:8])
        if corrupt:
            assert results[1]["fired"], "the corruption hook never found a delivery to rank 1 in layer 1"
            assert res["error"] is not None and res["error"][0] == "ChecksumMismatchError", res["error"]
            assert res["error"][1] == 1 and all(l < 1 for l in res["applied"]), res
        else:
            assert res["error"] is None and res["applied"] == [0, 1, 2], res
            assert res["equal_to_sync"] and res["verified"] > 0


def _rank_stacked_worker(rank, world, transport):
    torch.cuda.set_device(rank)
    old, new = random_maps(np.random.default_rng(21), 8, world, 6, 9, empty_frac=0.1)  # replicas, -1 slots
    weights = make_rank_weights(GPU_SPECS, 8, 6, "cuda")
    fill_rank_weights(weights, old, rank, seed=6)
    expected = make_rank_weights(GPU_SPECS, 8, 6, "cuda")
    fill_rank_weights(expected, old, rank, seed=6)
    rearrange_expert_weights_inplace(old, new, expected)
    budget = 24 * packed_expert_bytes(GPU_SPECS)  # every layer in one pass, two per stack at least
    applied = []
    with TransferWorker(weights, layers_ahead=8, max_buffer_bytes=budget, transport=transport, timeout_s=60.0) as worker:
        worker.submit(old, new)
        while worker.busy:
            torch.cuda._sleep(200_000)  # "serving" on the main stream
            applied += worker.step()
        stats = worker.wait()
    torch.cuda.synchronize()
    return dict(
        bad=row_mismatches(weights, old, new, rank, seed=6),
        equal_to_sync=same_bytes(as_bytes(weights), as_bytes(expected)),
        applied=applied,
        stacked=stats.stacked_layers,
    )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("transport", ["nccl", "p2p"])
def test_two_gpus_stacked_worker_equals_blocking_and_expected(transport):
    """layers_ahead=8: consecutive layers share one exchange (stacks); mixed dtypes, odd row
    bytes, replicas and empty slots; every layer swapped once, in order, bit for bit."""
    results = run_ranks(2, _rank_stacked_worker, transport, backend="nccl", timeout_s=180.0)
    for rank, res in enumerate(results):
        assert res["bad"] == [], (rank, res["bad"][:8])
        assert res["equal_to_sync"] and res["applied"] == list(range(8)), (rank, res["applied"])
        assert res["stacked"] > 0, rank


# -- reserve=True: the staging is allocated at construction and every submit uses it ----------
def _rank_reserved(rank, world, old, new, budget, verify, layers_ahead=2):
    weights = rank_weights(rank, world, old, 4)
    with TransferWorker(weights, max_buffer_bytes=budget, verify=verify, reserve=True, layers_ahead=layers_ahead) as worker:
        reserved = worker._reserved  # the worker's own reservation (private: checked here only)
        reserved.fill_(0xA5)
        first, state, rng = [], old, np.random.default_rng(5)  # the same maps on every rank
        for number in range(3):  # then permutations of what the rows hold
            target = new if number == 0 else np.stack([layer[rng.permutation(layer.size)] for layer in state])
            worker.submit(state, target)
            stats = worker.wait()
            first += row_mismatches(weights, state, target, rank, 4)
            state = expected_after(state, target, range(old.shape[0]))
        used = int((reserved != 0xA5).sum())
        fits = stats.peak_staging_bytes <= reserved.numel()
    return first, used, fits


@pytest.mark.parametrize(
    "budget,verify,layers_ahead",
    [
        pytest.param(None, False, 2, id="default-budget"),
        pytest.param(3 * PACKED, False, 2, id="budget3"),
        pytest.param(3 * (PACKED + 16), True, 2, id="budget3-verify"),
        pytest.param(None, False, 3, id="default-budget-3-ahead"),
        pytest.param(None, False, 8, id="default-budget-8-ahead-stacked"),
        pytest.param(3 * PACKED, False, 8, id="budget3-8-ahead-stacked"),
    ],
)
def test_reserve_allocates_up_front_and_every_submit_uses_it(distributed, budget, verify, layers_ahead):
    old, new = random_maps(np.random.default_rng(77), 4, 2, 6, 8)
    for rank, (bad, used, fits) in enumerate(distributed(2, _rank_reserved, old, new, budget, verify, layers_ahead)):
        assert bad == [], f"rank {rank}: wrong rows {bad[:8]}"
        assert fits and used > 0, (rank, fits, used)


@pytest.mark.gpu
def test_gpu_reserve_first_rebalance_allocates_no_staging():
    # One GPU, no process group: 4 layers of 16 rows, every row rewritten (a rotation).
    old, new = rotated_maps(4, 1, 16)
    specs = [TensorSpec((256, 256), torch.bfloat16), TensorSpec((8,), torch.float32)]

    def first_rebalance(reserve: bool) -> tuple[int, int, list]:
        weights = make_rank_weights(specs, 4, 16, "cuda")
        fill_rank_weights(weights, old, 0, seed=6)
        with TransferWorker(weights, reserve=reserve) as worker:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            worker.submit(old, new)
            stats = worker.wait()
            torch.cuda.synchronize()
            delta = torch.cuda.max_memory_allocated() - base
        return delta, stats.peak_staging_bytes, row_mismatches(weights, old, new, 0, seed=6)

    delta, staging, bad = first_rebalance(reserve=True)
    assert bad == [] and staging > 1 << 20  # two staging buffers of 16 rows of 128 KiB, plus sends
    # only row lists and kernel descriptors (kilobytes) may be allocated along the way
    assert delta < 64 << 10, f"the first rebalance after reserve=True allocated {delta} bytes at peak"
    delta, staging, bad = first_rebalance(reserve=False)
    assert bad == [] and delta >= staging  # without it the measurement sees the staging


# -- stream/event ordering of the worker, on CPU through a fake CUDA stream API ----------------
class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.name))


class _FakeEvent:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def record(self, stream):
        self.log.append(("record", stream.name, self.name))

    def query(self):
        self.log.append(("query", "host", self.name))
        return True


class _FakeCuda:
    """Stands in for ``eplb_triton.worker.hooks._cuda``: events and the serving ("main") stream."""

    def __init__(self, log):
        self.log, self.count = log, 0
        self.main = _FakeStream("main", log)

    def Event(self):  # noqa: N802 - torch.cuda.Event's name
        self.count += 1
        return _FakeEvent(f"event{self.count}", self.log)

    def current_stream(self, device=None):
        return self.main


def test_worker_orders_its_stream_after_submit_and_each_swap(monkeypatch):
    """The GPU ordering, checked on CPU: the worker stream waits for the event submit()
    recorded on the serving stream before its first read of the weights; it waits for the
    event of layer l-2's swap before staging layer l into that buffer; it records and polls an
    event on its stream after staging a layer, before publishing it; and every step records
    an event on the serving stream after its unpacks."""
    from eplb_triton.worker import hooks as worker_module
    from eplb_triton.layout import ExpertLayout

    log = []
    layers = 5
    old, new = rotated_maps(layers, 1, 4)  # every row moves: every layer packs and swaps
    weights = rank_weights(0, 1, old)
    layer_of = {w[0].data_ptr(): l for l, w in enumerate(weights)}
    side = lambda: "worker" if threading.current_thread().name.startswith("eplb-transfer") else "main"  # noqa: E731
    # the torch backend ends every data op (pack, unpack, move, copy_rows) in a reference op
    for name, op in (("pack_reference", "pack"), ("unpack_reference", "unpack"), ("copy_rows_reference", "copy")):
        original = getattr(ExpertLayout, name)

        def logged(self, *args, _op=op, _original=original, **kwargs):
            log.append((_op, side(), layer_of.get(self.tensors[0].data_ptr())))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ExpertLayout, name, logged)
    monkeypatch.setattr(worker_module, "_cuda", _FakeCuda(log))
    monkeypatch.setattr(transfer, "fault_hook", lambda where, **info: log.append((where, "worker", info["layer"])) if where == "before_publish" else None)
    with TransferWorker(weights, backend="torch") as worker:
        worker._stream = _FakeStream("worker", log)  # as if on a GPU: the worker has its own stream
        worker.submit(old, new)
        worker.wait()
    assert row_mismatches(weights, old, new, 0) == []

    first_record = log.index(next(e for e in log if e[0] == "record"))
    assert log[first_record][1] == "main", log[:5]  # submit() records the start event on the serving stream
    start = log[first_record][2]
    worker_ops = [e for e in log if e[1] == "worker"]
    assert worker_ops[0] == ("wait", "worker", start), worker_ops[:3]  # before any read of the weights
    # each step's swaps: unpacks on the serving stream, then one event recorded there
    swap_event = {}
    for i, entry in enumerate(log):
        if entry[0] == "unpack" and entry[1] == "main":
            # the worker thread interleaves; the step's later unpacks may come first
            following = next(e for e in log[i + 1 :] if e[1] == "main" and e[0] != "unpack")
            assert following[0] == "record", log[i:]
            swap_event[entry[2]] = following[2]
    assert sorted(swap_event) == list(range(layers))
    for layer in range(layers):
        packs = [i for i, e in enumerate(log) if e == ("pack", "worker", layer)]
        if layer >= 2:  # the staging buffer held layer - 2: its swap's event must be waited for first
            assert ("wait", "worker", swap_event[layer - 2]) in log[: packs[0]], layer
        publish = log.index(("before_publish", "worker", layer))
        # publishing waited (polled) for an event recorded on the worker stream after the layer's last pack
        queried = [e[2] for e in log[:publish] if e[:2] == ("query", "host")]
        assert queried, (layer, log[: publish + 1])
        recorded = log.index(("record", "worker", queried[-1]))
        assert packs[-1] < recorded < publish, (layer, log[packs[0] : publish + 1])


def _wait_until(predicate, timeout_s: float = 20.0) -> bool:
    """Poll ``predicate`` every 2 ms until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False


class _HeldEvent(_FakeEvent):
    """A fake event that reports its work finished only once the test lets the "GPU" run."""

    def __init__(self, name, log, gpu_runs):
        super().__init__(name, log)
        self.gpu_runs = gpu_runs

    def query(self):
        super().query()
        return self.gpu_runs.is_set()


@pytest.mark.parametrize("layers_ahead", [2, 4])
def test_worker_queues_layers_ahead_of_publication_up_to_its_buffers(monkeypatch, layers_ahead):
    """On a GPU the worker thread queues a layer's transfer before earlier layers have finished:
    while the "GPU" runs nothing, it queues exactly ``layers_ahead`` layers (one per staging
    buffer; none is swapped, so the next must wait) and publishes none; once the GPU runs,
    every layer is published, swapped and right. (Session 8: it used to wait for layer i
    before queueing layer i + 2, whatever its buffers.)"""
    from eplb_triton.worker import hooks as worker_module

    log, gpu_runs = [], threading.Event()
    fake = _FakeCuda(log)
    fake.Event = lambda: _HeldEvent(f"event{len(log)}", log, gpu_runs)
    monkeypatch.setattr(worker_module, "_cuda", fake)
    layers = layers_ahead + 3
    old, new = rotated_maps(layers, 1, 4)  # every layer stages rows: each takes a staging buffer
    weights = rank_weights(0, 1, old)
    queued = lambda: sum(1 for e in list(log) if e[:2] == ("record", "worker"))  # noqa: E731
    with TransferWorker(weights, backend="torch", layers_ahead=layers_ahead) as worker:
        worker._stream = _FakeStream("worker", log)  # as if on a GPU: the worker has its own stream
        worker.submit(old, new)
        assert _wait_until(lambda: queued() >= layers_ahead, 10.0), log
        time.sleep(0.2)  # room to queue (wrongly) more
        assert queued() == layers_ahead and worker.progress.layers_moved == 0
        assert worker.step() == []
        gpu_runs.set()
        worker.wait()
    assert queued() == layers
    assert row_mismatches(weights, old, new, 0) == []


@pytest.mark.interpreter
def test_worker_gpu_swap_path_runs_on_cpu_through_the_fake_stream(monkeypatch):
    """The swap path a GPU takes, run on CPU with the Triton interpreter: submit() compiles
    (compile only) every launch the job makes, on the serving thread, before the worker thread
    launches anything (a kernel first loaded on the worker thread can deadlock beside a peer's
    kernels: see StagingMixin._load_kernels); the worker thread copies the swap's rows to the
    "device"; step() launches the unpack unchecked on those rows, which the first swap ties to
    the serving stream (record_stream: it covers the job's whole row block, so later swaps on the
    same stream need none); the rows written are exactly the changed ones and hold the new experts."""
    from eplb_triton.worker import hooks as worker_module
    from eplb_triton.layout import ExpertLayout
    from row_writes import changed_rows, record_row_writes

    log = []

    class DeviceRows(torch.Tensor):  # what index_lists returns on a GPU, with record_stream logged
        def record_stream(self, stream):
            log.append(("record_stream", stream.name, tuple(self.tolist())))

    from eplb_triton.worker import staging as worker_staging

    original_index_lists = worker_staging.index_lists

    def index_lists(lists, device):
        flat, views = original_index_lists(lists, device)
        return flat, tuple(v.as_subclass(DeviceRows) for v in views)

    monkeypatch.setattr(worker_staging, "index_lists", index_lists)
    original_launch = ExpertLayout.launch

    def launch(self, mode, buf, src_rows=None, dst_rows=None, tuning=None, compile_only=False):
        side = "worker" if threading.current_thread().name.startswith("eplb-transfer") else "main"
        rows = src_rows if src_rows is not None else dst_rows
        what = (mode, rows.numel(), buf.data_ptr(), buf.numel())  # what selects the compiled variant
        log.append(("compile" if compile_only else "launch", side, mode, type(dst_rows).__name__, what))
        return original_launch(self, mode, buf, src_rows, dst_rows, tuning, compile_only)

    monkeypatch.setattr(ExpertLayout, "launch", launch)
    fake_cuda = _FakeCuda(log)
    monkeypatch.setattr(worker_module, "_cuda", fake_cuda)
    monkeypatch.setattr(transfer, "fault_hook", lambda where, **info: log.append((where, "worker", info["layer"])) if where == "before_publish" else None)
    layers = 3
    old, new = random_maps(np.random.default_rng(21), layers, 1, 6, 5, empty_frac=0.0)
    weights = rank_weights(0, 1, old)
    switched_at = None
    with record_row_writes() as writes:
        with TransferWorker(weights, backend="triton") as worker:
            worker._stream = _FakeStream("worker", log)
            worker.submit(old, new)
            while worker.busy:
                if worker.step() and switched_at is None:  # later swaps run on another serving stream
                    fake_cuda.main, switched_at = _FakeStream("side", log), len(log)
    assert row_mismatches(weights, old, new, 0) == []
    assert writes.per_layer(weights) == changed_rows(old, new, 0, 6)
    swaps = [e for e in log if e[:3] == ("launch", "main", "unpack")]
    assert len(swaps) == sum(1 for rows in changed_rows(old, new, 0, 6) if rows)
    assert all(e[3] == "DeviceRows" for e in swaps), swaps  # the unchecked launch on the worker-made rows
    compiles = [i for i, e in enumerate(log) if e[0] == "compile"]
    launches = [i for i, e in enumerate(log) if e[0] == "launch"]
    assert compiles and all(log[i][1] == "main" for i in compiles), log  # on the serving thread only
    first_worker_launch = min(i for i in launches if log[i][1] == "worker")
    assert max(compiles) < first_worker_launch, log  # all of them before the worker launches anything
    compiled = {log[i][4] for i in compiles}
    assert all(log[i][4] in compiled for i in launches), [log[i] for i in launches if log[i][4] not in compiled]
    first_swap = next(i for i, e in enumerate(log) if e[:3] == ("launch", "main", "unpack"))
    following = next(e for e in log[first_swap + 1 :] if e[1] == "main")
    assert following[0] == "record_stream", log[first_swap:]  # the job's rows tied to the serving stream
    assert any(e[:3] == ("launch", "main", "unpack") for e in log[switched_at:]), log  # a swap on "side"
    assert [e[1] for e in log if e[0] == "record_stream"] == ["main", "side"], log  # once per job and stream


class _NoStreamRows(torch.Tensor):
    def record_stream(self, stream):
        pass


def _rank_kernels_loaded_at_submit(rank, world, old, new, verify, ahead=2, budget=3 * PACKED):
    from eplb_triton.layout import ExpertLayout
    from eplb_triton.worker import hooks as worker_module

    log = []
    original_launch = ExpertLayout.launch

    def launch(self, mode, buf, src_rows=None, dst_rows=None, tuning=None, compile_only=False):
        side = "worker" if threading.current_thread().name.startswith("eplb-transfer") else "main"
        rows = src_rows if src_rows is not None else dst_rows
        log.append((compile_only, side, (mode, rows.numel(), buf.data_ptr(), buf.numel())))
        return original_launch(self, mode, buf, src_rows, dst_rows, tuning, compile_only)

    ExpertLayout.launch = launch  # a forked rank: nothing to restore
    worker_module._cuda = _FakeCuda([])
    from eplb_triton.worker import staging as worker_staging

    index_lists = worker_staging.index_lists
    worker_staging.index_lists = lambda lists, device: (  # the swap's record_stream on the fake stream: a no-op
        lambda flat, views: (flat, tuple(v.as_subclass(_NoStreamRows) for v in views)))(*index_lists(lists, device))
    weights = rank_weights(rank, world, old)
    with TransferWorker(weights, backend="triton", verify=verify, max_buffer_bytes=budget, layers_ahead=ahead) as worker:
        worker._stream = _FakeStream("worker", [])  # as if on a GPU: the worker has its own stream
        worker.submit(old, new)
        stacked = worker.wait().stacked_layers
    compiled = [i for i, e in enumerate(log) if e[0]]
    launched = [i for i, e in enumerate(log) if not e[0]]
    return {
        "mismatches": row_mismatches(weights, old, new, rank),
        "compiled_on": {log[i][1] for i in compiled},
        "compiled_before_worker": max(compiled) < min(i for i in launched if log[i][1] == "worker"),
        "not_compiled": [log[i] for i in launched if log[i][2] not in {log[j][2] for j in compiled}],
        "worker_packs": sum(1 for i in launched if log[i][1] == "worker" and log[i][2][0] == "pack"),
        "stacked": stacked,
    }


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "verify,ahead,budget",
    [
        pytest.param(False, 2, 3 * PACKED, id="plain"),
        pytest.param(True, 2, 3 * PACKED, id="verify"),
        pytest.param(False, 8, 24 * PACKED, id="stacked"),  # stacks: the layered kernel variants
    ],
)
def test_submit_loads_every_kernel_variant_the_job_launches(distributed, verify, ahead, budget):
    """At world 2, with sends, receives, local moves, replicas and several passes (or stacks):
    submit() compiles every launch the job makes (same mode, row count and buffer), on the
    serving thread, before the worker thread launches anything; nothing is compiled later."""
    old, new = random_maps(np.random.default_rng(4), 3, 2, 6, 9, empty_frac=0.1)
    for rank, out in enumerate(distributed(2, _rank_kernels_loaded_at_submit, old, new, verify, ahead, budget)):
        assert out["mismatches"] == [], (rank, out["mismatches"])
        assert (out["stacked"] > 0) == (ahead > 2), (rank, out["stacked"])
        assert out["worker_packs"] > 0, rank  # the worker packed sends: covered below
        assert out["compiled_on"] == {"main"} and out["compiled_before_worker"], (rank, out)
        assert out["not_compiled"] == [], (rank, out["not_compiled"])


def _rank_warm_up_exchange(rank, world, old, new):
    from eplb_triton.comm import Communicator

    calls = []
    exchange = Communicator.exchange

    def logged(self, sends, recvs, *, where="exchange"):
        calls.append((threading.current_thread().name, where, sorted(sends), sorted(recvs)))
        return exchange(self, sends, recvs, where=where)

    Communicator.exchange = logged  # a forked rank: nothing to restore
    weights = rank_weights(rank, world, old)
    with TransferWorker(weights, timeout_s=30.0) as worker:
        built = list(calls)
        worker.submit(old, new)
        worker.wait()
    return built, calls[len(built):], row_mismatches(weights, old, new, rank)


def test_construction_exchanges_with_every_peer_on_the_serving_thread(distributed):
    """Constructing a worker runs one tiny exchange with every peer over its transfer group,
    on the serving thread: NCCL connects each pair and CUDA loads the send/receive kernel
    there, not in the worker thread's first layer (see StagingMixin._load_kernels)."""
    world = 3
    old, new = all_to_all_maps(world, 2)
    for rank, (built, later, mismatches) in enumerate(distributed(world, _rank_warm_up_exchange, old, new)):
        peers = [p for p in range(world) if p != rank]
        assert built == [("MainThread", "TransferWorker construction (warm-up exchange)", peers, peers)], (rank, built)
        assert later and all(name.startswith("eplb-transfer") for name, *_ in later), (rank, later)
        assert mismatches == [], rank


def test_step_agreement_backend_error_without_timeout_is_a_peer_error(monkeypatch):
    """Without timeout_s the step agreement is a plain all-reduce; a backend error there (a
    peer's closed connection) surfaces as PeerFailedError naming the next layer, not raw."""
    from eplb_triton.comm import Communicator, PeerFailedError

    def closed(*args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")

    old, new = random_maps(np.random.default_rng(3), 3, 1, 4, 4, empty_frac=0.0)
    weights = rank_weights(0, 1, old)
    worker = TransferWorker(weights)
    worker.submit(old, new)
    worker._control = Communicator(group=object(), rank=0, world_size=2, dist_backend="gloo")  # as if EP were 2
    monkeypatch.setattr(torch.distributed, "all_reduce", closed)
    with pytest.raises(PeerFailedError, match="step agreement: rank 0: .*Connection closed by peer") as info:
        worker.step()
    assert info.value.layer == 0
    assert worker.closed and row_mismatches(weights, old, old, 0) == []  # nothing swapped


class _SilentBoard:
    """A step board whose peer never posts: each wait runs out at the limit it is given."""

    def __init__(self):
        self.limits = []

    def agree(self, ready, failed, lift, *, timeout_s=None):
        from eplb_triton.comm import PeerTimeoutError

        self.limits.append(timeout_s)
        raise PeerTimeoutError(f"step board: rank 0 waited {timeout_s:g} s for rank(s) [1] to post step 1", peer=1)

    def close(self):
        pass


def test_step_board_without_timeout_waits_at_most_the_groups_default(monkeypatch):
    """Without timeout_s the board waits as long as the gloo all-reduce it replaces would have
    (torch's default group timeout), then raises PeerTimeoutError naming the peer and the next
    layer, and swaps nothing."""
    import datetime

    import torch.distributed as dist
    from eplb_triton.comm import Communicator, PeerTimeoutError

    old, new = random_maps(np.random.default_rng(3), 3, 1, 4, 4, empty_frac=0.0)
    weights = rank_weights(0, 1, old)
    worker = TransferWorker(weights)
    worker.submit(old, new)
    worker._control = Communicator(group=object(), rank=0, world_size=2, dist_backend="gloo")  # as if EP were 2
    worker._board = board = _SilentBoard()
    monkeypatch.setattr(dist, "default_pg_timeout", datetime.timedelta(seconds=7))
    with pytest.raises(PeerTimeoutError, match="step agreement: rank 0: .*rank\\(s\\) \\[1\\]") as info:
        worker.step()
    assert board.limits == [7.0] and (info.value.layer, info.value.peer) == (0, 1), (board.limits, info.value)
    assert worker.closed and row_mismatches(weights, old, old, 0) == []  # nothing swapped


def _rank_full_swap(rank, world, old, new, ahead, pass_layers):
    if pass_layers is not None:
        os.environ["EPLB_TRITON_WORKER_PASS_LAYERS"] = str(pass_layers)  # a spawned rank: nothing to restore
    weights = rank_weights(rank, world, old)
    with TransferWorker(weights, layers_ahead=ahead) as worker:
        worker.submit(old, new)
        stats = worker.wait()
    return row_mismatches(weights, old, new, rank), stats.rounds, stats.peak_staging_bytes


@pytest.mark.parametrize(
    "ahead,pass_layers,passes",
    [
        pytest.param(2, None, "one", id="ahead2"),
        pytest.param(4, None, "one", id="ahead4-stacks"),
        pytest.param(2, 1, "several", id="ahead2-one-layer-per-pass"),
        pytest.param(4, 1, "several", id="ahead4-stacks-one-layer-per-pass"),
    ],
)
def test_worker_moves_a_layer_that_sends_and_receives_every_row_in_one_pass(distributed, ahead, pass_layers, passes):
    """Every row of both ranks goes to the other rank: sends + receives are two layers' rows. By
    default a worker's pass may hold two layers' rows (the receives wait in the staging buffers),
    so each layer is one pass; with one layer per pass (EPLB_TRITON_WORKER_PASS_LAYERS=1, the
    blocking API's default) it takes several."""
    layers, num_local = 3, 6
    old = np.tile(np.arange(2 * num_local), (layers, 1))
    new = np.concatenate([old[:, num_local:], old[:, :num_local]], axis=1)
    for rank, (bad, rounds, peak) in enumerate(distributed(2, _rank_full_swap, old, new, ahead, pass_layers)):
        assert bad == [], (rank, bad[:8])
        assert (rounds == layers) == (passes == "one") and rounds >= layers, (rank, rounds)

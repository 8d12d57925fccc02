"""Pacing of the TransferWorker (eplb_triton/pacing.py) and its progress report.

The gate alone first (schedule, knob checks, gate bytes, progress arithmetic), then paced
workers on 2 and 3 gloo ranks: which layers each step() swaps (the same on every rank, as
the pace allows), bytes exact against a plain torch reference on random data, wait() and
close() while gated, verify, a slow step cadence with a short timeout_s, injected faults,
and knobs refused on every rank.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np
import pytest
import torch

from eplb_triton import TransferWorker
from eplb_triton.pacing import PaceGate, Pacing, TransferProgress, check_pacing, layer_gate_bytes
from eplb_triton.plan import plan_rearrangement
from fault_cases import all_to_all_maps, injected_naming_the_layer, raise_at
from test_worker import PACKED, SPECS, _FakeCuda, _FakeStream, _wait_until, assert_consistent, run_faults

POISON = 0xA5  # staging is filled with this before a submit: a row unpacked from unwritten staging shows


# -- the gate alone --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "knobs,layer_bytes,start",
    [
        pytest.param({}, [5, 5, 5], [0, 0, 0], id="unpaced"),
        pytest.param(dict(layers_per_step=1), [5, 5, 5, 5], [0, 1, 2, 3], id="L1"),
        pytest.param(dict(layers_per_step=2), [5, 5, 5, 5, 5], [0, 0, 1, 1, 2], id="L2"),
        pytest.param(dict(layers_per_step=2), [5, 0, 5, 0, 5], [0, 0, 0, 0, 1], id="L2-free-layers"),
        pytest.param(dict(bytes_per_step=10), [3, 7, 1, 12, 4, 6, 1], [0, 0, 1, 2, 3, 3, 4], id="B10-mixed-oversize"),
        pytest.param(dict(layers_per_step=2, bytes_per_step=10), [1, 1, 1, 10, 2], [0, 0, 1, 2, 3], id="L2-B10"),
        pytest.param(dict(steps_per_layer=3), [5, 0, 5, 5], [0, 0, 3, 6], id="S3-free-layer"),
        pytest.param(dict(layers_per_step=1), [0, 0], [0, 0], id="nothing-moves"),
    ],
)
def test_schedule(knobs, layer_bytes, start):
    assert check_pacing(**knobs).schedule(layer_bytes) == start


@pytest.mark.parametrize("name", ["layers_per_step", "bytes_per_step", "steps_per_layer"])
@pytest.mark.parametrize(
    "value,error",
    [
        pytest.param(0, ValueError, id="zero"),
        pytest.param(-2, ValueError, id="negative"),
        pytest.param(1.0, TypeError, id="float"),
        pytest.param(True, TypeError, id="bool"),
        pytest.param("2", TypeError, id="str"),
    ],
)
def test_bad_knob_is_refused_naming_it(name, value, error):
    with pytest.raises(error, match=name):
        check_pacing(**{name: value})


def test_steps_per_layer_does_not_combine_with_a_per_step_budget():
    with pytest.raises(ValueError, match="steps_per_layer"):
        check_pacing(layers_per_step=2, steps_per_layer=2)
    with pytest.raises(ValueError, match="steps_per_layer"):
        check_pacing(bytes_per_step=100, steps_per_layer=2)
    assert check_pacing(layers_per_step=np.int64(3)) == Pacing(layers_per_step=3)


def test_layer_gate_bytes_is_the_busiest_rank_of_the_global_plan():
    # rank 0 sends 3 experts to rank 1 and 1 to rank 2; rank 2 writes 2 rows locally
    traffic = np.array([[0, 3, 1], [0, 0, 0], [0, 0, 2]])
    assert layer_gate_bytes(traffic, 16) == 16 * 4  # rank 0's sends (4) > rank 1's writes (3), rank 2's (3)
    assert layer_gate_bytes(np.array([[0, 1], [0, 5]]), 10) == 60  # rank 1 writes 1 received + 5 local rows
    assert layer_gate_bytes(np.zeros((2, 2), dtype=np.int64), 10) == 0


def test_gate_opens_with_steps_and_lifts():
    gate = PaceGate([0, 0, 1, 3])
    assert [gate.allows(i) for i in range(4)] == [True, True, False, False]
    gate.on_step()
    assert [gate.allows(i) for i in range(4)] == [True, True, True, False]
    gate.on_step()
    assert not gate.allows(3)
    gate.lift()
    assert gate.allows(3)
    assert PaceGate(None).lifted and PaceGate([0, 0]).lifted  # nothing to gate


def test_progress_estimate():
    assert TransferProgress.of(4, 0, 1, 10, 20, 0.5).eta_s is None  # no layer done yet
    p = TransferProgress.of(4, 1, 2, 10, 20, 0.5)
    assert p.eta_s == pytest.approx(1.5) and p.bytes_moved == 30 and not p.finished
    assert TransferProgress.of(4, 4, 4, 10, 20, 2.0).eta_s == 0.0
    assert "1/4 swapped" in str(p)


# -- a torch reference on random data --------------------------------------------------------------
def expert_tables(specs, layers: int, num_experts: int, seed: int) -> list[list[torch.Tensor]]:
    """``tables[layer][i][e]``: tensor ``i`` of expert ``e`` (random bytes; the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        layer = []
        for spec in specs:
            nbytes = int(np.prod(spec.shape)) * torch.empty(0, dtype=spec.dtype).element_size()
            raw = torch.randint(0, 256, (num_experts, nbytes), dtype=torch.uint8, generator=gen)
            layer.append(raw.view(spec.dtype).reshape(num_experts, *spec.shape))
        out.append(layer)
    return out


def slot_contents(tables, expert_map, rank: int, num_local: int, junk_seed: int) -> list[list[torch.Tensor]]:
    """This rank's rows holding ``expert_map``'s experts; empty (-1) slots hold random junk."""
    gen = torch.Generator().manual_seed(junk_seed)
    weights = []
    for layer, tensors in enumerate(tables):
        ids = expert_map[layer][rank * num_local : (rank + 1) * num_local]
        rows = []
        for table in tensors:
            junk = torch.randint(0, 256, (num_local, table[0].numel() * table.element_size()), dtype=torch.uint8, generator=gen)
            t = junk.view(table.dtype).reshape(num_local, *table.shape[1:]).clone()
            held = torch.as_tensor(ids >= 0)
            t[held] = table[torch.as_tensor(ids[ids >= 0])]
            rows.append(t)
        weights.append(rows)
    return weights


def reference_after(before, tables, new, rank: int, num_local: int) -> list[list[torch.Tensor]]:
    """What the rows hold once every layer is applied: the expert ``new`` names, or untouched (-1)."""
    out = []
    for layer, tensors in enumerate(before):
        ids = new[layer][rank * num_local : (rank + 1) * num_local]
        rows = []
        for t, table in zip(tensors, tables[layer]):
            t = t.clone()
            t[torch.as_tensor(ids >= 0)] = table[torch.as_tensor(ids[ids >= 0])]
            rows.append(t)
        out.append(rows)
    return out


def layer_equal(a, b) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def moving_maps(world: int, num_local: int, moved_per_layer: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Layer ``l``: each rank's first ``moved_per_layer[l]`` rows take the experts of the same rows
    of the next rank (mixed layer sizes: rank ``r`` sends and receives that many experts)."""
    old = np.tile(np.arange(world * num_local), (len(moved_per_layer), 1))
    new = old.copy()
    for layer, moved in enumerate(moved_per_layer):
        for r in range(world):
            for i in range(moved):
                new[layer, r * num_local + i] = old[layer, ((r + 1) % world) * num_local + i]
    return old, new


def expected_steps(start: list[int], total: int) -> list[list[int]]:
    """The layers each step() swaps when every step comes once the worker thread has staged all it
    may: layer ``i`` is staged once ``start[i]`` steps were made and its staging buffer is free
    (layer ``i - 2`` swapped: two buffers)."""
    swapped, steps, out = 0, 0, []
    while swapped < total:
        ready = min(sum(1 for s in start if s <= steps), swapped + 2, total)
        out.append(list(range(swapped, ready)))
        swapped, steps = ready, steps + 1
    return out


# -- paced workers -----------------------------------------------------------------------------------
def _rank_paced(rank, world, old, new, knobs, verify):
    num_local = old.shape[1] // world
    tables = expert_tables(SPECS, old.shape[0], old.shape[1], seed=5)
    weights = slot_contents(tables, old, rank, num_local, junk_seed=100 + rank)
    want = reference_after(weights, tables, new, rank, num_local)
    before = [[t.clone() for t in layer] for layer in weights]
    plan = plan_rearrangement(old, new, world)
    start = check_pacing(**knobs).schedule([layer_gate_bytes(l.traffic, PACKED) for l in plan.layers])
    returned, staged_before_step, progress_seen, intact = [], [], [], True
    with TransferWorker(weights, verify=verify, timeout_s=10.0, reserve=True, **knobs) as worker:
        worker._reserved.fill_(POISON)  # staging holds junk before the first layer lands in it
        worker.submit(old, new)
        assert worker.progress.eta_s is None and worker.progress.layers_total == old.shape[0]
        swapped, steps = 0, 0
        while worker.busy:
            # step once the thread staged everything the pace and the two staging buffers allow (and no more)
            may = min(sum(1 for s in start if s <= steps), swapped + 2, old.shape[0])
            assert _wait_until(lambda: worker.progress.layers_moved >= may), (rank, steps, worker.progress)
            time.sleep(0.01)  # a thread ignoring the gate would stage more here
            staged_before_step.append(worker.progress.layers_moved)
            done = worker.step()
            returned.append(done)
            swapped += len(done)
            steps += 1
            progress_seen.append(worker.progress.layers_done)
            for layer in range(swapped, old.shape[0]):  # layers not swapped yet are untouched
                intact &= layer_equal(weights[layer], before[layer])
        stats = worker.wait()
        final = worker.progress
    return dict(
        returned=returned,
        expected=expected_steps(start, old.shape[0]),
        staged=staged_before_step,
        progress_seen=progress_seen,
        intact=intact,
        exact=[layer_equal(w, e) for w, e in zip(weights, want)],
        final=final,
        sent=stats.total_bytes_sent,
        received=stats.total_bytes_received,
    )


@pytest.mark.parametrize(
    "world,moved,knobs,verify",
    [
        pytest.param(2, [1, 2, 1, 3, 1], dict(layers_per_step=1), False, id="W2-L1"),
        pytest.param(3, [1, 2, 1, 3, 1], dict(layers_per_step=1), False, id="W3-L1"),
        pytest.param(2, [1, 2, 1, 3, 1, 2], dict(layers_per_step=1), True, id="W2-L1-verify"),
        pytest.param(3, [1, 3, 1, 2, 4, 1], dict(bytes_per_step=3 * PACKED), False, id="W3-B3experts-mixed"),
        pytest.param(2, [1, 3, 1, 2, 4, 1], dict(bytes_per_step=3 * PACKED), True, id="W2-B3experts-mixed-verify"),
        pytest.param(2, [2, 0, 1, 2], dict(steps_per_layer=2), False, id="W2-S2-free-layer"),
    ],
)
def test_paced_worker_swaps_what_the_pace_allows_on_every_rank(distributed, world, moved, knobs, verify):
    old, new = moving_maps(world, 4, moved)
    results = distributed(world, _rank_paced, old, new, knobs, verify, timeout_s=90.0)
    first = results[0]
    # the schedule really paces these maps (more steps than layers would take unpaced)
    assert len(first["expected"]) > 2 and max(len(s) for s in first["expected"]) <= knobs.get("layers_per_step", 3)
    for rank, res in enumerate(results):
        assert res["returned"] == first["returned"], f"rank {rank} swapped {res['returned']}, rank 0 {first['returned']}"
        assert res["returned"] == res["expected"], (rank, res["returned"], res["expected"])
        # before each step the thread had staged exactly what the pace and the staging buffers allow
        cumulative = np.cumsum([len(s) for s in res["expected"]]).tolist()
        assert res["staged"] == cumulative, (rank, res["staged"])
        assert res["progress_seen"] == cumulative
        assert res["intact"], f"rank {rank}: a layer changed before its step"
        assert all(res["exact"]), f"rank {rank}: layers differ from the torch reference: {res['exact']}"
        final = res["final"]
        assert (final.layers_done, final.layers_moved, final.layers_total) == (len(moved),) * 3
        assert (final.bytes_sent, final.bytes_received) == (res["sent"], res["received"]) and final.bytes_sent > 0
        assert final.eta_s == 0.0 and final.elapsed_s > 0


def _rank_wait_lifts(rank, world, old, new):
    num_local = old.shape[1] // world
    tables = expert_tables(SPECS, old.shape[0], old.shape[1], seed=9)
    weights = slot_contents(tables, old, rank, num_local, junk_seed=rank)
    want = reference_after(weights, tables, new, rank, num_local)
    steps = 0
    with TransferWorker(weights, steps_per_layer=10_000, timeout_s=10.0) as worker:  # one layer per 10k steps
        worker.submit(old, new)
        worker.step()
        if rank == 0:  # rank 0 asks to lift the pace; the others keep serving and see it lifted too
            worker.wait()
        else:
            while worker.busy:
                worker.step()
                steps += 1
                time.sleep(0.005)
        busy = worker.busy
    return busy, steps, [layer_equal(w, e) for w, e in zip(weights, want)]


@pytest.mark.parametrize("world", [pytest.param(2, id="W2"), pytest.param(3, id="W3")])
def test_wait_lifts_the_pace_on_every_rank(distributed, world):
    old, new = moving_maps(world, 3, [1, 2, 3, 1])
    for rank, (busy, steps, exact) in enumerate(distributed(world, _rank_wait_lifts, old, new)):
        assert not busy and all(exact), (rank, exact)
        assert rank == 0 or steps < 1000, steps  # not 3 x 10k steps: the pace was lifted


def _rank_close_gated(rank, world, old, new):
    weights = slot_contents(expert_tables(SPECS, old.shape[0], old.shape[1], 4), old, rank, old.shape[1] // world, rank)
    before = [[t.clone() for t in layer] for layer in weights]
    worker = TransferWorker(weights, layers_per_step=1, timeout_s=10.0)
    worker.submit(old, new)
    staged = _wait_until(lambda: worker.progress.layers_moved == 1)  # layer 0 staged, layer 1 gated
    time.sleep(0.05)
    gated = worker.progress.layers_moved == 1
    begin = time.monotonic()
    worker.close(timeout_s=5.0)
    elapsed = time.monotonic() - begin
    untouched = all(layer_equal(w, b) for w, b in zip(weights, before))
    return staged and gated, elapsed, worker._thread.is_alive(), untouched, worker.progress.layers_done


def test_close_while_gated_stops_promptly(distributed):
    old, new = moving_maps(2, 3, [1, 2, 3, 1])
    for gated, elapsed, alive, untouched, done in distributed(2, _rank_close_gated, old, new):
        assert gated and not alive and untouched and done == 0
        assert elapsed < 3.0, elapsed  # the drain of the remaining layers, not a timeout


def _rank_slow_cadence(rank, world, old, new, interval_s, timeout_s):
    weights = slot_contents(expert_tables(SPECS, old.shape[0], old.shape[1], 2), old, rank, old.shape[1] // world, rank)
    want = reference_after(weights, expert_tables(SPECS, old.shape[0], old.shape[1], 2), new, rank, old.shape[1] // world)
    returned = []
    with TransferWorker(weights, layers_per_step=1, timeout_s=timeout_s) as worker:
        worker.submit(old, new)
        while worker.busy:
            time.sleep(interval_s)  # every rank steps late, together: gated, nobody is stalled
            returned.append(worker.step())
    return returned, [layer_equal(w, e) for w, e in zip(weights, want)]


def test_steps_slower_than_timeout_s_are_not_a_stalled_peer(distributed):
    old, new = moving_maps(2, 3, [1, 2, 1])
    results = distributed(2, _rank_slow_cadence, old, new, 1.3, 1.0)
    for returned, exact in results:
        assert returned == results[0][0] and all(exact)
        assert max(len(r) for r in returned) == 1


def test_injected_failure_with_pacing_leaves_every_layer_old_or_new():
    world = 3
    old, new = all_to_all_maps(world, 4)
    results = run_faults(
        world, old, new, partial(raise_at, "before_send", 2, 0, 1, error=injected_naming_the_layer), timeout_s=10.0, layers_per_step=1,
        max_buffer_bytes=3 * PACKED,
    )
    applied = assert_consistent(results, list(range(world)))
    assert applied == [] or applied[-1] < 2, applied
    for rank, res in enumerate(results):
        error = res["error"]
        assert error is not None and "injected at before_send, layer 2" in error["text"], (rank, error)
        assert error["type"] == ("Injected" if rank == 1 else "TransferError"), (rank, error)


def _rank_bad_knobs(rank, world, old, cases):
    weights = slot_contents(expert_tables(SPECS, old.shape[0], old.shape[1], 1), old, rank, old.shape[1] // world, rank)
    out = []
    for knobs in cases:
        if callable(knobs):
            knobs = knobs(rank)
        try:
            TransferWorker(weights, timeout_s=10.0, **knobs).close()
            out.append(None)
        except (TypeError, ValueError) as exc:
            out.append((type(exc).__name__, str(exc)))
    return out


def _differs_by_rank(rank):
    return {"layers_per_step": 1 + rank}


def test_bad_or_differing_knobs_are_refused_on_every_rank(distributed):
    old, _ = moving_maps(2, 2, [1])
    bad_on_rank_1 = lambda rank: {"bytes_per_step": 0 if rank == 1 else 100}  # noqa: E731
    cases = [
        {"layers_per_step": 0},
        {"bytes_per_step": -5},
        {"steps_per_layer": 2.0},
        {"layers_per_step": True},
        {"log_progress": 1},
        bad_on_rank_1,
        _differs_by_rank,
        {"layers_per_step": 2},  # fine: the worker still works after refusals
    ]
    results = distributed(2, _rank_bad_knobs, old, cases)
    for rank, res in enumerate(results):
        kinds = [r and r[0] for r in res]
        assert kinds == ["ValueError", "ValueError", "TypeError", "TypeError", "TypeError", "ValueError", "ValueError", None], (rank, res)
    assert "layers_per_step" in results[0][0][1] and "bytes_per_step" in results[0][1][1]
    assert "steps_per_layer" in results[1][2][1] and "log_progress" in results[1][4][1]
    assert "rank 1" in results[0][5][1] and "bytes_per_step" in results[0][5][1]  # rank 0 learns rank 1's verdict
    assert "options" in results[0][6][1] and "layers_per_step" in results[0][6][1]


def test_single_rank_pace_progress_and_log(caplog):
    old, new = moving_maps(1, 4, [2, 2, 2])  # one rank: every move local
    new = np.stack([np.roll(o, 1) for o in old])
    tables = expert_tables(SPECS, 3, 4, seed=3)
    weights = slot_contents(tables, old, 0, 4, junk_seed=0)
    want = reference_after(weights, tables, new, 0, 4)
    caplog.set_level(logging.INFO, logger="eplb_triton.worker")
    with TransferWorker(weights, layers_per_step=1, log_progress=True) as worker:
        assert worker.layers_per_step == 1 and worker.bytes_per_step is None and worker.progress == TransferProgress()
        worker.submit(old, new)
        returned = []
        while worker.busy:
            assert _wait_until(lambda: worker.progress.layers_moved > worker.progress.layers_done)
            returned.append(worker.step())
        stats = worker.wait()
    assert returned == [[0], [1], [2]]
    assert all(layer_equal(w, e) for w, e in zip(weights, want))
    assert worker.progress.layers_done == 3 and worker.progress.bytes_moved == stats.total_bytes_sent + stats.total_bytes_received
    lines = [r.getMessage() for r in caplog.records if "swapped (" in r.getMessage()]
    assert [line.split("layers ")[1].split(" swapped")[0] for line in lines] == ["1/3", "2/3", "3/3"], lines


def test_gpu_path_publishes_the_staged_layer_before_waiting_for_credit(monkeypatch):
    """On a GPU the worker queues layer i+1 before publishing layer i; paced, layer i+1 waits
    for a step(), so layer i must be published first or that step() would find nothing to
    swap. Checked on CPU through the fake CUDA stream of test_worker."""
    from eplb_triton.worker import hooks as worker_module

    monkeypatch.setattr(worker_module, "_cuda", _FakeCuda([]))
    old = np.tile(np.arange(4), (4, 1))
    new = np.stack([np.roll(o, 1 + l % 3) for l, o in enumerate(old)])
    tables = expert_tables(SPECS, 4, 4, seed=8)
    weights = slot_contents(tables, old, 0, 4, junk_seed=1)
    want = reference_after(weights, tables, new, 0, 4)
    returned = []
    with TransferWorker(weights, backend="torch", layers_per_step=1) as worker:
        worker._stream = _FakeStream("worker", [])  # as if on a GPU: the worker has its own stream
        worker.submit(old, new)
        while worker.busy:
            assert _wait_until(lambda: worker.progress.layers_moved > worker.progress.layers_done, 10.0), worker.progress
            returned.append(worker.step())
    assert returned == [[0], [1], [2], [3]]
    assert all(layer_equal(w, e) for w, e in zip(weights, want))

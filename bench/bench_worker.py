"""pytest-benchmark: what the serving thread pays for a background rearrangement, on CPU.

    pytest bench/bench_worker.py --benchmark-only

* ``step()`` when idle (no rearrangement): the cost on every forward pass outside EPLB;
* ``step()`` while a transfer is in flight but no layer is ready, one rank and two gloo ranks
  (the latter is the agreement every EP rank pays per call while busy: the shared-memory step
  board on one host, or one gloo ``all_reduce`` on the control group with
  ``EPLB_TRITON_STEP_BOARD=0``), also with ``timeout_s`` (the agreement then waits against a
  deadline and carries the ranks' entry times);
* ``step()`` that swaps one layer (small shapes, CPU: the unpack dominates);
* a whole one-rank rearrangement through the worker (also with ``verify``) vs the blocking call;
* a whole two-rank worker rearrangement (16 small layers, ``step()`` in a tight loop) with the
  shared-memory step board and with the gloo all-reduce.

GPU figures (swap GPU time vs a copy floor, host time of ``step()``) come from
``bench/gpu_worker.py``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb_triton import TransferWorker, rearrange_expert_weights_inplace
from eplb_triton.testing.launch import free_port
from eplb_triton.testing.shapes import LAYER_CONFIGS, scaled

from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_worker import swap_maps  # noqa: E402  (the same one-rank swap as the GPU table)

# The reference layers of eplb_triton.testing.shapes with every dimension divided by 8 (CPU-sized).
SMALL_CONFIGS = {
    f"{name}-div8": (c.num_local, c.moved, scaled(c.tensors, 8))
    for name, c in LAYER_CONFIGS.items()
    if name != "deepseek-v3-fp8"
}


def hold(worker: TransferWorker) -> None:
    """Keep the worker's first layer from finishing until close() (stop-aware)."""

    original = worker._transfer_layer

    def held(job, index, prepared):
        while not worker._stop:
            time.sleep(0.001)
        return original(job, index, prepared)  # sees the stop and unwinds the way close() expects

    worker._transfer_layer = held


def _wait_published(worker: TransferWorker, count: int) -> None:
    deadline = time.monotonic() + 30
    while worker._job is not None and worker._job.published < count and time.monotonic() < deadline:
        time.sleep(50e-6)


def test_step_not_busy(benchmark):
    weights = make_rank_weights([TensorSpec((8,), torch.float32)], 2, 4)
    with TransferWorker(weights) as worker:
        assert benchmark(worker.step) == []


def _in_flight_weights(rank: int, world: int):
    old = np.tile(np.arange(4 * world), (2, 1))
    new = np.roll(old, 1, axis=1)
    weights = make_rank_weights([TensorSpec((64,), torch.float32)], 2, 4)
    fill_rank_weights(weights, old, rank)
    return old, new, weights


def _peer_steps(rank: int, world: int, port: int, calls: int, timeout_s: float | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    old, new, weights = _in_flight_weights(rank, world)
    with TransferWorker(weights, timeout_s=timeout_s) as worker:
        hold(worker)
        worker.submit(old, new)
        for _ in range(calls):
            worker.step()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "world,timeout_s,board",
    [
        pytest.param(1, None, False, id="W1"),
        pytest.param(2, None, False, id="W2-gloo"),
        pytest.param(2, 30.0, False, id="W2-gloo-timeout"),
        pytest.param(2, None, True, id="W2-board"),
        pytest.param(2, 30.0, True, id="W2-board-timeout"),
    ],
)
def test_step_nothing_ready(benchmark, world, timeout_s, board, monkeypatch):
    rounds = 300
    peers = []
    # the step agreement: the shared-memory board (the default on one host) or the gloo all-reduce
    monkeypatch.setenv("EPLB_TRITON_STEP_BOARD", "1" if board else "0")  # before the peers fork
    if world > 1:
        port = free_port()
        # spawned, not forked: this process (rank 0) used process groups in earlier cases, and a
        # forked peer inherited their gloo state (its threads are not forked): peers crashed or hung
        ctx = mp.get_context("spawn")
        peers = [ctx.Process(target=_peer_steps, args=(r, world, port, rounds, timeout_s), daemon=True) for r in range(1, world)]
        for proc in peers:
            proc.start()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    try:
        old, new, weights = _in_flight_weights(0, world)
        with TransferWorker(weights, timeout_s=timeout_s) as worker:
            hold(worker)
            worker.submit(old, new)
            # every rank calls step() exactly `rounds` times: the calls pair up collectively
            result = benchmark.pedantic(worker.step, rounds=rounds, iterations=1, warmup_rounds=0)
            assert result == [] and worker.busy and (worker._board is not None) == (board and world > 1)
    finally:
        if world > 1:
            dist.destroy_process_group()
            for proc in peers:
                proc.join(timeout=30)


@pytest.mark.parametrize("config", list(SMALL_CONFIGS))
def test_step_swaps_one_layer(benchmark, config):
    local, moved, specs = SMALL_CONFIGS[config]
    a, b = swap_maps(local, moved)
    weights = make_rank_weights(specs, 1, local)
    fill_rank_weights(weights, a, 0)
    state = {"maps": (a, b)}
    with TransferWorker(weights) as worker:

        def setup():
            worker.wait()
            old, new = state["maps"]
            worker.submit(old, new)
            state["maps"] = (new, old)
            _wait_published(worker, 1)

        assert benchmark.pedantic(worker.step, setup=setup, rounds=30, iterations=1, warmup_rounds=2) == [0]
        new, _ = state["maps"]
    assert row_mismatches(weights, a, new, 0) == []


@pytest.mark.parametrize("method", ["worker", "worker-verify", "blocking"])
def test_whole_rearrangement_one_rank(benchmark, method):
    local, moved, specs = SMALL_CONFIGS["small-bf16-div8"]
    a, b = swap_maps(local, moved)
    a, b = np.repeat(a, 4, axis=0), np.repeat(b, 4, axis=0)
    weights = make_rank_weights(specs, 4, local)
    fill_rank_weights(weights, a, 0)
    state = {"maps": (a, b)}
    with TransferWorker(weights, verify=method == "worker-verify") as worker:

        def once():
            old, new = state["maps"]
            if method.startswith("worker"):
                worker.submit(old, new)
                worker.wait()
            else:
                rearrange_expert_weights_inplace(old, new, weights)
            state["maps"] = (new, old)

        benchmark.pedantic(once, rounds=10, iterations=1, warmup_rounds=1)
    current, _ = state["maps"]
    assert row_mismatches(weights, a, current, 0) == []


WHOLE_LAYERS = 16


def _two_rank_maps(world: int):
    """16 layers of 8 rows per rank; each rebalance rolls every layer's experts by one row (every
    row rewritten, a quarter of them across ranks)."""
    old = np.tile(np.arange(8 * world), (WHOLE_LAYERS, 1))
    return old, np.roll(old, 2, axis=1)


def _peer_rearranges(rank: int, world: int, port: int, calls: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    old, new = _two_rank_maps(world)
    weights = make_rank_weights([TensorSpec((64,), torch.float32)], WHOLE_LAYERS, 8)
    fill_rank_weights(weights, old, rank)
    maps = (old, new)
    with TransferWorker(weights) as worker:
        for _ in range(calls):
            worker.submit(*maps)
            while worker.busy:  # a serving loop: step() until every layer is swapped
                worker.step()
            maps = maps[::-1]
    dist.destroy_process_group()


@pytest.mark.parametrize("board", [pytest.param(True, id="W2-board"), pytest.param(False, id="W2-gloo")])
def test_whole_rearrangement_two_ranks_step_loop(benchmark, board, monkeypatch):
    """A whole worker rearrangement of 16 small layers at world 2, the serving thread calling
    step() in a tight loop: where the step agreement's cost shows end to end (the board, the
    default on one host, against gloo's all-reduce)."""
    rounds = 10
    monkeypatch.setenv("EPLB_TRITON_STEP_BOARD", "1" if board else "0")  # before the peer starts
    port = free_port()
    peer = mp.get_context("spawn").Process(target=_peer_rearranges, args=(1, 2, port, rounds + 1), daemon=True)
    peer.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        old, new = _two_rank_maps(2)
        weights = make_rank_weights([TensorSpec((64,), torch.float32)], WHOLE_LAYERS, 8)
        fill_rank_weights(weights, old, 0)
        state = {"maps": (old, new)}
        with TransferWorker(weights) as worker:
            assert (worker._board is not None) == board

            def once():
                worker.submit(*state["maps"])
                while worker.busy:
                    worker.step()
                state["maps"] = state["maps"][::-1]

            benchmark.pedantic(once, rounds=rounds, iterations=1, warmup_rounds=1)
        current, _ = state["maps"]
        assert row_mismatches(weights, old, current, 0) == []
    finally:
        dist.destroy_process_group()
        peer.join(timeout=30)

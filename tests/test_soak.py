"""Soak: many consecutive random rebalances on one gloo group; nothing leaks, every result exact.

Each rank carries its weights from one rebalance to the next (the new map becomes the old
one), checks every row bit for bit after every step, and samples its open file
descriptors, threads and resident memory. A *driver* performs one rebalance: the sync
driver calls :func:`rearrange_expert_weights_inplace` (varying the budget and ``verify``),
the worker driver keeps one :class:`~eplb_triton.worker.TransferWorker` for all steps.
"""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest
import torch

from eplb_triton.testing.launch import run_ranks
from eplb_triton.plan import plan_rearrangement
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from eplb_triton.schedule import schedule_layer
from eplb_triton.transfer import rearrange_expert_weights_inplace

SPECS = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((9,), torch.float32), TensorSpec((1,), torch.int32)]
EXPERT_BYTES = 32 + 48 + 16
WORLD, LAYERS, NUM_LOCAL, LOGICAL = 4, 3, 6, 16
WARMUP = 20


class SyncDriver:
    """One rebalance through the blocking API (budget and verify vary per step)."""

    varies_budget = True

    @staticmethod
    def staging_bound(budget: int) -> int:
        return budget

    def __init__(self, weights):
        self.weights = weights

    def __call__(self, old, new, *, max_buffer_bytes, verify):
        return rearrange_expert_weights_inplace(
            old, new, self.weights, max_buffer_bytes=max_buffer_bytes, verify=verify, timeout_s=30.0
        )

    def close(self):
        pass


class WorkerDriver:
    """One rebalance through one long-lived TransferWorker: submit, one step, then wait.

    The budget and ``verify`` are set on the worker before each submit (it reads them
    there), so one worker (one thread, one set of groups) serves every step; ``timeout_s``
    keeps its step agreement on the bounded (polling) path."""

    varies_budget = True

    def __init__(self, weights):
        from eplb_triton.worker import TransferWorker

        self.worker = TransferWorker(weights, timeout_s=30.0)

    def __call__(self, old, new, *, max_buffer_bytes, verify):
        self.worker.max_buffer_bytes = max_buffer_bytes
        self.worker.verify = verify
        self.worker.submit(old, new)
        self.worker.step()  # swaps what is ready (maybe nothing): the serving-loop pattern
        return self.worker.wait()

    @staticmethod
    def staging_bound(budget: int) -> int:
        # two slots of at most one layer's rows, plus a round's sends and both trailers (<= 2 budgets)
        return 2 * NUM_LOCAL * EXPERT_BYTES + 2 * budget

    def close(self):
        self.worker.close()


DRIVERS = {"sync": SyncDriver, "worker": WorkerDriver}


def next_map(rng, layers, slots, logical) -> np.ndarray:
    """Every logical expert at least once per layer (so later maps can name it), plus replicas and empty slots."""
    rows = []
    for _ in range(layers):
        extra = rng.integers(-1, logical, slots - logical)  # -1: empty slot
        rows.append(rng.permutation(np.concatenate([np.arange(logical), extra])))
    return np.stack(rows)


def tight_budget(old, new, world, cost) -> int:
    """The smallest budget (whole rows) every layer can be scheduled in: forces many rounds."""
    layers = plan_rearrangement(old, new, world).layers
    for rows in range(1, 10 * NUM_LOCAL):
        try:
            for layer in layers:
                schedule_layer(layer, cost, rows * cost)
        except ValueError:
            continue
        return rows * cost
    raise AssertionError("no feasible budget")


def _resources() -> dict[str, int]:
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    gc.collect()
    return {
        "tensors": sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor)),  # retained staging/undo
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "py_threads": threading.active_count(),
        "rss": rss_pages * os.sysconf("SC_PAGE_SIZE"),
    }


def _soak_rank(rank, world, steps, driver_name, seed):
    rng = np.random.default_rng(seed)  # same stream on every rank: same maps everywhere
    slots = world * NUM_LOCAL
    old = next_map(rng, LAYERS, slots, LOGICAL)
    content = old.copy()  # what each slot really holds (-1: the initial junk of an empty slot)
    weights = make_rank_weights(SPECS, LAYERS, NUM_LOCAL)
    fill_rank_weights(weights, old, rank)
    driver = DRIVERS[driver_name](weights)
    samples, staging, rounds, verified = [], set(), 0, 0
    for step in range(steps):
        new = next_map(rng, LAYERS, slots, LOGICAL)
        verify = step % 2 == 0
        tight = tight_budget(old, new, world, EXPERT_BYTES + (16 if verify else 0))
        budget = [None, tight, 1 << 20][step % 3] if driver.varies_budget else None
        stats = driver(old, new, max_buffer_bytes=budget, verify=verify)  # default, tight (rounds, undo), roomy
        bad = row_mismatches(weights, content, new, rank)
        if bad:
            return f"step {step}: wrong rows (layer, tensor, row) {bad[:5]}"
        if budget is not None and stats.peak_staging_bytes > driver.staging_bound(budget):
            return f"step {step}: staging {stats.peak_staging_bytes} B over the bound for a budget of {budget} B"
        if verify:
            verified += stats.verified_experts
        elif stats.verified_experts:
            return f"step {step}: {stats.verified_experts} experts verified without verify"
        staging.add((budget, stats.peak_staging_bytes))
        rounds += stats.rounds
        content = np.where(new >= 0, new, content)
        old = new
        if step + 1 == WARMUP or step + 1 == steps:
            samples.append(_resources())
    driver.close()
    return samples, rounds, len(staging), verified


@pytest.mark.parametrize(
    "steps",
    [pytest.param(200, id="200-steps"), pytest.param(
            2000,
            id="2000-steps",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(not os.environ.get("EPLB_SLOW"), reason="long soak: set EPLB_SLOW=1"),
            ],
        )],
)
@pytest.mark.parametrize("driver", list(DRIVERS))
def test_soak_rebalances_world4(driver, steps):
    results = run_ranks(WORLD, _soak_rank, steps, driver, 1234, backend="gloo", timeout_s=600.0, group_timeout_s=60.0)
    for rank, result in enumerate(results):
        assert not isinstance(result, str), f"rank {rank}: {result}"
        (warm, end), rounds, _, verified = result
        if DRIVERS[driver].varies_budget:
            assert rounds > steps  # the tight budget really forced rounds
        assert verified > 0  # verify steps really checked received experts
        assert end["tensors"] == warm["tensors"], (rank, warm, end)
        assert end["fds"] <= warm["fds"], (rank, warm, end)  # no growth (a transient fd may close)
        assert end["threads"] <= warm["threads"] and end["py_threads"] <= warm["py_threads"], (rank, warm, end)
        assert end["rss"] - warm["rss"] < 24 << 20, (rank, warm["rss"], end["rss"])  # allocator noise only

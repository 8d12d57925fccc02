"""The serving thread must not wait for queued GPU work: a swap behind a forward pass is only
queued. Checked functionally: after the call returns, a long kernel queued before it is still
running."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton import TransferWorker
from eplb_triton.layout import ExpertLayout
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches

pytestmark = pytest.mark.gpu

LONG_SLEEP_CYCLES = 500_000_000  # ~0.25 s at 2 GHz: far longer than any host-side launch


def _queue_long_kernel() -> torch.cuda.Event:
    torch.cuda._sleep(LONG_SLEEP_CYCLES)
    done = torch.cuda.Event()
    done.record()
    return done


def test_unpack_with_host_rows_does_not_wait_for_queued_work():
    weights = [torch.randn(16, 64, device="cuda"), torch.randint(0, 9, (16, 3), device="cuda", dtype=torch.int32)]
    layout = ExpertLayout(weights)
    buf = torch.randint(0, 255, (4 * layout.expert_bytes,), dtype=torch.uint8, device="cuda")
    layout.unpack(buf, np.array([3, 1, 7, 0]))  # compile first
    torch.cuda.synchronize()
    sleeping = _queue_long_kernel()
    layout.unpack(buf, np.array([5, 2, 9, 4]))
    layout.pack(np.array([5, 2]), torch.empty(2 * layout.expert_bytes, dtype=torch.uint8, device="cuda"))
    assert not sleeping.query(), "pack/unpack waited for work queued before them"
    torch.cuda.synchronize()


def test_step_swaps_without_waiting_for_queued_work():
    old = np.arange(12)[None, :]
    new = np.roll(old, 3, axis=1)
    weights = make_rank_weights([TensorSpec((256, 33), torch.bfloat16), TensorSpec((5,), torch.float32)], 1, 12, "cuda")
    fill_rank_weights(weights, old, 0)
    with TransferWorker(weights) as worker:
        for current, target in ((old, new), (new, old), (old, new)):  # warm-up passes compile the kernels
            worker.submit(current, target)
            while worker.busy:
                if worker._job is not None and worker._job.published > worker._job.swapped:
                    sleeping = _queue_long_kernel()
                    swapped = worker.step()
                    assert swapped == [0]
                    assert not sleeping.query(), "step() waited for work queued on the serving stream"
                else:
                    worker.step()
            torch.cuda.synchronize()
            assert row_mismatches(weights, current, target, 0) == []

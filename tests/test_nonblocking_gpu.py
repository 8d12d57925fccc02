"""The serving thread must not wait for queued GPU work: a swap behind a forward pass is only
queued. Checked functionally: after the call returns, a long kernel queued before it is still
running."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton import TransferWorker, rearrange_expert_weights_inplace
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
    packed = torch.empty(2 * layout.expert_bytes, dtype=torch.uint8, device="cuda")
    layout.unpack(buf, np.array([3, 1, 7, 0]))  # compile both first: a compile inside the window
    layout.pack(np.array([1, 3]), packed)  # outlasted the sleep on a fresh machine (run 46)
    torch.cuda.synchronize()
    sleeping = _queue_long_kernel()
    layout.unpack(buf, np.array([5, 2, 9, 4]))
    layout.pack(np.array([5, 2]), packed)
    assert not sleeping.query(), "pack/unpack waited for work queued before them"
    torch.cuda.synchronize()


def test_input_agreement_posts_without_waiting_for_queued_work():
    from eplb_triton.comm import Communicator

    comm = Communicator(group=None, rank=0, world_size=1, dist_backend="nccl")  # device payload, no peers
    comm.agree_start(None, {"inputs": 1})()  # warm-up: the pinned allocator's first block
    torch.cuda.synchronize()
    sleeping = _queue_long_kernel()
    finish = comm.agree_start(None, {"inputs": 7})  # the blocking call plans while this is in flight
    assert not sleeping.query(), "posting the input agreement waited for work queued before it"
    finish()  # reading the result waits for the device, as it must


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


def _rank_blocking_call(rank, world, timeout_s, verify):
    from eplb_triton import transfer

    specs = [TensorSpec((256, 33), torch.bfloat16), TensorSpec((5,), torch.float32)]
    old = np.arange(2 * 8)[None, :].repeat(3, axis=0)
    new = np.roll(old, 4, axis=1)  # every layer sends 4 experts each way
    device = torch.device("cuda", torch.cuda.current_device())
    weights = make_rank_weights(specs, 3, 8, device)
    for current, target in ((old, new), (new, old)):  # the first call compiles the kernels
        fill_rank_weights(weights, current, rank)
        sleeping = []

        def queue_sleep(point, **info):  # inside the call, after the input agreement's sync
            if point == "layer_start" and info["layer"] == 2:
                sleeping.append(_queue_long_kernel())

        transfer.fault_hook = queue_sleep
        try:
            stats = rearrange_expert_weights_inplace(current, target, weights, timeout_s=timeout_s, verify=verify)
        finally:
            transfer.fault_hook = None
        waited = sleeping[0].query()
        torch.cuda.synchronize()
        times = stats.layer_times_s
        bad = row_mismatches(weights, current, target, rank)
    return waited, stats.control_ops, len(times), all(t > 0 for t in times), bad


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(
    "timeout_s,verify,forced,confirms",
    [
        pytest.param(None, False, "", False, id="nccl-no-timeout-returns-queued"),
        pytest.param(None, False, "1", True, id="EPLB_TRITON_CONFIRM=1-confirms"),
        pytest.param(30.0, False, "", True, id="timeout-confirms"),
        pytest.param(None, True, "", True, id="verify-confirms"),
    ],
)
def test_blocking_call_over_nccl_waits_only_to_confirm(monkeypatch, timeout_s, verify, forced, confirms):
    from eplb_triton.testing.launch import run_ranks

    monkeypatch.setenv("EPLB_TRITON_CONFIRM", forced)

    for rank, (waited, control_ops, timed, positive, bad) in enumerate(
        run_ranks(2, _rank_blocking_call, timeout_s, verify, backend="nccl", timeout_s=90.0)
    ):
        assert bad == [], (rank, bad[:8])
        assert waited == confirms, "the call waited for the device" if waited else "the call did not confirm"
        assert control_ops == (2 if confirms else 0)
        assert timed == 3 and positive  # read after the call, from its CUDA events

"""Unchanged rows are never touched: checked on the transfer itself, not only on the plan.

Every row write of a rearrangement is recorded at the ExpertLayout level (``tests/row_writes.py``:
public ops, the Triton launcher and the torch reference ops), on every rank, for the blocking
``rearrange_expert_weights_inplace`` and for ``TransferWorker``, with the torch backend and with
the Triton kernels (through the interpreter on CPU). The rows written in each layer must be
exactly the rows whose new expert differs from the old one (computed from the maps alone),
and every row must hold its expected bytes afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton import TransferWorker, plan_rearrangement, rearrange_expert_weights_inplace
from eplb_triton.schedule import schedule_layer
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from row_writes import changed_rows, maps_with_unchanged_rows, record_row_writes

SPECS = [
    TensorSpec((3, 5), torch.bfloat16),  # 30 bytes: odd row size
    TensorSpec((7,), torch.float32),
    TensorSpec((1,), torch.int32),  # a per-expert scale
]
EXPERT_BYTES = 32 + 32 + 16
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.interpreter)]


def _rank_writes(rank, world, old, new, path, backend, kwargs):
    """Run one rearrangement with every row write recorded; return (rows written per layer, wrong rows)."""
    num_local = old.shape[1] // world
    weights = make_rank_weights(SPECS, old.shape[0], num_local)
    fill_rank_weights(weights, old, rank, seed=5)
    with record_row_writes() as writes:
        if path == "blocking":
            rearrange_expert_weights_inplace(old, new, weights, backend=backend, **kwargs)
        else:
            with TransferWorker(weights, backend=backend, **kwargs) as worker:
                worker.submit(old, new)
                worker.wait()
    return writes.per_layer(weights), row_mismatches(weights, old, new, rank, seed=5)


def check_only_changed_rows_written(results, old, new, world):
    num_local = old.shape[1] // world
    expected_any = False
    for rank, (written, bad) in enumerate(results):
        assert bad == [], f"rank {rank}: rows with wrong bytes (layer, tensor, row): {bad[:10]}"
        expected = changed_rows(old, new, rank, num_local)
        expected_any |= any(expected)
        for layer, (got, want) in enumerate(zip(written, expected)):
            assert got == want, (
                f"rank {rank}, layer {layer}: rows written {got}, rows that change {want}; "
                f"touched but unchanged: {sorted(set(got) - set(want))}, missed: {sorted(set(want) - set(got))}"
            )
    assert expected_any  # the maps move something


def _maps(seed, layers, world, num_local, logical):
    old, new = maps_with_unchanged_rows(np.random.default_rng(seed), layers, world, num_local, logical)
    unchanged = (new == old) & (old >= 0)
    assert unchanged.sum() >= layers, "the maps must keep some experts in place for this test to mean anything"
    return old, new


CASES = [
    pytest.param(1, {}, id="W1"),
    pytest.param(1, {"max_buffer_bytes": 2 * EXPERT_BYTES}, id="W1-passes"),
    pytest.param(2, {}, id="W2"),
    pytest.param(2, {"max_buffer_bytes": 3 * EXPERT_BYTES, "verify": True}, id="W2-passes-verify"),
    pytest.param(4, {}, id="W4"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,kwargs", CASES)
def test_blocking_writes_exactly_the_changed_rows(distributed, world, kwargs, backend):
    old, new = _maps(world * 7 + 1, 3, world, 6, 5 * world)
    if world == 1:
        results = [_rank_writes(0, 1, old, new, "blocking", backend, kwargs)]
    else:
        results = distributed(world, _rank_writes, old, new, "blocking", backend, kwargs)
    check_only_changed_rows_written(results, old, new, world)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,kwargs", CASES)
def test_worker_writes_exactly_the_changed_rows(distributed, world, kwargs, backend):
    old, new = _maps(world * 11 + 3, 3, world, 6, 5 * world)
    if world == 1:
        results = [_rank_writes(0, 1, old, new, "worker", backend, kwargs)]
    else:
        results = distributed(world, _rank_writes, old, new, "worker", backend, kwargs)
    check_only_changed_rows_written(results, old, new, world)


@pytest.mark.interpreter
def test_recorder_sees_every_write_path():
    """The instrumentation itself: each wrapped op records its destination rows, reads are not recorded."""
    from eplb_triton.layout import ExpertLayout

    tensors = [torch.randn(5, 4), torch.randint(0, 100, (5, 3), dtype=torch.int32)]
    layout = ExpertLayout(tensors)
    buf = torch.empty(5 * layout.expert_bytes, dtype=torch.uint8)
    with record_row_writes() as writes:
        layout.pack([0, 1], buf, backend="torch")  # reads only
        layout.launch("pack", buf, src_rows=torch.tensor([2]))  # reads only
        assert writes.written(tensors) == set()
        layout.unpack(buf[: layout.expert_bytes], [4], backend="torch")
        layout.copy_rows([0], [3], backend="torch")
        layout.launch("unpack", buf, dst_rows=torch.tensor([2]))
        layout.launch("copy", None, src_rows=torch.tensor([0]), dst_rows=torch.tensor([1]))
        layout.launch("unpack", buf, dst_rows=torch.tensor([0]), compile_only=True)  # writes nothing
        assert writes.written(tensors) == {1, 2, 3, 4}
    layout.unpack(buf[: layout.expert_bytes], [0], backend="torch")  # outside the block: not recorded
    assert writes.written(tensors) == {1, 2, 3, 4}


class _Injected(Exception):
    pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_writes_only_changed_rows(backend):
    """A failure after the first round of a multi-round layer rolls it back: the rollback
    rewrites rows the layer had written, never an unchanged one."""
    from eplb_triton import transfer

    old, new = _maps(22, 2, 1, 8, 6)  # layer 1 has a cycle of local moves: three passes at a 2-row budget
    assert len(schedule_layer(plan_rearrangement(old, new, 1).layers[1], EXPERT_BYTES, 2 * EXPERT_BYTES).passes) > 1
    weights = make_rank_weights(SPECS, 2, 8)
    fill_rank_weights(weights, old, 0, seed=5)
    fired = []

    def hook(where, **info):
        if where == "pass_applied" and info["layer"] == 1 and info["pass_index"] == 0:
            fired.append(info)
            raise _Injected("after layer 1's first round")

    transfer.fault_hook = hook
    try:
        with record_row_writes() as writes, pytest.raises(_Injected):
            rearrange_expert_weights_inplace(old, new, weights, backend=backend, max_buffer_bytes=2 * EXPERT_BYTES)
    finally:
        transfer.fault_hook = None
    assert fired
    expected = changed_rows(old, new, 0, 8)
    written = writes.per_layer(weights)
    assert written[0] == expected[0]  # layer 0 completed
    assert written[1] and set(written[1]) <= set(expected[1]), (written[1], expected[1])
    state = np.stack([np.where(new[0] >= 0, new[0], old[0]), old[1]])  # layer 0 new, layer 1 rolled back
    assert row_mismatches(weights, old, state, 0, seed=5) == []

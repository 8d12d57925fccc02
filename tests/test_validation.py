"""Bad input: the same clear error on every rank, raised before any weight is touched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton import plan_rearrangement, rearrange_expert_weights_inplace
from eplb_triton.synthetic import TensorSpec, fill_rank_weights, make_rank_weights

SPECS = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((2,), torch.int32)]
OLD = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
NEW = np.array([[4, 5, 6, 7, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3]])


def _break(case, rank, old, new, weights):
    """Return (old, new, weights) spoiled as `case` says; some cases spoil only rank 1."""
    if case == "shape-mismatch":
        return old, new[:, :6], weights
    if case == "layer-count":
        return old, new, weights[:1]
    if case == "num-local":  # 6 slots over 2 ranks = 3 rows, but the tensors have 4
        six = np.array([[0, 1, 2, 3, 4, 5]] * 2)
        return six, six[:, ::-1].copy(), weights
    if case == "id-below-minus-one":
        new = new.copy()
        new[1, 3] = -2
        return old, new, weights
    if case == "unknown-expert":
        new = new.copy()
        new[0, 2] = 9
        return old, new, weights
    if case == "float-map":
        return old.astype(np.float32), new, weights
    if case == "rows-disagree":
        weights[1][1] = torch.empty((3, 2), dtype=torch.int32).random_(1, 99)
        return old, new, weights
    if case == "non-contiguous-rows-on-rank-1":
        if rank == 1:
            weights[0][0] = torch.empty((4, 5, 3), dtype=torch.bfloat16).transpose(1, 2)
        return old, new, weights
    if case == "different-devices":
        weights[1][1] = torch.empty((4, 2), dtype=torch.int32, device="meta")
        return old, new, weights
    if case == "budget-below-one-expert":
        return old, new, weights
    raise AssertionError(case)


def _rank_bad_input(rank, world, case):
    weights = make_rank_weights(SPECS, 2, 4)
    fill_rank_weights(weights, OLD, rank)
    before = [[t.clone() for t in layer] for layer in weights]
    old, new, spoiled = _break(case, rank, OLD, NEW, [list(layer) for layer in weights])
    budget = 16 if case == "budget-below-one-expert" else None
    try:
        rearrange_expert_weights_inplace(old, new, spoiled, max_buffer_bytes=budget)
    except (ValueError, TypeError) as exc:
        error = (type(exc).__name__, str(exc))
    else:
        error = None
    unchanged = all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for la, lb in zip(weights, before) for a, b in zip(la, lb)
    )
    return error, unchanged


@pytest.mark.parametrize(
    "case,kind,message",
    [
        pytest.param("shape-mismatch", "ValueError", "differ in shape", id="maps-differ-in-shape"),
        pytest.param("layer-count", "ValueError", "expert_weights has 1 layers but the maps have 2", id="layer-count"),
        pytest.param("num-local", "ValueError", "num_physical must equal ep_size * num_local", id="num-physical"),
        pytest.param("id-below-minus-one", "ValueError", "expert id -2 < -1", id="id-below-minus-one"),
        pytest.param("unknown-expert", "ValueError", "names expert 9", id="unknown-expert"),
        pytest.param("float-map", "TypeError", "integer expert ids", id="float-map"),
        pytest.param("rows-disagree", "ValueError", "disagree on num_local", id="num-local-disagrees"),
        pytest.param("non-contiguous-rows-on-rank-1", "ValueError", "rank 1: layer 0, tensor 0: rows are not contiguous", id="non-contiguous-one-rank"),
        pytest.param("different-devices", "ValueError", "different devices", id="different-devices"),
        pytest.param("budget-below-one-expert", "ValueError", "smaller than one packed expert", id="budget-too-small"),
    ],
)
def test_bad_input_same_error_everywhere_weights_unchanged(distributed, case, kind, message):
    results = distributed(2, _rank_bad_input, case)
    for rank, (error, unchanged) in enumerate(results):
        assert error is not None, f"rank {rank} raised nothing"
        assert error[0] == kind and message in error[1], f"rank {rank}: {error}"
        assert unchanged, f"rank {rank}: weights changed"
    assert results[0][0] == results[1][0], "ranks disagree on the verdict"


def test_plan_rejects_bad_ep_size():
    with pytest.raises(ValueError, match="multiple of ep_size"):
        plan_rearrangement(np.arange(6), np.arange(6), 4)
    with pytest.raises(TypeError, match="ep_size must be an int"):
        plan_rearrangement(np.arange(6), np.arange(6), 2.0)


def test_plan_accepts_torch_and_one_layer():
    old = torch.tensor([0, 1, 2, 3])
    plan = plan_rearrangement(old, torch.tensor([1, 0, 2, 2]), 2)
    assert plan.num_layers == 1
    assert plan.layers[0].route.tolist() == [1, 0, 2, 2]

"""The input-checking stage (eplb_triton.inputs) and the maps it normalises, on one process.

Multi-rank behaviour (the agreement, every row of issue 13's table) is in test_validation.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton import TransferWorker, rearrange_expert_weights_inplace
from eplb_triton.comm import Communicator, _difference
from eplb_triton.maps import normalize_maps
from eplb_triton.inputs import (
    LAYOUTS,
    MAPS,
    OPTIONS,
    check_inputs,
    check_same_tensors,
    check_timeout,
    check_weights,
    verdict_of,
    weights_signature,
)

ALONE = Communicator(group=None, rank=0, world_size=1, dist_backend=None)
BIG = 2**40


def _random_weights(layers: int, num_local: int, shape=(6,), dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn((num_local, *shape), generator=gen).to(dtype)] for _ in range(layers)]


# -- maps: ids are any int64 >= -1 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "base",
    [
        pytest.param(0, id="small-ids"),
        pytest.param(BIG, id="ids-near-2^40"),
        pytest.param(2**62, id="ids-near-2^62"),
        pytest.param(np.iinfo(np.int64).max - 8, id="ids-at-int64-max"),
    ],
)
def test_any_int64_ids_move_like_small_ones(base):
    old = np.array([[base, base + 5, 3, -1], [base + 1, base + 1, base + 2, 7]])
    new = np.array([[base + 5, base, base, 3], [base + 2, 7, base + 1, -1]])
    weights = _random_weights(2, 4)
    before = [layer[0].clone() for layer in weights]
    rearrange_expert_weights_inplace(old, new, weights)
    assert torch.equal(weights[0][0], before[0][[1, 0, 0, 2]])
    expected = before[1][[2, 3, 0, 3]]
    assert torch.equal(weights[1][0][:3], expected[:3])
    assert torch.equal(weights[1][0][3], before[1][3])  # -1: the row is left alone


def test_missing_expert_found_among_huge_ids():
    old = np.array([[BIG, BIG + 1]])
    new = np.array([[BIG + 1, BIG + 2]])
    with pytest.raises(ValueError, match=f"names expert {BIG + 2} at layer 0, slot 1"):
        normalize_maps(old, new, 1)


@pytest.mark.parametrize("base", [pytest.param(0, id="dense-ids"), pytest.param(BIG, id="sparse-ids")])
def test_same_id_in_another_layer_does_not_count(base):
    old = np.array([[5, 6, -1], [7, 8, 8]]) + base
    new = np.array([[6, 5, -1], [5, 8, -1]]) + base
    old[0, 2] = new[0, 2] = new[1, 2] = -1
    with pytest.raises(ValueError, match=f"names expert {base + 5} at layer 1, slot 0"):
        normalize_maps(old, new, 1)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda v: np.array(v, dtype=np.uint64), id="numpy-uint64"),
        pytest.param(lambda v: torch.tensor(v, dtype=torch.uint64), id="torch-uint64"),
    ],
)
def test_uint64_beyond_int64_is_out_of_range_not_negative(make):
    old = make([2**63, 1])
    new = make([1, 1])
    with pytest.raises(ValueError, match="expert id 9223372036854775808 at slot 0, outside the int64 range"):
        normalize_maps(old, new, 1)


def test_uint64_within_range_is_fine():
    maps = normalize_maps(np.array([2**62, 1], dtype=np.uint64), np.array([1, 2**62], dtype=np.uint64), 1)
    assert maps.old.dtype == np.int64 and maps.old.tolist() == [[2**62, 1]]


@pytest.mark.parametrize("shape", [pytest.param((0, 8), id="0x8"), pytest.param((0, 0), id="0x0")])
def test_zero_layers_is_a_no_op(shape):
    empty = np.zeros(shape, dtype=np.int64)
    stats = rearrange_expert_weights_inplace(empty, empty, [])
    assert stats.p2p_ops == 0 and stats.layer_times_s == [] and stats.local_copies == 0


def test_zero_layers_on_the_worker():
    empty = torch.zeros((0, 4), dtype=torch.int64)
    with TransferWorker([]) as worker:
        worker.submit(empty, empty)
        assert not worker.busy
        assert worker.wait().p2p_ops == 0


def test_one_layer_needs_slots():
    with pytest.raises(ValueError, match="positive multiple"):
        normalize_maps(np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.int64), 1)


# -- check_inputs never raises -------------------------------------------------------------------

OLD = np.array([[0, 1, 2, 3]])
NEW = np.array([[3, 2, 1, 0]])


class _Exploding(list):
    """A list of layers whose iteration fails like odd runtime containers can."""

    def __iter__(self):
        raise IndexError("list index out of range")


def _shared_storage_weights():
    base = torch.randn(6, 6)
    return [[base[:4], base[2:6]]]


@pytest.mark.parametrize(
    "kwargs,kind,message",
    [
        pytest.param({"old": OLD.astype(np.float32)}, TypeError, "integer expert ids", id="float-map"),
        pytest.param({"old": [[0, 1, 2, 3]]}, TypeError, "torch.Tensor or numpy.ndarray", id="list-map"),
        pytest.param({"old": np.array([[0, 1, 2, 3]], dtype=object)}, TypeError, "integer expert ids", id="object-map"),
        pytest.param({"old": np.zeros((1, 1, 4), dtype=np.int64)}, ValueError, "must have shape", id="3d-map"),
        pytest.param({"weights": None}, TypeError, "got NoneType", id="weights-none"),
        pytest.param({"weights": torch.randn(4, 6)}, TypeError, "got Tensor", id="weights-bare-tensor"),
        pytest.param({"weights": [torch.randn(4, 6)]}, TypeError, "expected a list or tuple of tensors", id="layer-is-a-tensor"),
        pytest.param({"weights": [[]]}, ValueError, "has no tensors", id="layer-without-tensors"),
        pytest.param({"weights": [["w13"]]}, TypeError, "expected a torch.Tensor, got str", id="tensor-is-a-string"),
        pytest.param({"weights": [[torch.tensor(1.0)]]}, ValueError, "0-d tensor", id="0d-tensor"),
        pytest.param({"weights": [[torch.randn(1, 6).expand(4, 6)]]}, ValueError, "rows overlap", id="expanded-rows"),
        pytest.param({"weights": [[torch.randn(4, 1).expand(4, 6)]]}, ValueError, "rows are not contiguous", id="expanded-columns"),
        pytest.param({"weights": [[torch.randn(6, 4).t()]]}, ValueError, "rows are not contiguous", id="transposed"),
        pytest.param({"weights": _shared_storage_weights()}, ValueError, "share memory", id="tensors-share-rows"),
        pytest.param({"weights": [[torch.empty(4, 6, device="meta")]]}, ValueError, "meta device", id="meta-tensor"),
        pytest.param({"weights": [[torch.randn(4, 6).to_sparse()]]}, TypeError, "dense strided", id="sparse-tensor"),
        pytest.param({"weights": _Exploding([[torch.randn(4, 6)]])}, ValueError, "IndexError: list index out of range", id="iteration-raises"),
        pytest.param({"timeout_s": float("nan")}, ValueError, "finite number > 0", id="timeout-nan"),
        pytest.param({"timeout_s": "5"}, TypeError, "timeout_s must be a number", id="timeout-str"),
        pytest.param({"verify": 1}, TypeError, "verify must be a bool", id="verify-int"),
        pytest.param({"rounds": "ring"}, ValueError, "rounds must be", id="rounds-unknown"),
        pytest.param({"max_buffer_bytes": 1.5}, TypeError, "max_buffer_bytes must be an int", id="budget-float"),
    ],
)
def test_check_inputs_returns_a_verdict_never_raises(kwargs, kind, message):
    args = {"old": OLD, "new": NEW, "weights": _random_weights(1, 4)} | kwargs
    old, new, weights = args.pop("old"), args.pop("new"), args.pop("weights")
    checked = check_inputs(old, new, weights, ALONE, **args)
    assert type(checked.error) is kind and message in str(checked.error), checked.error
    # the public API raises exactly that verdict
    with pytest.raises(kind, match=message.replace("(", r"\(")):
        rearrange_expert_weights_inplace(old, new, weights, **args)


def test_budget_below_one_expert_is_refused_after_the_agreement_with_the_smallest_that_works():
    checked = check_inputs(OLD, NEW, _random_weights(1, 4), ALONE, max_buffer_bytes=8)
    assert checked.error is None  # it needs the plan: refused after the agreement, on every rank alike
    with pytest.raises(ValueError, match="max_buffer_bytes=8 is smaller than one packed expert .* smallest max_buffer_bytes"):
        rearrange_expert_weights_inplace(OLD, NEW, _random_weights(1, 4), max_buffer_bytes=8)


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(MemoryError("Unable to allocate 1.00 TiB"), id="MemoryError"),
        pytest.param(IndexError("list index out of range"), id="IndexError"),
        pytest.param(RuntimeError("storage is gone"), id="RuntimeError"),
    ],
)
def test_unexpected_exceptions_become_a_value_error_naming_them(monkeypatch, exc):
    def explode(*args, **kwargs):
        raise exc

    monkeypatch.setattr("eplb_triton.inputs.normalize_maps", explode)
    checked = check_inputs(OLD, NEW, _random_weights(1, 4), ALONE)
    assert type(checked.error) is ValueError
    assert f"{type(exc).__name__}: {exc}" in str(checked.error)
    assert checked.error.__cause__ is exc


def test_verdict_keeps_value_and_type_errors():
    error = TypeError("x")
    assert verdict_of(error) is error


def test_check_timeout():
    assert check_timeout(None) is None and check_timeout(np.float32(2)) == 2.0
    for bad in (0, -1, float("inf")):
        with pytest.raises(ValueError):
            check_timeout(bad)
    with pytest.raises(TypeError):
        check_timeout(True)


# -- fingerprints: what the ranks must agree on ----------------------------------------------------


def _fingerprints(weights, **options):
    checked = check_inputs(OLD, NEW, weights, ALONE, **options)
    assert checked.error is None, checked.error
    return checked.fingerprints


def test_same_bytes_other_dtype_changes_the_layout_fingerprint():
    bf16 = _fingerprints([[torch.randn(4, 12).to(torch.bfloat16)]])
    f32 = _fingerprints([[torch.randn(4, 6)]])
    assert bf16[LAYOUTS] != f32[LAYOUTS]
    assert bf16[MAPS] == f32[MAPS] and bf16[OPTIONS] == f32[OPTIONS]


def test_same_dtype_other_shape_changes_the_layout_fingerprint():
    assert _fingerprints([[torch.randn(4, 2, 3)]])[LAYOUTS] != _fingerprints([[torch.randn(4, 3, 2)]])[LAYOUTS]


def test_weight_values_do_not_change_fingerprints():
    assert _fingerprints(_random_weights(1, 4, seed=1)) == _fingerprints(_random_weights(1, 4, seed=2))


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"verify": True}, id="verify"),
        pytest.param({"rounds": "expert"}, id="rounds"),
        pytest.param({"max_buffer_bytes": 1 << 20}, id="budget"),
    ],
)
def test_options_change_only_the_options_fingerprint(options):
    plain = _fingerprints(_random_weights(1, 4))
    other = _fingerprints(_random_weights(1, 4), **options)
    assert other[OPTIONS] != plain[OPTIONS]
    assert other[MAPS] == plain[MAPS] and other[LAYOUTS] == plain[LAYOUTS]


def test_describe_names_layers_and_tensors():
    checked = check_inputs(OLD, NEW, [[torch.randn(4, 12).to(torch.bfloat16), torch.randn(4, 2)]], ALONE, verify=True)
    assert "layer 0, tensor 0: bfloat16 (4, 12)" in checked.describe(LAYOUTS)
    assert "layer 0, tensor 1: float32 (4, 2)" in checked.describe(LAYOUTS)
    assert "verify=True" in checked.describe(OPTIONS)
    assert "layer 0 new map [3 2 1 0]" in " ".join(checked.describe(MAPS))


def test_difference_names_the_odd_rank_and_its_first_differing_item():
    per_rank = [["7", "2 layers", "layer 0: a"], ["9", "2 layers", "layer 0: b"], ["7", "2 layers", "layer 0: a"]]
    text = _difference("weight layouts", per_rank)
    assert text == "weight layouts differ on rank 1 (vs ranks 0, 2): rank 1 has layer 0: b where rank 0 has layer 0: a"


# -- weights replaced after a TransferWorker was built ---------------------------------------------


def test_replaced_tensor_is_refused():
    weights = _random_weights(2, 4)
    signature = weights_signature(weights)
    check_same_tensors(weights, signature)  # unchanged: fine
    weights[1][0] = weights[1][0].clone()
    with pytest.raises(ValueError, match="layer 1, tensor 0 of expert_weights was replaced"):
        check_same_tensors(weights, signature)


def test_resized_tensor_is_refused():
    weights = _random_weights(1, 4)
    signature = weights_signature(weights)
    weights[0][0].resize_(4, 3)
    with pytest.raises(ValueError, match="was replaced \\(or resized\\)"):
        check_same_tensors(weights, signature)


def test_worker_refuses_replaced_tensor_at_submit_and_writes_nothing():
    weights = _random_weights(1, 4)
    with TransferWorker(weights) as worker:
        weights[0][0] = torch.randn(4, 6)
        before = weights[0][0].clone()
        with pytest.raises(ValueError, match="create a new TransferWorker"):
            worker.submit(OLD, NEW)
        assert torch.equal(weights[0][0], before) and not worker.busy


# -- ep_group must be a process group ------------------------------------------------------------


def test_ep_group_not_a_group_is_a_type_error_before_torch_distributed():
    import torch.distributed as dist

    with pytest.raises(TypeError, match="ep_group must be a torch.distributed ProcessGroup or None, got int"):
        rearrange_expert_weights_inplace(OLD, NEW, _random_weights(1, 4), 3)
    with pytest.raises(TypeError, match="ep_group must be a torch.distributed ProcessGroup"):
        TransferWorker(_random_weights(1, 4), 3)
    assert not dist.is_initialized()


def test_check_weights_accepts_zero_layers_and_checks_rows_across_layers():
    assert check_weights([]) == []
    with pytest.raises(ValueError, match="layer 1: tensors have 3 rows but layer 0's have 4"):
        check_weights([[torch.randn(4, 2)], [torch.randn(3, 2)]])


def test_check_weights_remembers_checked_tensors_but_still_refuses_changed_ones():
    storage = torch.randn(4 * 6 + 8)
    good = [[storage[:24].view(4, 6), torch.randn(4, 3, 2)]]
    first = check_weights(good)
    again = check_weights(good)  # the second call takes the remembered verdict
    assert [(lay.num_local, lay.row_bytes, lay.expert_bytes) for lay in again] == [
        (lay.num_local, lay.row_bytes, lay.expert_bytes) for lay in first
    ]
    assert again[0].tensors[0] is good[0][0]
    # the same address with other strides (rows that overlap) is a new key, checked and refused
    overlapping = [[storage.as_strided((4, 6), (3, 1)), good[0][1]]]
    with pytest.raises(ValueError, match="rows overlap"):
        check_weights(overlapping)
    # the same tensors, now sharing memory with a second layer: refused although each was fine
    with pytest.raises(ValueError, match="share memory"):
        check_weights(good + [[storage[8:32].view(4, 6), torch.randn(4, 3, 2)]])
    # a different num_local request is not answered by the remembered verdict
    with pytest.raises(ValueError, match="rows but the maps give num_local = 5"):
        check_weights(good, num_local=5)


def test_layout_fingerprint_is_remembered_with_the_tensors_and_follows_them():
    from eplb_triton.inputs import _checked_weights, _layout_fingerprint

    bf16 = [[torch.zeros(4, 12, dtype=torch.bfloat16)]]
    layouts, first = _checked_weights(bf16)
    assert first == _layout_fingerprint(layouts)
    assert _checked_weights(bf16)[1] == first  # remembered: the same tensors
    f32 = [[torch.zeros(4, 6, dtype=torch.float32)]]  # the same row bytes, another dtype
    assert _checked_weights(f32)[1] != first


def test_remembered_layouts_have_the_geometry_of_fresh_ones():
    from eplb_triton.inputs import _checked_weights
    from eplb_triton.layout import ExpertLayout

    weights = [[torch.zeros(3, 5, 3, dtype=torch.bfloat16), torch.zeros(3, 7, dtype=torch.uint8)] for _ in range(2)]
    _checked_weights(weights)
    again, _ = _checked_weights(weights)  # from the cache
    for layout, tensors in zip(again, weights):
        fresh = ExpertLayout(tensors)
        assert layout.geometry == fresh.geometry and layout.row_bytes == [30, 7]
        assert all(a is b for a, b in zip(layout.tensors, tensors))
    weights[1][1] = torch.zeros(3, 9, dtype=torch.uint8)  # another tensor: checked and laid out anew
    assert _checked_weights(weights)[0][1].row_bytes == [30, 9]

"""The blocking loop's two staging slots (:func:`eplb_triton.executor.run_layers`): when the
budget holds two layers' staging, layer ``i + 1`` is packed and posted before layer ``i`` is
waited for. Bit-exact either way; the slots are taken only when they fit the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton import rearrange_expert_weights_inplace, reserve
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from map_cases import packed_expert_bytes

SPECS = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((2, 3, 3), torch.uint8), TensorSpec((1,), torch.float32)]
EXPERT_BYTES = packed_expert_bytes(SPECS)  # 64: rows padded to 16 bytes
NUM_LOCAL = 8


def swap_maps(layers: int, swapped: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """World 2, ``NUM_LOCAL`` rows per rank: layer ``l`` swaps the first ``swapped[l]`` rows of
    rank 0 with those of rank 1 (0 = the layer only moves one expert locally on each rank)."""
    old = np.tile(np.arange(2 * NUM_LOCAL), (layers, 1))
    new = old.copy()
    for l, k in enumerate(swapped):
        if k:
            new[l, :k], new[l, NUM_LOCAL : NUM_LOCAL + k] = old[l, NUM_LOCAL : NUM_LOCAL + k], old[l, :k]
        else:  # no network: rows 0 and 1 trade places on each rank
            for base in (0, NUM_LOCAL):
                new[l, base], new[l, base + 1] = old[l, base + 1], old[l, base]
    return old, new


def _rank_swap(rank, world, old, new, kwargs, staging_bytes, seed):
    weights = make_rank_weights(SPECS, old.shape[0], NUM_LOCAL)
    fill_rank_weights(weights, old, rank, seed)
    if staging_bytes == "reserve":
        kwargs = dict(kwargs, staging=reserve(weights))
    elif staging_bytes is not None:
        kwargs = dict(kwargs, staging=torch.full((staging_bytes,), 0xA5, dtype=torch.uint8))
    stats = rearrange_expert_weights_inplace(old, new, weights, **kwargs)
    return row_mismatches(weights, old, new, rank, seed), stats


def run_swap(distributed, swapped, staging_bytes=None, **kwargs):
    old, new = swap_maps(len(swapped), swapped)
    results = distributed(2, _rank_swap, old, new, kwargs, staging_bytes, len(swapped))
    for rank, (bad, _) in enumerate(results):
        assert bad == [], f"rank {rank}: rows with wrong bytes (layer, tensor, row): {bad[:10]}"
    return [stats for _, stats in results]


@pytest.mark.parametrize(
    "swapped,budget_rows,overlapped",
    [
        # 2 swapped rows: 4 rows of staging per layer, two slots fit the default budget (8 rows)
        pytest.param([2, 2, 2, 2], None, 3, id="L4-default-budget-fits-two"),
        # 3 swapped: 6 rows per layer; two slots need 12 rows
        pytest.param([3, 3, 3], None, 0, id="L3-default-budget-fits-one"),
        pytest.param([3, 3, 3], 12, 2, id="L3-budget-exactly-two"),
        pytest.param([3, 3, 3], 12 - 1 / EXPERT_BYTES, 0, id="L3-budget-a-byte-short"),
        # a layer without network traffic empties the pipeline: only 3 follows 2
        pytest.param([1, 0, 2, 2], None, 1, id="L4-local-layer-between"),
        pytest.param([2], None, 0, id="L1-nothing-to-overlap"),
    ],
)
def test_two_staging_slots_when_the_budget_holds_them(distributed, swapped, budget_rows, overlapped):
    budget = None if budget_rows is None else round(budget_rows * EXPERT_BYTES)
    stats = run_swap(distributed, swapped, max_buffer_bytes=budget)
    peak = 2 * max(swapped) * EXPERT_BYTES  # sends + receives of the largest layer
    for s in stats:
        assert s.overlapped_layers == overlapped
        assert s.peak_staging_bytes == (2 * peak if overlapped else peak)
        if budget is not None:
            assert s.peak_staging_bytes <= budget


@pytest.mark.parametrize(
    "staging_rows,overlapped",
    [
        pytest.param(12, 2, id="given-holds-two"),
        pytest.param(11, 0, id="given-holds-one"),
    ],
)
def test_given_staging_decides_the_slots(distributed, staging_rows, overlapped):
    stats = run_swap(distributed, [3, 3, 3], staging_bytes=staging_rows * EXPERT_BYTES)
    assert [s.overlapped_layers for s in stats] == [overlapped] * 2


def test_reserved_default_staging_holds_two_slots(distributed):
    stats = run_swap(distributed, [2, 1, 2], staging_bytes="reserve")
    assert [s.overlapped_layers for s in stats] == [2, 2]


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param({"verify": True}, id="verify"), pytest.param({"rounds": True}, id="rounds")],
)
def test_framed_messages_are_not_overlapped(distributed, kwargs):
    stats = run_swap(distributed, [2, 2, 2], max_buffer_bytes=1 << 20, **kwargs)
    assert [s.overlapped_layers for s in stats] == [0, 0]


def test_given_staging_larger_than_the_budget_keeps_to_the_budget(distributed):
    # the caller's buffer holds two slots, max_buffer_bytes only one: the budget wins
    stats = run_swap(distributed, [3, 3, 3], staging_bytes=12 * EXPERT_BYTES, max_buffer_bytes=11 * EXPERT_BYTES)
    assert [s.overlapped_layers for s in stats] == [0, 0]
    assert all(s.peak_staging_bytes <= 11 * EXPERT_BYTES for s in stats)

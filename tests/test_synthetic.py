"""The self-checking synthetic weights: patterns are deterministic, chunking-independent, and
the checker catches a single flipped byte."""

from __future__ import annotations

import numpy as np
import torch

import eplb_triton.testing.synthetic as synthetic
from eplb_triton.testing.synthetic import TensorSpec, expert_pattern, fill_rank_weights, make_rank_weights, row_mismatches


def test_pattern_does_not_depend_on_chunking(monkeypatch):
    ids = torch.tensor([3, -5, 7, 0])
    whole = expert_pattern(ids, 1001, salt=9)
    monkeypatch.setattr(synthetic, "_CHUNK_BYTES", 64)
    assert torch.equal(whole, expert_pattern(ids, 1001, salt=9))
    assert whole.float().std() > 50  # random-looking bytes, not zeros
    assert not torch.equal(whole[0], whole[2])


def test_checker_finds_one_flipped_byte(monkeypatch):
    monkeypatch.setattr(synthetic, "_CHUNK_BYTES", 32)  # several row blocks per tensor
    old = np.array([[0, 1, 2, -1, 4, 5]])
    weights = make_rank_weights([TensorSpec((7, 3), torch.float16), TensorSpec((5,), torch.uint8)], 1, 6)
    fill_rank_weights(weights, old, rank=0)
    assert row_mismatches(weights, old, old, rank=0) == []
    weights[0][0].view(torch.uint8)[4, 2, 1] ^= 1
    assert row_mismatches(weights, old, old, rank=0) == [(0, 0, 4)]

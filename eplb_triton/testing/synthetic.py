"""Synthetic expert weights whose bytes name their expert, and a bit-exact checker.

The content of logical expert ``e``'s row in tensor ``i`` of layer ``l`` is a hash of
``(seed, l, i, e, byte index)``: random-looking, never all zeros, cheap to regenerate on the
device, so a checker can tell which expert every row holds without keeping a copy. Empty
slots (``-1``) hold junk that depends on the slot, so an untouched empty slot is checkable
too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..layout import _byte_rows

__all__ = ["TensorSpec", "expert_pattern", "fill_rank_weights", "make_rank_weights", "row_mismatches"]

_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor of a layer: trailing shape after ``num_local`` and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty(0, dtype=self.dtype).element_size()


def _salt(seed: int, layer: int, tensor: int) -> int:
    return (seed * 1_000_003 + layer * 10_007 + tensor * 101 + 17) & _MASK


_CHUNK_BYTES = 1 << 24  # pattern bytes made at once: 16 MiB of uint8 = 128 MiB of int64 scratch


def expert_pattern(ids: torch.Tensor, nbytes: int, salt: int) -> torch.Tensor:
    """``(len(ids), nbytes)`` uint8 content of experts ``ids`` (int64, on the target device)."""
    out = torch.empty((ids.numel(), nbytes), dtype=torch.uint8, device=ids.device)
    step = max(1, _CHUNK_BYTES // max(nbytes, 1))
    for first in range(0, ids.numel(), step):
        block = ids[first : first + step]
        for start in range(0, nbytes, _CHUNK_BYTES):
            stop = min(nbytes, start + _CHUNK_BYTES)
            out[first : first + step, start:stop] = _pattern_block(block, start, stop, salt)
    return out


def _pattern_block(ids: torch.Tensor, start: int, stop: int, salt: int) -> torch.Tensor:
    j = torch.arange(start, stop, dtype=torch.int64, device=ids.device)
    x = ids.to(torch.int64)[:, None] * 0x9E3779B1 + j[None, :] * 0x85EBCA77 + salt
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    x = x ^ (x >> 12)
    x = x * 0x297A2D39
    x = x ^ (x >> 15)
    return (x & 0xFF).to(torch.uint8)


def _slot_ids(layer_map: np.ndarray, rank: int, num_local: int) -> np.ndarray:
    slots = np.arange(rank * num_local, (rank + 1) * num_local)
    ids = layer_map[slots].astype(np.int64)
    return np.where(ids >= 0, ids, -2 - slots)  # empty slots: junk unique to the slot


def make_rank_weights(
    specs: Sequence[Sequence[TensorSpec]] | Sequence[TensorSpec],
    num_layers: int,
    num_local: int,
    device: torch.device | str = "cpu",
) -> list[list[torch.Tensor]]:
    """Allocate (uninitialised) weights: ``specs[l]`` per layer, or one spec list for all."""
    per_layer = specs if specs and isinstance(specs[0], (list, tuple)) and not isinstance(specs[0], TensorSpec) else [specs] * num_layers
    return [[torch.empty((num_local, *s.shape), dtype=s.dtype, device=device) for s in layer] for layer in per_layer]


def fill_rank_weights(weights: list[list[torch.Tensor]], expert_map: np.ndarray, rank: int, seed: int = 0) -> None:
    """Write every row of this rank's weights with the pattern of the expert ``expert_map`` names."""
    expert_map = np.atleast_2d(expert_map)
    for layer, tensors in enumerate(weights):
        num_local = tensors[0].shape[0]
        ids = torch.as_tensor(_slot_ids(expert_map[layer], rank, num_local), device=tensors[0].device)
        for i, tensor in enumerate(tensors):
            rows = _byte_rows(tensor)
            step = max(1, _CHUNK_BYTES // max(rows.shape[1], 1))
            for first in range(0, num_local, step):
                rows[first : first + step] = expert_pattern(ids[first : first + step], rows.shape[1], _salt(seed, layer, i))


def row_mismatches(
    weights: list[list[torch.Tensor]], old_map: np.ndarray, new_map: np.ndarray, rank: int, seed: int = 0
) -> list[tuple[int, int, int]]:
    """``(layer, tensor, row)`` of every row that does not hold, bit for bit, what it should.

    A row should hold the expert ``new_map`` names; a row whose new id is -1 must be untouched
    (it still holds what ``old_map`` put there).
    """
    old_map, new_map = np.atleast_2d(old_map), np.atleast_2d(new_map)
    bad = []
    for layer, tensors in enumerate(weights):
        num_local = tensors[0].shape[0]
        expected = np.where(new_map[layer] >= 0, new_map[layer], old_map[layer])
        ids = _slot_ids(expected, rank, num_local)
        ids_t = torch.as_tensor(ids, device=tensors[0].device)
        for i, tensor in enumerate(tensors):
            rows = _byte_rows(tensor)
            step = max(1, _CHUNK_BYTES // max(rows.shape[1], 1))
            for first in range(0, num_local, step):  # bounded scratch for 40 MB rows too
                want = expert_pattern(ids_t[first : first + step], rows.shape[1], _salt(seed, layer, i))
                wrong = (rows[first : first + step] != want).any(dim=1).nonzero().flatten().tolist()
                bad.extend((layer, i, first + r) for r in wrong)
    return bad

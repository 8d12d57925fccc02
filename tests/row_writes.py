"""Test-only instrumentation: record every weight row that a rearrangement writes.

Every write to a layer's rows goes through :class:`~eplb_triton.layout.ExpertLayout`: its
public ops (``unpack``, ``copy_rows``), the Triton launcher (``launch`` in ``"unpack"`` /
``"copy"`` mode), the torch reference ops (``unpack_reference``, ``copy_rows_reference``) and
``unpack_by_tensor`` (messages sent straight from the weights). :func:`record_row_writes` wraps
all six on the class, so the recording does not depend on
which of them transfer.py or worker.py call internally (a refactor that moves from the public
ops to the launcher, or to the reference ops, is still seen). Arguments are bound by name, so
a reordered signature is still read correctly. ``pack`` and ``launch("pack")`` only read rows
and are not recorded; ``compile_only`` launches write nothing.

Writes are keyed by the data pointer of the layer's first tensor, which identifies a layer
across the many ``ExpertLayout`` objects built for it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import defaultdict
from typing import Iterator

import numpy as np
import torch

from eplb_triton.layout import ExpertLayout

# method name -> (argument holding the destination rows, modes that write rows or None for all)
_WRITERS = {
    "unpack": ("rows", None),
    "copy_rows": ("dst_rows", None),
    "unpack_reference": ("rows", None),
    "copy_rows_reference": ("dst_rows", None),
    "launch": ("dst_rows", {"unpack", "copy"}),
    "unpack_by_tensor": ("rows", None),
}


def _host_list(rows) -> list[int]:
    if isinstance(rows, torch.Tensor):
        return rows.detach().cpu().to(torch.int64).flatten().tolist()
    return np.asarray(rows, dtype=np.int64).ravel().tolist()


class RowWrites:
    """``rows[key]``: every row index written in the layer whose first tensor is at ``key``."""

    def __init__(self) -> None:
        self.rows: dict[int, set[int]] = defaultdict(set)
        self.calls: dict[str, int] = defaultdict(int)  # writes seen per wrapped method

    def written(self, tensors: list[torch.Tensor]) -> set[int]:
        return set(self.rows.get(tensors[0].data_ptr(), set()))

    def per_layer(self, weights: list[list[torch.Tensor]]) -> list[list[int]]:
        return [sorted(self.written(layer)) for layer in weights]


@contextlib.contextmanager
def record_row_writes() -> Iterator[RowWrites]:
    """Within the block, every ExpertLayout row write (any backend, any thread) is recorded."""
    record = RowWrites()
    originals = {name: getattr(ExpertLayout, name) for name in _WRITERS}

    def wrap(name, original):
        signature = inspect.signature(original)
        argument, modes = _WRITERS[name]

        @functools.wraps(original)
        def recording(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            values = bound.arguments
            writes = modes is None or (values.get("mode") in modes and not values.get("compile_only", False))
            if writes and values.get(argument) is not None:
                record.rows[self.tensors[0].data_ptr()].update(_host_list(values[argument]))
                record.calls[name] += 1
            return original(self, *args, **kwargs)

        return recording

    for name, original in originals.items():
        setattr(ExpertLayout, name, wrap(name, original))
    try:
        yield record
    finally:
        for name, original in originals.items():
            setattr(ExpertLayout, name, original)


def changed_rows(old: np.ndarray, new: np.ndarray, rank: int, num_local: int) -> list[list[int]]:
    """Per layer, the rows of ``rank`` a rearrangement must write: the new map names an expert
    (not -1) that differs from the old one. Computed from the maps alone (no planner)."""
    old, new = np.atleast_2d(old), np.atleast_2d(new)
    slots = slice(rank * num_local, (rank + 1) * num_local)
    return [np.flatnonzero((n[slots] >= 0) & (n[slots] != o[slots])).tolist() for o, n in zip(old, new)]


def maps_with_unchanged_rows(rng: np.random.Generator, layers: int, ep: int, num_local: int, logical: int):
    """Old/new maps with replicas, empty slots, and about 40% of slots that keep their expert."""
    slots = ep * num_local
    old = np.stack([rng.permutation(np.r_[np.arange(logical), rng.integers(0, logical, slots - logical)]) for _ in range(layers)])
    old[rng.random(old.shape) < 0.1] = -1
    new = np.empty_like(old)
    for layer in range(layers):
        held = np.unique(old[layer][old[layer] >= 0])
        new[layer] = rng.choice(held, slots)
    new[rng.random(new.shape) < 0.1] = -1
    keep = rng.random(new.shape) < 0.4
    new[keep] = old[keep]
    return old, new

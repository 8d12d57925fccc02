"""Weights and references shared by the runtime integration tests (vLLM, SGLang).

Every logical expert has random bytes (any dtype, NaN patterns included) drawn from one
seed, the same on every rank; a slot holds its expert's bytes, an empty slot (-1) holds
rank-specific junk. The reference is plain torch indexing: after a rearrangement a row holds
its new expert's bytes, or keeps what it had when its new slot is empty. Compared byte for
byte.
"""

from __future__ import annotations

import numpy as np
import torch

# (row shape, dtype): odd byte sizes, a 0-d per-expert scale, fp8, a 2-D row
SPECS = [
    ((4, 6), torch.bfloat16),
    ((5,), torch.float32),
    ((), torch.float32),
    ((3, 3), torch.float8_e4m3fn),
    ((7,), torch.uint8),
]


def random_bytes(shape: tuple, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (max(nbytes, 1),), generator=generator, dtype=torch.uint8)[:nbytes]
    return raw.view(dtype).reshape(shape)


def expert_table(seed: int, layers: int, logical: int, specs=SPECS) -> list[list[torch.Tensor]]:
    """``table[layer][tensor][expert]``: the bytes of every logical expert."""
    g = torch.Generator().manual_seed(seed)
    return [[random_bytes((logical, *shape), dtype, g) for shape, dtype in specs] for _ in range(layers)]


def rank_weights(table, old_map: np.ndarray, rank: int, num_local: int, seed: int) -> list[list[torch.Tensor]]:
    """This rank's weights for the (group-wide) ``old_map``: expert bytes, junk in empty slots."""
    g = torch.Generator().manual_seed(10_000 + 97 * seed + rank)
    weights = []
    for layer, tensors in enumerate(table):
        ids = old_map[layer, rank * num_local : (rank + 1) * num_local]
        layer_weights = []
        for full in tensors:
            t = random_bytes((num_local, *full.shape[1:]), full.dtype, g)
            held = np.flatnonzero(ids >= 0)
            t[torch.as_tensor(held)] = full[torch.as_tensor(ids[held])]
            layer_weights.append(t)
        weights.append(layer_weights)
    return weights


def expected_weights(before, table, new_map: np.ndarray, rank: int, num_local: int) -> list[list[torch.Tensor]]:
    """Plain torch reference: new expert bytes where the new slot is not empty, else unchanged."""
    out = []
    for layer, tensors in enumerate(before):
        ids = new_map[layer, rank * num_local : (rank + 1) * num_local]
        filled = np.flatnonzero(ids >= 0)
        layer_out = []
        for t, full in zip(tensors, table[layer]):
            e = t.clone()
            e[torch.as_tensor(filled)] = full[torch.as_tensor(ids[filled])]
            layer_out.append(e)
        out.append(layer_out)
    return out


def byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def mismatches(got, want) -> list[tuple[int, int, int]]:
    """``(layer, tensor, row)`` of every row whose bytes differ."""
    bad = []
    for layer, (gs, ws) in enumerate(zip(got, want)):
        for index, (g, w) in enumerate(zip(gs, ws)):
            for row in range(g.shape[0]):
                if not torch.equal(byte_view(g[row]), byte_view(w[row])):
                    bad.append((layer, index, row))
    return bad


def poisoned_like(tensors, seed: int) -> list[torch.Tensor]:
    """Scratch buffers shaped like ``tensors``, filled with junk (never zeros)."""
    g = torch.Generator().manual_seed(55_555 + seed)
    return [random_bytes(tuple(t.shape), t.dtype, g) for t in tensors]


def clone_layers(weights) -> list[list[torch.Tensor]]:
    return [[t.clone() for t in layer] for layer in weights]


def elastic_group_maps(old: np.ndarray, new: np.ndarray, mapping, world: int):
    """The maps as the transfer group sees them (vLLM's rule): a mapping as long as the group
    is a scale-down (new rows move to the old rank that becomes that new rank, removed ranks
    get empty rows); otherwise a scale-up (old rows move to their new rank, new ranks start empty)."""
    layers = old.shape[0]
    mapping = [mapping[k] for k in sorted(mapping)] if isinstance(mapping, dict) else list(mapping)
    if len(mapping) == world:
        num_local = new.shape[1] // sum(m >= 0 for m in mapping)
        group_new = np.full((layers, world * num_local), -1, dtype=np.int64)
        for r, m in enumerate(mapping):
            if m >= 0:
                group_new[:, r * num_local : (r + 1) * num_local] = new[:, m * num_local : (m + 1) * num_local]
        return old, group_new
    num_local = old.shape[1] // len(mapping)
    group_old = np.full((layers, world * num_local), -1, dtype=np.int64)
    for r, m in enumerate(mapping):
        group_old[:, m * num_local : (m + 1) * num_local] = old[:, r * num_local : (r + 1) * num_local]
    return group_old, new

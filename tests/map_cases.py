"""Random old/new expert maps shared by the transfer tests."""

from __future__ import annotations

import numpy as np


def random_maps(rng, layers, ep, num_local, logical, empty_frac=0.1):
    """Old/new maps where every logical expert is held somewhere, with replicas and some empty
    slots; the new map names only experts the old layer holds."""
    slots = ep * num_local
    maps = []
    for _ in range(2):
        rows = []
        for _ in range(layers):
            m = rng.permutation(np.concatenate([rng.permutation(logical), rng.integers(0, logical, slots - logical)])[:slots])
            m[rng.random(slots) < empty_frac] = -1
            rows.append(m)
        maps.append(np.stack(rows))
    old, new = maps
    for l in range(layers):
        held = np.unique(old[l][old[l] >= 0])
        bad = (new[l] >= 0) & ~np.isin(new[l], held)
        new[l][bad] = rng.choice(held, bad.sum())
    return old, new


def packed_expert_bytes(specs) -> int:
    """Bytes of one packed expert of ``specs`` (TensorSpecs): each row padded to 16 bytes."""
    return sum(-(-spec.row_bytes() // 16) * 16 for spec in specs)


def expected_received_experts(old, new, world: int) -> list[int]:
    """Experts each rank must receive over the network, from the maps alone: per layer, the
    distinct experts its new rows name that none of its old rows holds (an expert held
    locally is moved locally; one needed in several rows is received once)."""
    old, new = np.atleast_2d(old), np.atleast_2d(new)
    num_local = old.shape[1] // world
    counts = []
    for rank in range(world):
        rows = slice(rank * num_local, (rank + 1) * num_local)
        counts.append(
            sum(int(np.setdiff1d(n[rows][n[rows] >= 0], o[rows][o[rows] >= 0]).size) for o, n in zip(old, new))
        )
    return counts

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

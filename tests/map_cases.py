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


def rotation_maps(layers: int, world: int, num_local: int, moved: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer ``l``: every rank's first ``moved + l % 2`` rows go to the next rank's rows ``1 ..``
    (one run of rows per message, each landing one row lower); on every rank the last row takes
    a replica of its first (a local move) and, in odd layers, row ``num_local - 2`` empties."""
    old = np.tile(np.arange(world * num_local), (layers, 1))
    new = old.copy()
    for l in range(layers):
        k = moved + l % 2
        for r in range(world):
            dst = ((r + 1) % world) * num_local
            new[l, dst + 1 : dst + 1 + k] = old[l, r * num_local : r * num_local + k]
        for r in range(world):
            base = r * num_local
            new[l, base + num_local - 1] = old[l, base]
            if l % 2:
                new[l, base + num_local - 2] = -1
    return old, new


def all_to_all_run_maps(layers: int, world: int, moved: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_local = (world - 1) * moved + 1``; every rank sends ``moved`` consecutive rows to
    every other rank (one run each), which lands them in the rows of its ``i``-th sender (the
    last row stays): every receiver gets a message from every sender."""
    n = (world - 1) * moved + 1
    old = np.tile(np.arange(world * n), (layers, 1))
    new = old.copy()
    for r in range(world):
        others = [q for q in range(world) if q != r]
        for j, q in enumerate(others):
            i = [s for s in range(world) if s != q].index(r)
            new[:, q * n + i * moved : q * n + (i + 1) * moved] = old[:, r * n + j * moved : r * n + (j + 1) * moved]
    return old, new

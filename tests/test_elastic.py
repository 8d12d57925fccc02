"""Elastic EP: rank_mapping on the planner and on the blocking transfer (gloo ranks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton import plan_rearrangement, rearrange_expert_weights_inplace
from eplb_triton.plan import normalize_elastic_maps
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches

SPECS = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((7,), torch.float32), TensorSpec((2, 3, 3), torch.uint8)]


def elastic_maps(rng, layers, old_ep, new_ep, num_local, logical):
    """Old map over old_ep ranks, new map over new_ep ranks naming only experts old holds."""
    old = np.stack([rng.permutation(np.r_[np.arange(logical), rng.integers(0, logical, old_ep * num_local)][: old_ep * num_local]) for _ in range(layers)])
    new = np.stack([rng.permutation(np.r_[np.arange(logical), rng.integers(0, logical, new_ep * num_local)][: new_ep * num_local]) for _ in range(layers)])
    old[:, 1] = -1  # an empty slot
    for l in range(layers):
        held = np.unique(old[l][old[l] >= 0])
        bad = ~np.isin(new[l], held)
        new[l][bad] = rng.choice(held, bad.sum())
    return old, new


# ---------------------------------------------------------------------------------------
# Planner level
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping",
    [
        pytest.param([0, -1, 1, -1], id="4to2-list"),
        pytest.param({0: -1, 1: 2, 2: 0, 3: 1}, id="4to3-dict-permuted"),
        pytest.param(np.array([1, 0, -1]), id="3to2-numpy"),
    ],
)
def test_scale_down_plan(mapping):
    m = np.array([mapping[k] for k in sorted(mapping)]) if isinstance(mapping, dict) else np.asarray(mapping)
    old_ep, new_ep, n = m.size, int(m.max()) + 1, 3
    old, new = elastic_maps(np.random.default_rng(old_ep), 2, old_ep, new_ep, n, 5)
    plan = plan_rearrangement(old, new, old_ep, rank_mapping=mapping)
    assert plan.ep_size == old_ep and plan.maps.new.shape == (2, old_ep * n)
    for r in range(old_ep):
        got = plan.maps.new[:, r * n : (r + 1) * n]
        if m[r] < 0:
            assert (got == -1).all()
        else:
            assert np.array_equal(got, new[:, m[r] * n : (m[r] + 1) * n])
    for layer in plan.layers:
        for r in np.flatnonzero(m < 0):  # removed ranks only send
            assert layer.network_receives[r] == 0 and layer.traffic[r, r] == 0
            assert layer.rank(int(r)).recv_rows == {}
        assert layer.network_sends.sum() == layer.network_receives.sum()


@pytest.mark.parametrize(
    "mapping,new_ep",
    [pytest.param([0, 1], 4, id="2to4"), pytest.param([2, 0], 3, id="2to3-permuted"), pytest.param({0: 1}, 2, id="1to2-dict")],
)
def test_scale_up_plan(mapping, new_ep):
    m = np.array([mapping[k] for k in sorted(mapping)]) if isinstance(mapping, dict) else np.asarray(mapping)
    old_ep, n = m.size, 2
    old, new = elastic_maps(np.random.default_rng(new_ep), 2, old_ep, new_ep, n, 3)
    plan = plan_rearrangement(old, new, new_ep, rank_mapping=mapping)
    assert plan.ep_size == new_ep and plan.maps.old.shape == (2, new_ep * n)
    fresh = np.setdiff1d(np.arange(new_ep), m)
    for r in range(old_ep):
        assert np.array_equal(plan.maps.old[:, m[r] * n : (m[r] + 1) * n], old[:, r * n : (r + 1) * n])
    for layer in plan.layers:
        for r in fresh:  # new ranks only receive
            assert layer.network_sends[r] == 0 and layer.rank(int(r)).send_rows == {}
        assert np.array_equal(layer.route >= 0, plan.maps.new[layers_index(plan, layer)] >= 0)


def layers_index(plan, layer):
    return next(i for i, x in enumerate(plan.layers) if x is layer)


def test_identity_mapping_equals_plain_plan():
    old, new = elastic_maps(np.random.default_rng(0), 2, 4, 4, 2, 6)
    a = plan_rearrangement(old, new, 4, rank_mapping=[0, 1, 2, 3])
    b = plan_rearrangement(old, new, 4)
    for x, y in zip(a.layers, b.layers):
        assert np.array_equal(x.route, y.route) and np.array_equal(x.traffic, y.traffic)


@pytest.mark.parametrize(
    "old_slots,new_slots,ep,mapping,exc,match",
    [
        pytest.param(8, 4, 4, [0, 0, -1, -1], ValueError, "same new rank", id="duplicate"),
        pytest.param(8, 6, 4, [0, 1, -1, -1], ValueError, "image of no old rank", id="uncovered"),
        pytest.param(8, 4, 2, [0, -1, 1, -1], ValueError, "ep_size=2", id="wrong-group"),
        pytest.param(4, 8, 4, [0, -1], ValueError, "scale-up", id="scale-up-removed"),
        pytest.param(8, 4, 4, [0, 5, -1, -1], ValueError, "new ranks in", id="out-of-range"),
        pytest.param(8, 4, 4, [0, -2, 1, -1], ValueError, "new ranks in", id="below-minus-one"),
        pytest.param(8, 5, 4, [0, 1, -1, -1], ValueError, "num_local", id="bad-new-slots"),
        pytest.param(9, 6, 4, [0, 1, -1, -1], ValueError, "len\\(rank_mapping\\)", id="bad-old-slots"),
        pytest.param(8, 4, 4, {0: 0, 2: 1}, ValueError, "every old rank", id="dict-gap"),
        pytest.param(8, 4, 4, [0, 1.0, -1, -1], TypeError, "ints", id="float"),
        pytest.param(8, 4, 4, "0,1", TypeError, "rank_mapping", id="string"),
    ],
)
def test_bad_rank_mapping(old_slots, new_slots, ep, mapping, exc, match):
    old = np.arange(old_slots) % 3
    new = np.arange(new_slots) % 3
    with pytest.raises(exc, match=match):
        normalize_elastic_maps(old, new, ep, mapping)


# ---------------------------------------------------------------------------------------
# Transfer on gloo ranks
# ---------------------------------------------------------------------------------------


def _rank_elastic(rank, world, old, new, mapping, seed, budget):
    maps = normalize_elastic_maps(old, new, world, mapping)
    num_local = maps.num_local
    weights = make_rank_weights(SPECS, old.shape[0], num_local)
    fill_rank_weights(weights, maps.old, rank, seed)
    stats = rearrange_expert_weights_inplace(old, new, weights, rank_mapping=mapping, max_buffer_bytes=budget)
    return row_mismatches(weights, maps.old, maps.new, rank, seed), stats.total_bytes_sent, stats.total_bytes_received, stats.stacked_layers


@pytest.mark.parametrize(
    "old_ep,new_ep,mapping,budget",
    [
        pytest.param(4, 2, [0, -1, -1, 1], None, id="down-4to2"),
        pytest.param(4, 3, [2, 0, -1, 1], None, id="down-4to3-permuted"),
        pytest.param(4, 2, [-1, 1, 0, -1], 400, id="down-4to2-small-budget"),
        pytest.param(2, 4, [0, 1], None, id="up-2to4"),
        pytest.param(3, 4, [3, 0, 1], None, id="up-3to4-permuted"),
        pytest.param(2, 4, [2, 0], 400, id="up-2to4-small-budget"),
        # room for stacks: consecutive layers share one exchange
        pytest.param(4, 2, [0, -1, -1, 1], 1 << 20, id="down-4to2-stacked"),
        pytest.param(2, 4, [2, 0], 1 << 20, id="up-2to4-stacked"),
    ],
)
def test_elastic_transfer(distributed, old_ep, new_ep, mapping, budget):
    rng = np.random.default_rng(old_ep * 10 + new_ep)
    old, new = elastic_maps(rng, 3, old_ep, new_ep, 3, 7)
    world = max(old_ep, new_ep)
    results = distributed(world, _rank_elastic, old, new, mapping, 1, budget)
    for rank, (bad, _, _, _) in enumerate(results):
        assert bad == [], f"rank {rank}: rows with wrong bytes (layer, tensor, row): {bad[:10]}"
    if budget == 1 << 20:
        assert max(r[3] for r in results) >= 2, "layers with traffic should have been stacked"
    m = np.asarray(mapping)
    if new_ep < old_ep:
        for r in np.flatnonzero(m < 0):
            assert results[r][2] == 0  # removed ranks receive nothing
        assert sum(results[r][1] for r in np.flatnonzero(m < 0)) > 0  # and do send
    else:
        for r in np.setdiff1d(np.arange(new_ep), m):
            assert results[r][1] == 0 and results[r][2] > 0  # new ranks only receive


def _rank_bad(rank, world, old, new, mapping):
    weights = make_rank_weights(SPECS, 1, old.shape[-1] // len(mapping))
    try:
        rearrange_expert_weights_inplace(old, new, weights, rank_mapping=mapping)
    except ValueError as exc:
        return str(exc)
    return None


def test_elastic_bad_mapping_raises_on_every_rank(distributed):
    old = np.arange(8)[None] % 5  # 4 old ranks x 2 rows
    new = np.arange(6)[None] % 5  # 3 new ranks
    messages = distributed(2, _rank_bad, old, new, [0, 1, 2, -1])  # group of 2, needs 4
    assert all(m is not None and "ep_size=2" in m for m in messages)

"""prepare_layers(defer=True): each one-pass item's work is built when the loop first needs it,
a few items at a time, and equals the work built the plain way (the plan's per-layer views)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_triton.comm import Communicator
from eplb_triton.passes import PassWork
from eplb_triton.prepare import prepare_layers
from eplb_triton.stacked import stack_views
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from eplb_triton.transfer import rearrange_expert_weights_inplace
from map_cases import packed_expert_bytes, random_maps

SPECS = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((2,), torch.int32)]  # odd row bytes: 30
NUM_LOCAL = 4
ROW_LISTS = ("send_rows", "recv_rows", "local_src_rows", "local_dst_rows", "direct_src_rows", "direct_dst_rows")


def _reference(item, plan_layers, rank: int) -> PassWork:
    """The item's pass the plain way: the layers' own views (joined for a stack)."""
    group = range(item.index, item.index + item.layer_count)
    views = [plan_layers[i].rank(rank) for i in group]
    view = views[0] if item.layer_count == 1 else stack_views(views, NUM_LOCAL)
    return PassWork.from_view(view, item.layout.expert_bytes, direct_local=True)


def _differences(item, want: PassWork) -> list[str]:
    (got,) = item.passes
    out = [name for name in ROW_LISTS if getattr(got, name).tolist() != getattr(want, name).tolist()]
    out += [name for name in ("dup_src_rows", "dup_dst_rows") if getattr(got.view, name).tolist() != getattr(want.view, name).tolist()]
    out += [name for name in ("send_peers", "send_counts", "recv_peers", "recv_counts") if getattr(got, name) != getattr(want, name)]
    if got.staging_bytes != want.staging_bytes:
        out.append("staging_bytes")
    rows = got.device_rows(torch.device("cpu"))  # uploaded by the build: the same lists
    if rows["send"].tolist() != want.send_rows.tolist() or rows["recv"].tolist() != want.recv_rows.tolist():
        out.append("device rows")
    return out


def _rank_deferred(rank, world, old, new, budget):
    """Per item: (first layer, layers, deferred before the loop, built alone-with, differences)."""
    weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
    comm = Communicator.from_group()
    items = prepare_layers(old, new, weights, comm, budget, stack=True, defer=True)
    deferred = [item.deferred is not None for item in items]
    staging_ahead = [item.staging_bytes for item in items]
    builds = []  # how many items each first touch built
    for item in items:
        before = sum(other.deferred is None for other in items)
        item.built()
        builds.append(sum(other.deferred is None for other in items) - before)
    plan_layers = [item.plan for item in items]  # first layer of each item; stacks need every layer
    full = prepare_layers(old, new, weights, comm, budget, stack=False)  # one item per layer
    plan_layers = [layer.plan for layer in full]
    report = []
    for item, was_deferred, ahead, built in zip(items, deferred, staging_ahead, builds):
        diffs = _differences(item, _reference(item, plan_layers, rank)) if was_deferred else []
        if was_deferred and ahead != item.staging_bytes:
            diffs.append("staging_bytes before the build")
        report.append((item.index, item.layer_count, was_deferred, built, diffs))
    return report


@pytest.mark.parametrize("world", [pytest.param(2, id="W2"), pytest.param(4, id="W4")])
@pytest.mark.parametrize("budget_layers", [pytest.param(None, id="default-budget"), pytest.param(8, id="budget-8-layers")])
def test_deferred_items_build_in_growing_groups_and_equal_the_plain_work(distributed, world, budget_layers):
    rng = np.random.default_rng(world)
    # random maps move too much for one pass at the default budget (one layer's rows): swaps there
    old, new = random_maps(rng, 14, world, NUM_LOCAL, 3 * world) if budget_layers else _swaps(rng, 14, world)
    old[5], new[5] = old[4], old[4]  # a layer that moves nothing: not deferred
    budget = None if budget_layers is None else budget_layers * NUM_LOCAL * packed_expert_bytes(SPECS)
    reports = distributed(world, _rank_deferred, old, new, budget)
    for rank, report in enumerate(reports):
        assert [r[4] for r in report if r[4]] == [], (rank, report)
        firsts = [r for r in report if r[2]]
        assert firsts, "no deferred item"
        # the first touch of a build builds its items: 1, 2, 4, ... of them
        sizes = [r[3] for r in firsts if r[3]]
        assert sizes == [min(2**k, len(firsts) - (2**k - 1)) for k in range(len(sizes))], (rank, sizes)
        assert all(not r[2] for r in report if r[0] == 5), "a layer that moves nothing has nothing to defer"
        if budget_layers:
            assert any(r[1] > 1 for r in report), "no stack formed"
    assert len({tuple((r[0], r[1]) for r in report) for report in reports}) == 1, "ranks stacked differently"


def _swaps(rng, layers: int, world: int):
    """Each layer swaps two random pairs of slots (a rank sends and receives at most two rows)."""
    old = np.tile(np.arange(world * NUM_LOCAL), (layers, 1))
    new = old.copy()
    for layer in new:
        a, b, c, d = rng.choice(world * NUM_LOCAL, 4, replace=False)
        layer[[a, b, c, d]] = layer[[b, a, d, c]]
    return old, new


def _rank_rearrange(rank, world, old, new, budget):
    weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, seed=11)
    stats = rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=budget, timeout_s=60.0)
    return row_mismatches(weights, old, new, rank, seed=11), stats.stacked_layers


@pytest.mark.parametrize("world", [pytest.param(2, id="W2"), pytest.param(4, id="W4")])
def test_blocking_call_with_deferred_builds_is_exact(distributed, world):
    rng = np.random.default_rng(10 + world)
    old, new = random_maps(rng, 9, world, NUM_LOCAL, 3 * world)
    budget = 8 * NUM_LOCAL * packed_expert_bytes(SPECS)
    results = distributed(world, _rank_rearrange, old, new, budget)
    assert [r[0] for r in results] == [[]] * world
    assert all(r[1] > 0 for r in results)


def test_deferred_single_rank():
    """One rank: local moves only, deferred like the others, and exact."""
    old = np.array([[0, 1, 2, 3]] * 3)
    new = np.array([[3, 2, 1, 0], [0, 1, 2, 3], [1, 1, 0, 3]])
    weights = make_rank_weights(SPECS, 3, 4)
    fill_rank_weights(weights, old, 0, seed=2)
    items = prepare_layers(old, new, weights, Communicator.from_group(None), defer=True)
    assert [item.index for item in items if item.deferred is not None] == [0, 2]
    rearrange_expert_weights_inplace(old, new, weights)
    assert row_mismatches(weights, old, new, 0, seed=2) == []

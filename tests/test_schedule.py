"""Rounds under a staging budget: complete, within budget, never read a row after it is overwritten."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_triton.plan import plan_rearrangement
from eplb_triton.schedule import _rank_load, direct_local_moves, fits_one_pass, schedule_layer, smallest_budget_bytes


def check_schedule(layer, capacity, default_budget=False):
    """Schedule ``layer`` with ``capacity`` rows of 16 bytes (or the default budget, which must
    fit ``capacity`` rows) and check it."""
    schedule = schedule_layer(layer, 16) if default_budget else schedule_layer(layer, 16, capacity * 16)
    count = layer.num_deliveries
    every = np.concatenate(schedule.passes) if schedule.passes else np.zeros(0, dtype=np.int64)
    assert np.array_equal(np.sort(every), np.arange(count)), "each delivery in exactly one round"
    round_of = np.empty(count, dtype=np.int64)
    for k, members in enumerate(schedule.passes):
        round_of[members] = k
    stash_per_rank = np.bincount(schedule.stash_slots // layer.num_local, minlength=layer.ep_size)
    load = _rank_load(layer)
    if len(schedule.passes) == 1 and not schedule.stash_slots.size:  # a whole layer copies direct local moves row to row
        load[direct_local_moves(layer.src_slot, layer.dst_slot, layer.is_network)] = 0
    for members in schedule.passes:
        assert (load[members].sum(axis=0) + stash_per_rank <= capacity).all(), "round over budget"
    writer = np.full(layer.route.size, -1)
    writer[layer.dst_slot] = np.arange(count)
    writer[layer.dup_dst_slot] = layer.dup_delivery
    stashed = np.isin(layer.src_slot, schedule.stash_slots)
    w = writer[layer.src_slot]
    live = (w >= 0) & ~stashed
    assert (round_of[live] <= round_of[w[live]]).all(), "a row is read after it was overwritten"
    return schedule


def test_rotation_needs_a_stash():
    old = np.arange(24)
    layer = plan_rearrangement(old, np.roll(old, 7), 4).layers[0]
    schedule = check_schedule(layer, 3)
    assert schedule.stash_slots.size >= 1 and len(schedule.passes) > 1


def test_fits_in_one_round_without_stash():
    old = np.arange(24)
    layer = plan_rearrangement(old, np.roll(old, 7), 4).layers[0]
    schedule = check_schedule(layer, 100)
    assert len(schedule.passes) == 1 and schedule.stash_slots.size == 0


def test_budget_below_what_any_schedule_needs():
    old = np.arange(8)
    layer = plan_rearrangement(old, np.roll(old, 4), 2).layers[0]
    with pytest.raises(ValueError, match="too small"):
        schedule_layer(layer, 16, 16)


@pytest.mark.parametrize("seed", range(40))
def test_random_layers_schedule_within_budget(seed):
    rng = np.random.default_rng(seed)
    ep, num_local = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    slots = ep * num_local
    old = rng.integers(-1, slots, slots)
    old[rng.permutation(slots)[: slots // 2]] = rng.permutation(slots)[: slots // 2]
    held = old[old >= 0]
    new = rng.choice(held, slots)
    new[rng.random(slots) < 0.1] = -1
    layer = plan_rearrangement(old, new, ep).layers[0]
    check_schedule(layer, int(rng.integers(3, 2 * num_local + 2)))


# Issue 11: a valid layer the old scheduler refused at the default budget (it stashed the
# 3-cycle's row on rank 0, where the 2-cycle also needed both rows).
ISSUE_OLD = np.array([[3, 1, 2, 5, 4, 0, 5, 3]])
ISSUE_NEW = np.array([[5, 0, 3, 2, 0, 1, 4, 0]])


def test_default_budget_schedules_issue_example():
    layer = plan_rearrangement(ISSUE_OLD, ISSUE_NEW, 4).layers[0]
    schedule = check_schedule(layer, 2, default_budget=True)  # default: one layer = 2 rows
    assert schedule.stash_slots.size == 1 and len(schedule.passes) > 1


def test_default_budget_swap_with_one_row_per_rank_needs_two_rows():
    """One row per rank: a swap needs a send and a receive row at once, so the default grows to 2 rows."""
    layer = plan_rearrangement(np.array([0, 1]), np.array([1, 0]), 2).layers[0]
    assert smallest_budget_bytes(layer, 16) == 32
    check_schedule(layer, 2, default_budget=True)
    with pytest.raises(ValueError, match="the smallest budget that works is 32 bytes"):
        schedule_layer(layer, 16, 16)


@pytest.mark.parametrize("budget_rows", [pytest.param(1, id="rows1"), pytest.param(0, id="rows0")])
def test_too_small_budget_names_the_smallest_that_works(budget_rows):
    old = np.arange(8)
    layer = plan_rearrangement(old, np.roll(old, 4), 2).layers[0]
    smallest = smallest_budget_bytes(layer, 16)
    with pytest.raises(ValueError, match=f"the smallest budget that works is {smallest} bytes"):
        schedule_layer(layer, 16, budget_rows * 16 + 15)
    with pytest.raises(ValueError, match="too small"):
        schedule_layer(layer, 16, smallest - 1)
    check_schedule(layer, smallest // 16)  # that budget works, as does every larger one
    check_schedule(layer, smallest // 16 + 1)


def test_nothing_to_move_needs_no_budget():
    layer = plan_rearrangement(np.arange(4), np.arange(4), 2).layers[0]
    assert smallest_budget_bytes(layer, 16) == 0
    assert schedule_layer(layer, 16, 0).passes == []


@pytest.mark.parametrize("world", [2, 3, 8])
def test_one_pass_rows_is_the_load_table_summed_without_direct_moves(world):
    # schedule_layer's one-pass shortcut must decide exactly as the load table does, the
    # direct local moves (copied row to row, no staging) left out
    from eplb_triton.schedule import _one_pass_rows

    rng = np.random.default_rng(world)
    for _ in range(30):
        num_local = int(rng.integers(1, 6))
        slots = world * num_local
        old = rng.integers(-1, slots, size=(3, slots))
        new = rng.integers(-1, slots, size=(3, slots))
        new[:, 0] = old[:, 0] = 0  # at least one expert held somewhere
        new = np.stack([np.where(np.isin(n, o), n, -1) for o, n in zip(old, new)])  # only experts held in that layer
        for layer in plan_rearrangement(old, new, world).layers:
            load = _rank_load(layer)
            load[direct_local_moves(layer.src_slot, layer.dst_slot, layer.is_network)] = 0
            assert np.array_equal(_one_pass_rows(layer), load.sum(axis=0))


@pytest.mark.parametrize("world", [2, 3, 8])
def test_fits_one_pass_decides_as_schedule_layer(world):
    """The all-layers test takes schedule_layer's one-pass shortcut exactly where it does (and
    that shortcut is one pass with every delivery and no stash), for budgets from none to more
    than a layer and the default budget."""
    from eplb_triton.schedule import _one_pass_rows

    rng = np.random.default_rng(world + 10)
    for _ in range(20):
        num_local = int(rng.integers(1, 6))
        slots = world * num_local
        old = rng.integers(-1, slots, size=(4, slots))
        new = rng.integers(-1, slots, size=(4, slots))
        new[:, 0] = old[:, 0] = 0
        new = np.stack([np.where(np.isin(n, o), n, -1) for o, n in zip(old, new)])
        new[1] = old[1]  # a layer that moves nothing
        layers = plan_rearrangement(old, new, world).layers
        for capacity in [0, 1, 2, num_local, 2 * num_local + 1]:
            got = fits_one_pass(layers, [capacity] * len(layers))
            for layer, fits in zip(layers, got):
                shortcut = layer.num_deliveries > 0 and capacity >= 1 and _one_pass_rows(layer).max() <= capacity
                assert bool(fits) == bool(shortcut), (capacity, layer)
                if fits:
                    budget = None if capacity == num_local else capacity * 16
                    schedule = schedule_layer(layer, 16, budget)
                    assert len(schedule.passes) == 1 and schedule.stash_slots.size == 0
                    assert np.array_equal(schedule.passes[0], np.arange(layer.num_deliveries))

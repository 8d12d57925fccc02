"""Rounds under a staging budget: complete, within budget, never read a row after it is overwritten."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_triton.plan import plan_rearrangement
from eplb_triton.schedule import _rank_load, schedule_layer


def check_schedule(layer, capacity):
    schedule = schedule_layer(layer, 16, capacity * 16)
    count = layer.num_deliveries
    every = np.concatenate(schedule.rounds) if schedule.rounds else np.zeros(0, dtype=np.int64)
    assert np.array_equal(np.sort(every), np.arange(count)), "each delivery in exactly one round"
    round_of = np.empty(count, dtype=np.int64)
    for k, members in enumerate(schedule.rounds):
        round_of[members] = k
    stash_per_rank = np.bincount(schedule.stash_slots // layer.num_local, minlength=layer.ep_size)
    load = _rank_load(layer)
    for members in schedule.rounds:
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
    assert schedule.stash_slots.size >= 1 and len(schedule.rounds) > 1


def test_fits_in_one_round_without_stash():
    old = np.arange(24)
    layer = plan_rearrangement(old, np.roll(old, 7), 4).layers[0]
    schedule = check_schedule(layer, 100)
    assert len(schedule.rounds) == 1 and schedule.stash_slots.size == 0


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

"""The default staging budget schedules every valid pair of maps (issue 11, defect 3).

Random valid maps (world 2-8, 1-6 rows per rank, replicas, empty slots, rotations that make
long cycles across ranks; every new id is held by some old slot of its layer):

* in process, many examples: the default schedule fits one layer of rows (two with one row
  per rank), and a reference simulation that applies its rounds to a list of slot contents
  (stash at the start, every read of a round before its writes) ends exactly where a plain
  gather of the old slots does; an explicit budget either works within itself or is refused
  with the smallest budget that works, which then works;
* a subset runs the real transfer on gloo ranks with the default budget, byte for byte.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb_triton.testing.launch import run_ranks
from eplb_triton.plan import plan_rearrangement
from eplb_triton.schedule import LayerSchedule, schedule_layer, smallest_budget_bytes
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from eplb_triton.transfer import rearrange_expert_weights_inplace

ROW = 16  # expert bytes in the in-process checks
SHAPES = ["rotation", "permutation", "replicas", "random"]


@st.composite
def valid_maps(draw, worlds=(2, 8), rows=(1, 6), layers=(1, 1)):
    """``(world, old, new)``: ``(layers, world * num_local)`` maps, every new id held in old."""
    world = draw(st.integers(*worlds))
    num_local = draw(st.integers(*rows))
    slots = world * num_local
    old_rows, new_rows = [], []
    for _ in range(draw(st.integers(*layers))):
        logical = draw(st.integers(1, slots))
        old = draw(st.lists(st.integers(-1, logical - 1), min_size=slots, max_size=slots))
        if max(old) < 0:
            old[draw(st.integers(0, slots - 1))] = draw(st.integers(0, logical - 1))
        held = sorted({e for e in old if e >= 0})
        shape = draw(st.sampled_from(SHAPES))
        if shape == "rotation":  # rows rotate across ranks: cycles through many ranks
            new = list(np.roll(old, draw(st.integers(1, slots))))
        elif shape == "permutation":
            new = list(draw(st.permutations(old)))
        elif shape == "replicas":
            few = held[: draw(st.integers(1, min(2, len(held))))]
            new = [draw(st.sampled_from(few)) for _ in range(slots)]
        else:
            new = [draw(st.sampled_from(held + [-1])) for _ in range(slots)]
        for slot, value in draw(st.lists(st.tuples(st.integers(0, slots - 1), st.sampled_from(held + [-1])), max_size=3)):
            new[slot] = value  # a few edits: break symmetric patterns
        old_rows.append(old)
        new_rows.append(new)
    return world, np.array(old_rows, dtype=np.int64), np.array(new_rows, dtype=np.int64)


def simulate(layer, schedule: LayerSchedule, old_row: np.ndarray) -> np.ndarray:
    """Slot contents (expert ids) after running ``schedule`` round by round: stashed rows are
    copied first, a round reads everything before it writes, duplicates copy the new row."""
    state = [int(e) for e in old_row]
    stash = {int(s): state[s] for s in schedule.stash_slots}
    for members in schedule.passes:
        reads = [stash.get(int(s), state[s]) for s in layer.src_slot[members]]
        for delivery, value in zip(members, reads):
            state[layer.dst_slot[delivery]] = value
        for dup_dst, delivery in zip(layer.dup_dst_slot, layer.dup_delivery):
            if delivery in members:
                state[dup_dst] = state[layer.dst_slot[delivery]]
    return np.array(state)


def round_rows(layer, members: np.ndarray, whole: bool = False) -> np.ndarray:
    """Staging rows each rank needs for the deliveries ``members``: one per row sent over the
    network, received, or moved locally; ``whole`` (the layer in one pass, no stash): a local
    move whose source no local move writes is copied row to row and needs none."""
    n = layer.num_local
    local_destinations = {int(d) for d, network in zip(layer.dst_slot, layer.is_network) if not network}
    rows = np.zeros(layer.ep_size, dtype=np.int64)
    for src, dst, network in zip(layer.src_slot[members], layer.dst_slot[members], layer.is_network[members]):
        if whole and not network and int(src) not in local_destinations:
            continue
        rows[dst // n] += 1
        if network:
            rows[src // n] += 1
    return rows


def check_layer_schedule(layer, schedule: LayerSchedule, old_row, new_row, capacity: int) -> None:
    """Every delivery once, each round plus the stash within ``capacity`` rows, and the
    simulated result equals the gather reference (untouched where the new id is -1)."""
    every = np.concatenate(schedule.passes) if schedule.passes else np.zeros(0, dtype=np.int64)
    assert np.array_equal(np.sort(every), np.arange(layer.num_deliveries)), "each delivery in exactly one round"
    stash = np.bincount(schedule.stash_slots // layer.num_local, minlength=layer.ep_size)
    whole = len(schedule.passes) == 1 and not schedule.stash_slots.size
    for k, members in enumerate(schedule.passes):
        need = round_rows(layer, members, whole) + stash
        assert (need <= capacity).all(), f"round {k} needs {need.tolist()} rows (stash included), budget {capacity}"
    expected = np.where(new_row >= 0, new_row, old_row)
    got = simulate(layer, schedule, old_row)
    assert np.array_equal(got, expected), f"simulated {got.tolist()}, gather reference {expected.tolist()}"


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_maps())
def test_default_budget_schedules_every_valid_layer(case):
    world, old, new = case
    layer = plan_rearrangement(old, new, world).layers[0]
    num_local = old.shape[1] // world
    schedule = schedule_layer(layer, ROW)  # the default: must never refuse a valid layer
    # one layer of rows; two with one row per rank (a swap needs a send and a receive row)
    check_layer_schedule(layer, schedule, old[0], new[0], max(num_local, 2))
    if num_local == 1 and smallest_budget_bytes(layer, ROW) == ROW:
        check_layer_schedule(layer, schedule, old[0], new[0], 1)  # grows only where it must


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_maps(), st.integers(0, 8), st.integers(0, ROW - 1))
def test_explicit_budget_works_or_names_the_smallest_that_does(case, rows, extra_bytes):
    world, old, new = case
    layer = plan_rearrangement(old, new, world).layers[0]
    budget = rows * ROW + extra_bytes
    try:
        schedule = schedule_layer(layer, ROW, budget)
    except ValueError as exc:
        match = re.search(r"the smallest budget that works is (\d+) bytes", str(exc))
        assert match, str(exc)
        smallest = int(match.group(1))
        assert smallest > budget and smallest == smallest_budget_bytes(layer, ROW)
        check_layer_schedule(layer, schedule_layer(layer, ROW, smallest), old[0], new[0], smallest // ROW)
        with pytest.raises(ValueError, match="too small"):
            schedule_layer(layer, ROW, smallest - 1)
        return
    assert budget >= smallest_budget_bytes(layer, ROW)
    check_layer_schedule(layer, schedule, old[0], new[0], rows)


# -- the real transfer, default budget, on gloo ranks ------------------------------------------
SPECS = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((2,), torch.int32)]


def _rank_default_budget(rank, world, cases):
    """Run every ``(old, new)`` with the default budget; return the mismatching rows per case."""
    found = []
    for old, new in cases:
        weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
        fill_rank_weights(weights, old, rank, seed=7)
        try:
            rearrange_expert_weights_inplace(old, new, weights, timeout_s=60.0)
        except ValueError as exc:
            found.append(f"refused: {exc}")
            continue
        found.append(row_mismatches(weights, old, new, rank, seed=7))
    return found


@pytest.mark.parametrize("world", [pytest.param(w, id=f"W{w}") for w in (2, 3, 5, 8)])
def test_default_budget_transfers_random_valid_maps_on_gloo(world):
    """Hypothesis draws batches of maps; each batch runs in one spawned gloo group."""

    @settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(valid_maps(worlds=(world, world), rows=(1, 4), layers=(1, 2)), min_size=4, max_size=6))
    def check(batch):
        cases = [(old, new) for _, old, new in batch]
        results = run_ranks(world, _rank_default_budget, cases, backend="gloo", timeout_s=240.0, group_timeout_s=60.0)
        for rank, found in enumerate(results):
            for (old, new), result in zip(cases, found):
                assert result == [], f"rank {rank}, old {old.tolist()} new {new.tolist()}: {result}"

    check()


def test_issue_example_default_budget_on_gloo(distributed):
    old, new = np.array([[3, 1, 2, 5, 4, 0, 5, 3]]), np.array([[5, 0, 3, 2, 0, 1, 4, 0]])
    for rank, found in enumerate(distributed(4, _rank_default_budget, [(old, new)])):
        assert found == [[]], f"rank {rank}: {found}"


# -- an explicit budget that is too small: refused everywhere, naming the smallest that works ----
SMALLEST = re.compile(r"the smallest max_buffer_bytes that works for every layer(?: with verify)? is (\d+)")


def _rank_budget(rank, world, old, new, budget, verify):
    """``(error message or None, rows not as expected, weights untouched)`` for one budget."""
    weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, seed=3)
    try:
        rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=budget, verify=verify, timeout_s=60.0)
    except ValueError as exc:
        return str(exc), None, row_mismatches(weights, old, old, rank, seed=3) == []
    return None, row_mismatches(weights, old, new, rank, seed=3), None


@pytest.mark.parametrize("verify", [pytest.param(False, id="plain"), pytest.param(True, id="verify")])
def test_too_small_budget_names_the_smallest_which_then_works_single_rank(verify):
    # one rank, 6 rows rotating: a 6-cycle of local moves; one row of budget cannot hold it
    old = np.array([[5, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]])
    new = np.array([[0, 1, 2, 3, 4, 5], [1, 2, 0, 4, 5, 3]])
    row = make_rank_weights(SPECS, 1, 1)[0]
    cost = sum((t[0].numel() * t.element_size() + 15) // 16 * 16 for t in row) + (16 if verify else 0)
    error, _, untouched = _rank_budget(0, 1, old, new, cost, verify)
    assert error is not None and untouched, error
    smallest = int(SMALLEST.search(error).group(1))
    assert smallest > cost
    error, _, untouched = _rank_budget(0, 1, old, new, smallest - 1, verify)
    assert error is not None and "too small" in error and untouched, error
    error, wrong, _ = _rank_budget(0, 1, old, new, smallest, verify)
    assert error is None and wrong == [], (error, wrong)


def test_too_small_budget_refused_on_every_rank_then_smallest_works(distributed):
    old, new = np.array([[3, 1, 2, 5, 4, 0, 5, 3]]), np.array([[5, 0, 3, 2, 0, 1, 4, 0]])
    refused = distributed(4, _rank_budget, old, new, 20, False)  # less than one expert
    messages = {error for error, _, _ in refused}
    assert len(messages) == 1 and all(untouched for _, _, untouched in refused), refused
    message = messages.pop()
    assert "smaller than one packed expert" in message, message
    smallest = int(SMALLEST.search(message).group(1))
    for rank, (error, wrong, _) in enumerate(distributed(4, _rank_budget, old, new, smallest, False)):
        assert error is None and wrong == [], f"rank {rank}: {error} {wrong}"

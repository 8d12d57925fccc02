"""Reliability of the blocking path: checksums, verify mode, timeouts, layer atomicity, logging.

Faults are injected through ``eplb_triton.transfer.fault_hook`` inside forked gloo ranks:
a rank raises, exits (``os._exit``), stalls, or corrupts a received buffer at a named point.
After every failure, each layer on each rank must be entirely old or entirely new.
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial

import numpy as np
import pytest
import torch

from eplb_triton import transfer
from eplb_triton.checksum import P1, expert_checksums, trailer_bytes
from eplb_triton.comm import PeerTimeoutError
from eplb_triton.testing.launch import run_ranks
from eplb_triton.plan import plan_rearrangement
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from eplb_triton.transfer import rearrange_expert_weights_inplace
from fault_cases import all_to_all_maps, corrupt_in_flight, corrupted_peer_and_expert, exit_at, raise_at, stall_at

SPECS = [
    TensorSpec((3, 5), torch.bfloat16),  # 30 bytes: odd row size
    TensorSpec((7,), torch.float32),
    TensorSpec((2, 3, 3), torch.uint8),  # 3-D row
]
EXPERT_BYTES = 96  # 3 segments of 32 (16-aligned)
TIMEOUT_S = 2.0


# -- helpers ---------------------------------------------------------------------------------
def layer_states(weights, old, new, rank, seed=0) -> list[str]:
    """Per layer: "old", "new", "unchanged" (old == new on this rank) or "MIXED"."""
    not_old = {l for l, _, _ in row_mismatches(weights, old, old, rank, seed)}
    not_new = {l for l, _, _ in row_mismatches(weights, old, new, rank, seed)}
    states = []
    for l in range(len(weights)):
        is_old, is_new = l not in not_old, l not in not_new
        states.append("unchanged" if is_old and is_new else "old" if is_old else "new" if is_new else "MIXED")
    return states


def _rank_run(rank, world, old, new, hook, kwargs, seed=0):
    """Run one rearrangement with ``hook`` installed; return (error or None, states, seconds, stats)."""
    weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, seed)
    transfer.fault_hook = hook  # hooks read info["rank"]
    begin = time.monotonic()
    error, stats = None, None
    try:
        stats = rearrange_expert_weights_inplace(old, new, weights, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        error = exc
        stats = getattr(exc, "stats", None)
    elapsed = time.monotonic() - begin
    transfer.fault_hook = None
    if error is not None:
        time.sleep(0.5)  # let peers see the original failure before this rank tears its group down
    summary = None if error is None else (type(error).__name__, str(error), getattr(error, "layer", None), getattr(error, "peer", None), getattr(error, "expert", None))
    return summary, layer_states(weights, old, new, rank, seed), elapsed, stats


def run_with_faults(world, old, new, hook, **kwargs):
    return run_ranks(world, _rank_run, old, new, hook, kwargs, backend="gloo", timeout_s=60.0, group_timeout_s=30.0, allow_missing=True)


# -- checksum --------------------------------------------------------------------------------
def _python_checksum(data: bytes) -> int:
    words = np.frombuffer(data, dtype="<u4").astype(object)
    w = len(words)
    a = sum(int(u) % P1 * (j + 1) for j, u in enumerate(words)) % P1
    b = sum(int(u) % 2_147_483_629 * (w - j) for j, u in enumerate(words)) % 2_147_483_629
    return a * (1 << 31) + b


@pytest.mark.parametrize("expert_bytes,count", [pytest.param(16, 1, id="EB16-K1"), pytest.param(96, 5, id="EB96-K5"), pytest.param(1024, 3, id="EB1024-K3")])
def test_checksum_matches_plain_python(expert_bytes, count):
    rng = np.random.default_rng(expert_bytes + count)
    raw = rng.integers(0, 256, count * expert_bytes, dtype=np.uint8)
    raw[:4] = 255  # a word >= 2**31: must be read unsigned
    sums = expert_checksums(torch.from_numpy(raw.copy()), expert_bytes)
    want = [_python_checksum(raw[k * expert_bytes : (k + 1) * expert_bytes].tobytes()) for k in range(count)]
    assert sums.tolist() == want


def test_checksum_chunking_is_invisible(monkeypatch):
    rng = np.random.default_rng(5)
    packed = torch.from_numpy(rng.integers(0, 256, 7 * 4096, dtype=np.uint8))
    whole = expert_checksums(packed, 4096)
    monkeypatch.setattr("eplb_triton.checksum._CHUNK_WORDS", 96)  # splits rows and columns
    assert torch.equal(expert_checksums(packed, 4096), whole)


def test_checksum_catches_single_word_changes_and_swaps():
    rng = np.random.default_rng(11)
    base = torch.from_numpy(rng.integers(0, 256, 256, dtype=np.uint8))
    ref = int(expert_checksums(base, 256)[0])
    words = base.view(torch.int32)
    for j in range(words.numel()):
        for delta in (1, -1, P1, 1 << 31, 12345):  # P1: invisible to one modulus alone
            bad = base.clone()
            value = (int(words[j]) & 0xFFFFFFFF) + delta
            bad.view(torch.int32)[j] = int(np.uint32(value % (1 << 32)).view(np.int32))
            if int(bad.view(torch.int32)[j]) == int(words[j]):
                continue
            assert int(expert_checksums(bad, 256)[0]) != ref, (j, delta)
    swapped = base.clone()
    w = swapped.view(torch.int32)
    w[[3, 40]] = w[[40, 3]].clone()
    assert int(expert_checksums(swapped, 256)[0]) != ref


@pytest.mark.parametrize("expert_bytes,count", [pytest.param(16, 3, id="EB16-K3"), pytest.param(4096 + 48, 4, id="EB4144-K4-3blocks")])
def test_checksum_triton_matches_torch(interpreted_on_cpu, expert_bytes, count):
    device = interpreted_on_cpu
    gen = torch.Generator().manual_seed(expert_bytes)
    packed = torch.randint(0, 256, (count * expert_bytes,), generator=gen, dtype=torch.uint8).to(device)
    want = expert_checksums(packed.cpu(), expert_bytes, backend="torch")
    got = expert_checksums(packed, expert_bytes, backend="triton")
    assert torch.equal(got.cpu(), want)
    if device.type == "cuda":  # "auto" picks Triton on CUDA
        assert torch.equal(expert_checksums(packed, expert_bytes).cpu(), want)


def test_checksum_rejects_bad_arguments():
    with pytest.raises(TypeError, match="uint8"):
        expert_checksums(torch.zeros(16, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="multiple of expert_bytes"):
        expert_checksums(torch.zeros(20, dtype=torch.uint8), 16)
    with pytest.raises(ValueError, match="backend"):
        expert_checksums(torch.zeros(16, dtype=torch.uint8), 16, backend="cuda-magic")
    assert trailer_bytes(1) == 16 and trailer_bytes(2) == 16 and trailer_bytes(3) == 32


# -- one rank: rollback of a multi-round layer -----------------------------------------------
def _local_maps():
    # one rank, 6 rows: cycles of local moves, one round per layer
    old = np.tile(np.arange(6), (3, 1))
    new = np.stack([np.roll(old[0], 1), np.roll(old[0], 2), old[0][::-1].copy()])
    return old, new


@pytest.mark.parametrize(
    "point,states",
    [
        pytest.param("layer_start", ["new", "old", "old"], id="between-layers"),
        pytest.param("before_send", ["new", "old", "old"], id="before-send"),
        # after the last (here: only) round is written the layer is committed: no rollback
        pytest.param("pass_applied", ["new", "new", "old"], id="after-commit"),
    ],
)
def test_single_rank_failure_rolls_layer_back(point, states):
    old, new = _local_maps()
    weights = make_rank_weights(SPECS, 3, 6)
    fill_rank_weights(weights, old, 0)
    hits = []

    def hook(where, **info):
        if where == point and info.get("layer") == 1 and info.get("pass_index", 0) == 0:
            hits.append(info)
            raise RuntimeError(f"injected at {where}")

    transfer.fault_hook = hook
    try:
        with pytest.raises(RuntimeError, match="injected"):
            rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=6 * EXPERT_BYTES)
    finally:
        transfer.fault_hook = None
    assert hits
    assert layer_states(weights, old, new, 0) == states


def test_single_rank_mid_layer_failure_in_rounds_is_rolled_back():
    old = np.tile(np.arange(8), (2, 1))
    new = np.stack([old[0][::-1].copy(), old[0][::-1].copy()])  # four 2-cycles per layer
    weights = make_rank_weights(SPECS, 2, 8)
    fill_rank_weights(weights, old, 0)
    passes_seen = []

    def hook(where, **info):
        if where == "pass_applied" and info["layer"] == 1:
            passes_seen.append(info["pass_index"])
            if info["pass_index"] == 2:
                raise RuntimeError("injected mid-layer")

    transfer.fault_hook = hook
    try:
        with pytest.raises(RuntimeError, match="mid-layer"):
            rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=2 * EXPERT_BYTES)
    finally:
        transfer.fault_hook = None
    assert passes_seen == [0, 1, 2]  # passes 0-2 of 4 were written, then undone
    assert layer_states(weights, old, new, 0) == ["new", "old"]
    # without atomic the same failure leaves the layer half-applied: the undo copy is what helps
    fill_rank_weights(weights, old, 0)
    transfer.fault_hook = hook
    try:
        with pytest.raises(RuntimeError):
            rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=2 * EXPERT_BYTES, atomic=False)
    finally:
        transfer.fault_hook = None
    assert layer_states(weights, old, new, 0) == ["new", "MIXED"]


def test_undo_buffer_is_reported_and_only_for_multi_round_layers():
    old = np.tile(np.arange(8), (2, 1))
    new = np.stack([old[0][::-1].copy(), old[0]])
    weights = make_rank_weights(SPECS, 2, 8)
    fill_rank_weights(weights, old, 0)
    stats = rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=2 * EXPERT_BYTES)
    assert row_mismatches(weights, old, new, 0) == []
    assert stats.rounds == 4
    assert stats.peak_undo_bytes == 6 * EXPERT_BYTES  # rows of rounds 1-3; the last round needs none
    assert stats.peak_staging_bytes <= 2 * EXPERT_BYTES
    fill_rank_weights(weights, old, 0)
    stats = rearrange_expert_weights_inplace(old, new, weights)  # default budget: one round
    assert stats.rounds == 1 and stats.peak_undo_bytes == 0


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-1.0, ValueError), ("2", TypeError)])
def test_bad_timeout_is_rejected_before_any_write(bad, error):
    old, new = _local_maps()
    weights = make_rank_weights(SPECS, 3, 6)
    fill_rank_weights(weights, old, 0)
    with pytest.raises(error, match="timeout_s"):
        rearrange_expert_weights_inplace(old, new, weights, timeout_s=bad)
    assert layer_states(weights, old, new, 0) == ["old"] * 3


def _rotation_maps(world=4, num_local=6, layers=2):
    # every expert moves one rank and one row on: one long cycle through every row, which a
    # small budget breaks by stashing a row (read later from the stash, after its row was
    # overwritten by an earlier round)
    old = np.tile(np.arange(world * num_local), (layers, 1))
    return old, np.roll(old, num_local + 1, axis=1)


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_stashed_cycle_in_rounds_verify_and_rollback(verify):
    world, budget = 4, 2 * (EXPERT_BYTES + 16)
    old, new = _rotation_maps()
    ok = run_with_faults(world, old, new, None, max_buffer_bytes=budget, verify=verify, timeout_s=10.0)
    for error, states, _, stats in ok:
        assert error is None and states == ["new", "new"]
        assert stats.rounds > 4 and stats.peak_staging_bytes <= budget and stats.peak_undo_bytes > 0
    hook = partial(raise_at, "pass_applied", 1, 2, 0)  # rank 0, layer 1, after its third pass
    failed = run_with_faults(world, old, new, hook, max_buffer_bytes=budget, verify=verify, timeout_s=TIMEOUT_S)
    assert failed[0][0][1] == "injected at pass_applied"
    for rank, (error, states, _, _) in enumerate(failed):
        assert error is not None and states == ["new", "old"], (rank, error, states)


def _rank_pass_by_pass(rank, world, old, new, verify):
    """The building blocks :meth:`LayerWork.run` drives (pack, exchange, wait, verify, write),
    called one by one outside it: still correct, for callers such as the worker thread."""
    from eplb_triton.comm import Communicator
    from eplb_triton.transfer import prepare_layers

    weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank)
    comm = Communicator.from_group()
    layers = prepare_layers(old, new, weights, comm, 1 << 20, verify=verify)
    staging = torch.empty(max(layer.staging_bytes for layer in layers), dtype=torch.uint8)
    for layer in layers:
        assert not layer.stash_rows.size  # one pass per layer at this budget: nothing read from a stash
        for work in layer.passes:
            if work.framed:  # verify: whole messages with their checksum trailers
                work.pack_local_sources(layer.layout, staging, None)
                work.pack_sends(layer.layout, staging, None)
                for sends, recvs in work.exchanges(staging):
                    comm.wait(comm.exchange(sends, recvs))
            else:  # packs (local sources too) and posts batch by batch
                send_buf, recv_buf, scratch = work._slices(staging)
                requests, _, _ = work.post_batches(layer.layout, send_buf, recv_buf, comm, None, local_buf=scratch)
                comm.wait(requests)
            assert work.verify_received(staging) == []
            work.apply(layer.layout, staging, None)
    return row_mismatches(weights, old, new, rank)


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_building_blocks_pass_by_pass(distributed, verify):
    old, new = all_to_all_maps(4, 2)
    assert distributed(4, _rank_pass_by_pass, old, new, verify) == [[]] * 4


# -- verify ----------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [pytest.param(None, id="one-pass"), pytest.param(4 * (EXPERT_BYTES + 16), id="passes")])
def test_verify_moves_the_right_bytes(budget):
    world = 4
    old, new = all_to_all_maps(world, 3)
    results = run_with_faults(world, old, new, None, verify=True, max_buffer_bytes=budget, timeout_s=10.0)
    plan = plan_rearrangement(old, new, world)
    for rank, (error, states, _, stats) in enumerate(results):
        assert error is None, error
        assert states == ["new", "new", "new"]
        received = sum(int(np.sum(layer.traffic[:, rank])) - int(layer.traffic[rank, rank]) for layer in plan.layers)
        assert stats.verified_experts == received
        assert stats.control_ops == 2 * (world - 1)
        if budget is not None:
            assert stats.rounds > 3 and stats.peak_staging_bytes <= budget
    sent = sum(r[3].total_bytes_sent for r in results)
    assert sent == sum(r[3].total_bytes_received for r in results)
    # wire bytes: 96 per expert + a 16-byte trailer per (layer, round, peer) message
    experts = int(sum((layer.traffic * (1 - np.eye(world, dtype=np.int64))).sum() for layer in plan.layers))
    assert sent > experts * EXPERT_BYTES


@pytest.mark.parametrize(
    "layer,pass_index,budget",
    [
        pytest.param(1, 0, None, id="single-pass"),
        pytest.param(1, 1, 4 * (EXPERT_BYTES + 16), id="second-pass"),
    ],
)
def test_corruption_in_flight_is_caught_and_layer_not_applied(layer, pass_index, budget):
    world = 4
    old, new = all_to_all_maps(world, 3)
    hook = partial(corrupt_in_flight, layer, pass_index)
    results = run_with_faults(world, old, new, hook, verify=True, max_buffer_bytes=budget, timeout_s=10.0)
    for rank, (error, states, _, _) in enumerate(results):
        assert error is not None and error[0] == "ChecksumMismatchError", (rank, error)
        assert f"layer {layer}" in error[1] and "rank 1" in error[1]  # every rank hears about it
        if rank == 1:
            kind, text, err_layer, peer, expert = error
            # the hook corrupted the first expert of the last peer's message in that pass
            want_peer, want_expert = corrupted_peer_and_expert(old, new, world, layer, pass_index, EXPERT_BYTES + 16, budget)
            assert (err_layer, peer, expert) == (layer, want_peer, want_expert)
            assert f"expert {want_expert}" in text and f"peer {want_peer}" in text
            assert states == ["new" if l != layer else "old" for l in range(3)]
        else:
            assert states == ["new", "new", "new"]


def test_without_verify_corruption_goes_through():
    # the hook really corrupts: without checksums the bad byte lands in the weights
    world = 4
    old, new = all_to_all_maps(world, 3)
    results = run_with_faults(world, old, new, partial(corrupt_in_flight, 1, 0), timeout_s=10.0)
    assert [r[0] for r in results] == [None] * world
    assert results[1][1][1] == "MIXED"


# -- peer failures ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "point,budget,at_layer",
    [
        pytest.param("before_send", None, 1, id="before_send"),
        pytest.param("layer_start", None, 1, id="layer_start"),
        pytest.param("before_send", 1 << 20, 1, id="overlapped-before_send"),  # two staging slots
        # stacks of two layers (0-1, then 2): the peer exits as it starts the second stack
        pytest.param("before_send", 1 << 20, 2, id="stacked-before_send"),
    ],
)
def test_peer_exits_every_survivor_names_layer_and_peer(point, budget, at_layer, monkeypatch):
    # the spawned ranks inherit it: one layer per exchange, or stacks of two
    monkeypatch.setenv("EPLB_TRITON_LAYERS_PER_EXCHANGE", "2" if at_layer == 2 else "1")
    world = 4
    old, new = all_to_all_maps(world, 3)
    results = run_with_faults(
        world, old, new, partial(exit_at, point, at_layer, 3), timeout_s=TIMEOUT_S, max_buffer_bytes=budget
    )
    assert results[3] is None  # it exited
    for rank in range(3):
        error, states, elapsed, _ = results[rank]
        assert error is not None, rank
        kind, text, layer, peer, _ = error
        assert kind in ("PeerFailedError", "PeerTimeoutError"), text
        # overlapped: the peer died with layer 0 still in flight (posted, not waited for), so a
        # survivor may miss layer 0's bytes; every layer from the one it names stays old.
        # Stacked: the same with the stack of layers 0-1 in flight (named by its first layer)
        named = {1: (0, 1) if budget else (1,), 2: (0, 2)}[at_layer]
        assert layer in named and peer == 3, text
        assert f"layer {layer}" in text and "peer 3" in text
        assert elapsed < TIMEOUT_S + 3.0
        assert states == ["new"] * layer + ["old"] * (3 - layer), (rank, states)


def test_stalled_peer_times_out_within_timeout():
    world = 4
    old, new = all_to_all_maps(world, 3)
    results = run_with_faults(world, old, new, partial(stall_at, "before_send", 1, 3, 1.5 * TIMEOUT_S), timeout_s=TIMEOUT_S)
    for rank in range(3):
        error, states, elapsed, _ = results[rank]
        kind, text, layer, peer, _ = error
        assert kind == "PeerTimeoutError", text
        assert (layer, peer) == (1, 3) and "timeout_s" in text
        assert 0.8 * TIMEOUT_S < elapsed < 2 * TIMEOUT_S + 2.0, elapsed  # not the group's 30 s
        assert states == ["new", "old", "old"]
    assert results[3][0][1] == "stalled rank gives up"
    assert results[3][1] == ["new", "old", "old"]


def test_peer_dying_before_confirmation_is_reported_everywhere():
    world = 4
    old, new = all_to_all_maps(world, 2)
    results = run_with_faults(world, old, new, partial(exit_at, "before_confirm", None, 3), timeout_s=TIMEOUT_S)
    for rank in range(3):
        error, states, elapsed, _ = results[rank]
        kind, text, layer, peer, _ = error
        assert kind in ("PeerFailedError", "PeerTimeoutError") and peer == 3 and layer is None, text
        assert "final confirmation" in text
        assert states == ["new", "new"]  # all layers completed here before the peer vanished


def _rank_late(rank, world, old, new, late_rank, delay, kwargs):
    if rank == late_rank:
        time.sleep(delay)  # stalls before the input agreement
    return _rank_run(rank, world, old, new, None, kwargs)


def test_stall_before_the_input_agreement_times_out():
    world = 4
    old, new = all_to_all_maps(world, 2)
    results = run_ranks(
        world, _rank_late, old, new, 3, 1.5 * TIMEOUT_S, {"timeout_s": TIMEOUT_S},
        backend="gloo", timeout_s=60.0, group_timeout_s=30.0,
    )
    for rank in range(3):
        error, states, elapsed, _ = results[rank]
        assert error[0] == "PeerTimeoutError" and "input agreement" in error[1], error
        assert 0.8 * TIMEOUT_S < elapsed < TIMEOUT_S + 2.0
        assert states == ["old", "old"]
    error, states, _, _ = results[3]  # the late rank finds its peers gone
    assert error is not None and error[0].startswith("Peer") and states == ["old", "old"], error


@pytest.mark.parametrize(
    "point,pass_index,budget,victim_states",
    [
        pytest.param("layer_start", 0, None, ["new", "old", "old"], id="between-layers"),
        pytest.param("before_send", 0, None, ["new", "old", "old"], id="before-send"),
        pytest.param("in_flight", 0, None, ["new", "old", "old"], id="after-receive"),
        pytest.param("pass_applied", 0, 4 * EXPERT_BYTES, ["new", "old", "old"], id="mid-layer-passes"),
        pytest.param("before_send", 1, 4 * EXPERT_BYTES, ["new", "old", "old"], id="second-pass-before-send"),
        # two staging slots: layer 2 is posted before layer 1 is waited for (overlapped)
        pytest.param("layer_start", 0, 1 << 20, ["new", "old", "old"], id="overlapped-between-layers"),
        pytest.param("in_flight", 0, 1 << 20, ["new", "old", "old"], id="overlapped-after-receive"),
        pytest.param("pass_applied", 0, 1 << 20, ["new", "new", "old"], id="overlapped-after-write"),
    ],
)
def test_injected_failure_leaves_every_layer_old_or_new(point, pass_index, budget, victim_states, monkeypatch):
    monkeypatch.setenv("EPLB_TRITON_LAYERS_PER_EXCHANGE", "1")  # the spawned ranks inherit it
    if budget == 4 * EXPERT_BYTES:  # packed, in passes: sent straight from the weights it fits one
        monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", "0")
    world = 4
    old, new = all_to_all_maps(world, 3)
    hook = partial(raise_at, point, 1, pass_index, 2)
    results = run_with_faults(world, old, new, hook, timeout_s=TIMEOUT_S, max_buffer_bytes=budget)
    victim_error, victim_layers, _, victim_stats = results[2]
    assert victim_error[1] == f"injected at {point}"
    assert victim_layers == victim_states
    named = []
    for rank, (error, states, elapsed, _) in enumerate(results):
        assert "MIXED" not in states, (rank, states)
        if rank != 2:
            # every survivor fails, naming the peer it was waiting on: rank 2, or a survivor
            # that already gave up because of rank 2 (a cascade)
            assert error is not None and error[0] in ("PeerFailedError", "PeerTimeoutError"), error
            assert error[3] is not None and f"peer {error[3]}" in error[1], error
            assert error[2] is None or error[2] >= 1, error  # layer 0 had completed
            assert elapsed < 2 * TIMEOUT_S + 3.0
            named.append(error[3])
    assert 2 in named


@pytest.mark.parametrize(
    "point,at_layer,victim_states",
    [
        # stacks of two layers: 0-1, then 2 (hooks name a stack by its first layer)
        pytest.param("in_flight", 0, ["old", "old", "old"], id="stack-after-receive"),  # received, not written
        pytest.param("pass_applied", 0, ["new", "new", "old"], id="stack-after-write"),
        pytest.param("layer_start", 2, ["new", "new", "old"], id="between-stacks"),
    ],
)
def test_injected_failure_leaves_every_stacked_layer_old_or_new(point, at_layer, victim_states, monkeypatch):
    monkeypatch.setenv("EPLB_TRITON_LAYERS_PER_EXCHANGE", "2")  # the spawned ranks inherit it
    world = 4
    old, new = all_to_all_maps(world, 3)
    results = run_with_faults(world, old, new, partial(raise_at, point, at_layer, 0, 2), timeout_s=TIMEOUT_S, max_buffer_bytes=1 << 20)
    victim_error, victim_layers, _, _ = results[2]
    assert victim_error[1] == f"injected at {point}"
    assert victim_layers == victim_states
    for rank, (error, states, elapsed, stats) in enumerate(results):
        assert "MIXED" not in states, (rank, states)
        if rank != 2:
            assert error is not None and error[0] in ("PeerFailedError", "PeerTimeoutError"), error
            # a stack is named by its first layer; None: every exchange had completed here (the
            # victim had posted the next stack too) and the final confirmation found it gone
            assert error[2] in (0, 2, None), error
            first_old = 3 if error[2] is None else error[2]
            assert states == ["new"] * first_old + ["old"] * (3 - first_old), (rank, states)
            assert stats.failed_layers == list(range(first_old, 3)), stats.failed_layers
            assert elapsed < 2 * TIMEOUT_S + 3.0


# -- logging ---------------------------------------------------------------------------------
def _rank_logged(rank, world, old, new):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.name, record.levelname, record.getMessage()))

    logger = logging.getLogger("eplb_triton")
    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
        fill_rank_weights(weights, old, rank)
        stats = rearrange_expert_weights_inplace(old, new, weights, log_traffic=True, max_buffer_bytes=1 << 20)
        quiet = len(records)
        fill_rank_weights(weights, old, rank)
        rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=1 << 20)
        return records, quiet, stats
    finally:
        logger.removeHandler(handler)


def test_log_traffic_logs_per_peer_bytes_at_info(distributed):
    world = 2
    old, new = all_to_all_maps(world, 2)
    for rank, (records, quiet, stats) in enumerate(distributed(world, _rank_logged, old, new)):
        infos = [m for name, level, m in records[:quiet] if level == "INFO" and name.startswith("eplb_triton")]
        assert len(infos) == 1 and f"rank {rank}: sent {stats.total_bytes_sent} B" in infos[0]
        peer = 1 - rank
        assert f"{{{peer}: {int(stats.bytes_sent[peer])}}}" in infos[0]
        assert len(records) == quiet  # without log_traffic nothing at INFO
        assert len(stats.layer_times_s) == 2 and all(t > 0 for t in stats.layer_times_s)


# -- the NCCL polling path, with stand-in requests (no GPU here) -------------------------------
class _FakeWork:
    def __init__(self, done_after_s: float | None):
        self.born = time.monotonic()
        self.done_after_s = done_after_s
        self.waited = False

    def is_completed(self) -> bool:
        return self.done_after_s is not None and time.monotonic() - self.born >= self.done_after_s

    def wait(self, timeout=None):
        assert self.is_completed(), "NCCL requests are only waited on (stream order) once complete"
        self.waited = True
        return True


def _nccl_comm():
    from eplb_triton.comm import Communicator

    return Communicator(group=None, rank=0, world_size=4, dist_backend="nccl")  # group None: abort is a no-op


def test_nccl_poll_names_the_pending_peers_at_the_deadline():
    works = [_FakeWork(0.0), _FakeWork(None), _FakeWork(0.05), _FakeWork(None)]
    labels = [(1, "recv"), (2, "recv"), (2, "send"), (3, "send")]
    begin = time.monotonic()
    with pytest.raises(PeerTimeoutError, match=r"layer 5, pass 1/1: rank 0 waited 0.3 s .* peers \[2, 3\]") as info:
        _nccl_comm().wait(works, timeout_s=0.3, labels=labels, where="layer 5, pass 1/1")
    assert 0.3 <= time.monotonic() - begin < 1.5
    assert info.value.peer is None  # two peers pending: the message names both, .peer only a single one


def test_nccl_poll_completes_and_orders_the_stream():
    works = [_FakeWork(0.0), _FakeWork(0.05)]
    _nccl_comm().wait(works, timeout_s=5.0, labels=[(1, "recv"), (1, "send")])
    assert all(w.waited for w in works)


def test_nccl_coalesced_request_names_every_peer_of_the_batch():
    with pytest.raises(PeerTimeoutError, match=r"for peers \[1\]") as info:  # one peer (world 2): named
        _nccl_comm().wait([_FakeWork(None)], timeout_s=0.1, labels=[(1, "recv"), (1, "send")])
    assert info.value.peer == 1
    with pytest.raises(PeerTimeoutError, match=r"for peers \[1, 3\]") as info:  # several: all named
        _nccl_comm().wait([_FakeWork(None)], timeout_s=0.1, labels=[(1, "recv"), (3, "send")])
    assert info.value.peer is None


# -- backend errors raised while posting ---------------------------------------------------------
class _PostingComm:
    """A 2-rank gloo Communicator whose ops never leave the process (group is a placeholder)."""

    @staticmethod
    def make(rank=0, world=2):
        from eplb_triton.comm import Communicator

        class Local(Communicator):
            def global_rank(self, peer):
                return peer

            def agree_start(self, error, fingerprints=0, *, timeout_s=None, describe=None):  # one process: nobody to agree with
                def finish():
                    if error is not None:
                        raise error

                return finish

        return Local(group=object(), rank=rank, world_size=world, dist_backend="gloo")


def _closed_pair(dead_peer, posted):
    """``dist.isend``/``dist.irecv`` stand-ins: gloo raises at once for a peer whose connection closed."""

    def post(kind):
        def op(tensor, peer, group=None, tag=0):
            if peer == dead_peer:
                raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
            posted.append((peer, kind))
            return _FakeWork(0.0)

        return op

    return post("send"), post("recv")


def test_posting_to_a_closed_peer_raises_peer_failed_naming_it(monkeypatch):
    from eplb_triton.comm import PeerFailedError

    posted = []
    isend, irecv = _closed_pair(3, posted)
    monkeypatch.setattr(torch.distributed, "isend", isend)
    monkeypatch.setattr(torch.distributed, "irecv", irecv)
    comm = _PostingComm.make(world=4)
    t = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(PeerFailedError) as info:
        comm.exchange({1: t, 3: t}, {1: t, 3: t}, where="layer 1, pass 1/2")
    assert info.value.peer == 3
    assert str(info.value).startswith("layer 1, pass 1/2: rank 0: recv with peer 3 failed: ") and "pair.cc" in str(info.value)
    assert posted == [(1, "recv"), (1, "send")]  # ascending peers, receive first, until the failure


def test_posting_failure_names_the_layer_and_leaves_it_old(monkeypatch):
    # layer 0 is local only; layer 1 receives from peer 1, whose connection is closed when posting
    from eplb_triton.comm import PeerFailedError
    from eplb_triton.transfer import TransferStats, prepare_layers

    old = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = np.array([[1, 0, 2, 3], [2, 1, 2, 3]])
    weights = make_rank_weights(SPECS, 2, 2)
    fill_rank_weights(weights, old, 0)
    isend, irecv = _closed_pair(1, [])
    monkeypatch.setattr(torch.distributed, "isend", isend)
    monkeypatch.setattr(torch.distributed, "irecv", irecv)
    comm = _PostingComm.make()
    layers = prepare_layers(old, new, weights, comm)
    staging = torch.empty(max(layer.staging_bytes for layer in layers), dtype=torch.uint8)
    stats = TransferStats.empty(0, 2)
    layers[0].run(staging, comm, "torch", stats, timeout_s=1.0)
    with pytest.raises(PeerFailedError) as info:
        layers[1].run(staging, comm, "torch", stats, timeout_s=1.0)
    assert (info.value.layer, info.value.peer) == (1, 1) and "layer 1, pass 1/1" in str(info.value), info.value
    assert layer_states(weights, old, new, 0) == ["new", "old"]


def test_a_deadlines_poll_spins_first_then_sleeps(monkeypatch):
    """A wait with ``timeout_s`` checks completion on the host: for its first
    ``POLL_SPIN_S`` it only yields (``sleep(0)``), so a layer that completes is seen within
    microseconds; later it sleeps 0.2 ms between checks (runs 70-71: the sleeps alone made
    48-layer calls with a deadline 1.53-2.11x slower, the spin 1.17-1.60x)."""
    from eplb_triton import comm

    slept = []
    monkeypatch.setattr(comm.time, "sleep", slept.append)
    for waited in (0.0, comm.POLL_SPIN_S / 2, comm.POLL_SPIN_S * 2):
        comm.poll_pause(waited)
    assert slept == [0, 0, comm._POLL_SLEEP_S]

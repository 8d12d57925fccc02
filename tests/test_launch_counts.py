"""The README's "one Triton launch" claim: a pass packs every peer's rows with one launch and
unpacks every received row with one (one per peer with ``verify`` on the blocking path); the
worker packs a pass's sends with one launch and swaps a layer in with one; a one-pass layer's
direct local moves take one copy launch. With room for both layers the blocking path stacks
them (:mod:`eplb_triton.stacked`): one pass, hence one launch of each kind, for the two.

Launches are counted at ``ExpertLayout.launch`` (the Triton backend through the interpreter),
on maps where every row comes from another rank: each rank sends to and receives from every
peer, with no local move and no replica, so every launch is a network pack or unpack.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from eplb_triton import TransferWorker, rearrange_expert_weights_inplace
from eplb_triton.layout import ExpertLayout
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches

pytestmark = pytest.mark.interpreter  # launches counted on CPU tensors, through the interpreter

SPECS = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((1,), torch.int32)]
WORLD, NUM_LOCAL, LAYERS = 4, 3, 2


def every_row_from_another_rank(layers: int = LAYERS) -> tuple[np.ndarray, np.ndarray]:
    """Row ``i`` of rank ``r`` gets the expert of row ``i`` of rank ``(r + 1 + i) % WORLD``:
    a permutation (no replica), never local, each rank fed by all three peers."""
    old = np.tile(np.arange(WORLD * NUM_LOCAL), (layers, 1))
    new = np.empty_like(old)
    for r in range(WORLD):
        for i in range(NUM_LOCAL):
            new[:, r * NUM_LOCAL + i] = old[:, ((r + 1 + i) % WORLD) * NUM_LOCAL + i]
    return old, new


def _rank_launches(rank, world, old, new, path, verify):
    weights = make_rank_weights(SPECS, old.shape[0], NUM_LOCAL)
    fill_rank_weights(weights, old, rank)
    counts = Counter()
    original = ExpertLayout.launch

    def counting(self, mode, buf, src_rows=None, dst_rows=None, tuning=None, compile_only=False):
        if not compile_only:
            counts[mode] += 1
        return original(self, mode, buf, src_rows, dst_rows, tuning, compile_only)

    ExpertLayout.launch = counting
    try:
        if path == "blocking":
            stats = rearrange_expert_weights_inplace(old, new, weights, backend="triton", verify=verify, max_buffer_bytes=1 << 20)
            rounds = stats.rounds
        else:
            with TransferWorker(weights, backend="triton", verify=verify, max_buffer_bytes=1 << 20) as worker:
                worker.submit(old, new)
                rounds = worker.wait().rounds
    finally:
        ExpertLayout.launch = original
    return dict(counts), rounds, row_mismatches(weights, old, new, rank)


@pytest.mark.parametrize(
    "path,verify,per_pass,passes",
    [
        pytest.param("blocking", False, {"pack": 1, "unpack": 1}, 1, id="blocking-stacked"),
        pytest.param("blocking", True, {"pack": WORLD - 1, "unpack": WORLD - 1}, LAYERS, id="blocking-verify-one-per-peer"),
        pytest.param("worker", False, {"pack": 1, "unpack": 1}, LAYERS, id="worker"),
        pytest.param("worker", True, {"pack": 1, "unpack": 1}, LAYERS, id="worker-verify"),
    ],
)
def test_one_launch_per_pack_and_unpack(distributed, path, verify, per_pass, passes):
    old, new = every_row_from_another_rank()
    results = distributed(WORLD, _rank_launches, old, new, path, verify)
    for rank, (counts, rounds, bad) in enumerate(results):
        assert bad == [], f"rank {rank}: wrong rows {bad[:8]}"
        assert rounds == passes  # the budget holds both layers: one pass per layer, or one for both
        assert counts == {mode: n * passes for mode, n in per_pass.items()}, (rank, counts)


def test_one_launch_per_pack_and_unpack_per_layer_unstacked(distributed, monkeypatch):
    monkeypatch.setenv("EPLB_TRITON_LAYERS_PER_EXCHANGE", "1")  # the spawned ranks inherit it
    monkeypatch.setenv("EPLB_TRITON_DIRECT_SENDS", "0")  # packed: runs of rows would skip the pack
    old, new = every_row_from_another_rank()
    results = distributed(WORLD, _rank_launches, old, new, "blocking", False)
    for rank, (counts, rounds, bad) in enumerate(results):
        assert bad == [], f"rank {rank}: wrong rows {bad[:8]}"
        assert rounds == LAYERS
        assert counts == {"pack": LAYERS, "unpack": LAYERS}, (rank, counts)


def test_direct_local_moves_take_one_copy_launch(distributed):
    """A one-pass layer with local moves whose source no local move writes copies them row to
    row with one more launch (no staging): per pass one pack (sends), one copy, one unpack."""
    # two ranks of three rows: row 0 of each rank is received, its old expert moves locally to
    # the next row (whose old expert is sent), row 2 stays
    old = np.tile(np.arange(6), (LAYERS, 1))
    new = np.tile(np.array([3, 0, 2, 1, 3, 5]), (LAYERS, 1))
    results = distributed(2, _rank_launches, old, new, "blocking", False)
    for rank, (counts, rounds, bad) in enumerate(results):
        assert bad == [], f"rank {rank}: wrong rows {bad[:8]}"
        assert rounds == 1  # the two layers stacked
        assert counts == {"pack": 1, "copy": 1, "unpack": 1}, (rank, counts)

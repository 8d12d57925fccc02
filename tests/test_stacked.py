"""Stacked layers (:mod:`eplb_triton.stacked`): the stacked layout's pack / unpack / copy against the
per-layer layouts, byte for byte (torch reference, and the Triton kernel's ``LAYERED`` path on the
device or through the interpreter), the stacked pass's wire order, and which layers
:func:`stack_groups` picks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from eplb_triton import plan_rearrangement
from eplb_triton.layout import ExpertLayout
from eplb_triton.plan import RankPlan
from eplb_triton.stacked import StackedLayout, layers_per_exchange, stack_groups, stack_key, stack_views, stacked_rank_views
from map_cases import random_maps
from test_layout import random_tensors

# odd row bytes (30, 7, 4), a 3-D tensor, mixed dtypes
SPECS = [((3, 5), torch.bfloat16), ((7,), torch.uint8), ((2, 2, 2), torch.float32), ((4,), torch.float8_e4m3fn)]
NUM_LOCAL = 5


def layers_on(device: torch.device, count: int, seed: int = 0) -> list[list[torch.Tensor]]:
    return [[t.to(device) for t in random_tensors(SPECS, NUM_LOCAL, seed=seed + i)] for i in range(count)]


def expected_pack(layers, rows) -> torch.Tensor:
    """Stacked row ``r`` packed by its own layer's torch reference."""
    layout = ExpertLayout(layers[0])
    out = []
    for r in rows:
        one = torch.zeros(layout.expert_bytes, dtype=torch.uint8, device=layers[0][0].device)
        ExpertLayout(layers[r // NUM_LOCAL]).pack([r % NUM_LOCAL], one, backend="torch")
        out.append(one)
    return torch.cat(out)


def segments(layout: ExpertLayout, packed: torch.Tensor) -> list[torch.Tensor]:
    """The bytes of ``packed`` that carry data (not the padding between segments)."""
    table = packed.view(-1, layout.expert_bytes)
    return [table[:, off : off + n] for off, n in zip(layout.segment_offsets, layout.row_bytes)]


@pytest.fixture(params=["torch", "triton"])
def backend(request, device):
    if request.param == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    return request.param


@pytest.mark.parametrize("count", [pytest.param(1, id="one-layer"), pytest.param(3, id="three-layers")])
def test_stacked_pack_unpack_copy_match_the_layers(device, backend, count):
    layers = layers_on(device, count)
    before = [[t.clone() for t in tensors] for tensors in layers]
    stacked = StackedLayout([ExpertLayout(tensors) for tensors in layers])
    total = count * NUM_LOCAL
    rng = np.random.default_rng(count)
    rows = rng.integers(0, total, size=2 * total)  # repeats allowed in a pack
    rows_t = torch.as_tensor(rows, device=device)
    packed = torch.full((rows.size * stacked.expert_bytes,), 0xA5, dtype=torch.uint8, device=device)  # poisoned
    stacked.move("pack", packed, src_rows=rows_t, backend=backend)
    want = expected_pack(before, rows)
    for got, exp in zip(segments(stacked, packed), segments(stacked, want)):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)

    # unpack into distinct rows across the layers: a permutation of every stacked row
    dst = rng.permutation(total)
    source = expected_pack(before, rng.permutation(total))
    stacked.move("unpack", source, dst_rows=torch.as_tensor(dst, device=device), backend=backend)
    for k, r in enumerate(dst):
        one = torch.zeros(stacked.expert_bytes, dtype=torch.uint8, device=device)
        ExpertLayout(layers[r // NUM_LOCAL]).pack([r % NUM_LOCAL], one, backend="torch")
        for got, exp in zip(segments(stacked, one), segments(stacked, source[k * stacked.expert_bytes :][: stacked.expert_bytes])):
            torch.testing.assert_close(got, exp, rtol=0, atol=0)

    # copies stay inside a layer: row 1 -> 3 and 4 -> 0 of every layer (sources not written)
    now = [[t.clone() for t in tensors] for tensors in layers]
    src = np.concatenate([[s * NUM_LOCAL + 1, s * NUM_LOCAL + 4] for s in range(count)])
    dst = np.concatenate([[s * NUM_LOCAL + 3, s * NUM_LOCAL + 0] for s in range(count)])
    stacked.move("copy", None, src_rows=torch.as_tensor(src, device=device), dst_rows=torch.as_tensor(dst, device=device), backend=backend)
    for s in range(count):
        for t, old in zip(layers[s], now[s]):
            for a, b in ((1, 3), (4, 0)):
                torch.testing.assert_close(t[b].view(torch.uint8), old[a].view(torch.uint8), rtol=0, atol=0)
            torch.testing.assert_close(t[2].view(torch.uint8), old[2].view(torch.uint8), rtol=0, atol=0)  # untouched


def test_stacking_needs_equal_row_shapes():
    a = ExpertLayout(random_tensors(SPECS, NUM_LOCAL))
    b = ExpertLayout(random_tensors(SPECS[:2], NUM_LOCAL))
    c = ExpertLayout(random_tensors(SPECS, NUM_LOCAL + 1))
    assert stack_key(a) != stack_key(b) and stack_key(a) != stack_key(c)
    with pytest.raises(ValueError, match="same device, num_local and row bytes"):
        StackedLayout([a, b])


def test_stacked_view_keeps_each_peers_layer_order():
    def view(send, recv, local=((), ())):
        return RankPlan(
            rank=0,
            send_rows={p: np.array(r) for p, r in send.items()},
            recv_rows={p: np.array(r) for p, r in recv.items()},
            local_src_rows=np.array(local[0], dtype=np.int64),
            local_dst_rows=np.array(local[1], dtype=np.int64),
            dup_src_rows=np.zeros(0, dtype=np.int64),
            dup_dst_rows=np.zeros(0, dtype=np.int64),
        )

    first = view({1: [0, 2], 2: [1]}, {1: [3]}, local=([4], [1]))
    second = view({2: [4]}, {1: [0], 3: [2]})
    both = stack_views([first, second], NUM_LOCAL)
    assert {p: r.tolist() for p, r in both.send_rows.items()} == {1: [0, 2], 2: [1, 9]}
    assert {p: r.tolist() for p, r in both.recv_rows.items()} == {1: [3, 5], 3: [7]}
    assert (both.local_src_rows.tolist(), both.local_dst_rows.tolist()) == ([4], [1])


def test_layers_per_exchange_from_the_environment(monkeypatch):
    monkeypatch.setenv("EPLB_TRITON_LAYERS_PER_EXCHANGE", "3")
    assert layers_per_exchange() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("EPLB_TRITON_LAYERS_PER_EXCHANGE", bad)
        with pytest.raises(ValueError, match="EPLB_TRITON_LAYERS_PER_EXCHANGE must be an int"):
            layers_per_exchange()


@pytest.mark.parametrize("world", [pytest.param(2, id="W2"), pytest.param(4, id="W4"), pytest.param(8, id="W8")])
def test_stacked_views_match_the_layers_views_side_by_side(world):
    """The one-pass computation of every stack's view equals the layers' own views joined (random
    maps with replicas and empty slots); every rank's sends to a peer match that peer's receives."""
    rng = np.random.default_rng(world)
    old, new = random_maps(rng, 7, world, 4, 3 * world)
    plan = plan_rearrangement(old, new, world)
    groups = [[0, 1, 2], [4, 5], [6]]
    for rank in range(world):
        got = stacked_rank_views(plan.layers, rank, groups)
        for group, view in zip(groups, got):
            want = stack_views([plan.layers[i].rank(rank) for i in group], 4)
            for name in ("send_rows", "recv_rows"):
                assert {p: r.tolist() for p, r in getattr(view, name).items()} == {
                    p: r.tolist() for p, r in getattr(want, name).items()
                }, (rank, group, name)
            for name in ("local_src_rows", "local_dst_rows", "dup_src_rows", "dup_dst_rows"):
                assert getattr(view, name).tolist() == getattr(want, name).tolist(), (rank, group, name)
    # a sender's rows to q are q's rows from the sender, expert for expert
    views = [stacked_rank_views(plan.layers, rank, groups) for rank in range(world)]
    for k, group in enumerate(groups):
        for a in range(world):
            for b, rows in views[a][k].send_rows.items():
                sent = [old[group[r // 4], a * 4 + r % 4] for r in rows]
                got = [new[group[r // 4], b * 4 + r % 4] for r in views[b][k].recv_rows[a]]
                assert sent == got, (group, a, b)


def test_stack_groups_follow_the_rules():
    keys = [("a",)] * 5 + [("b",)] * 2
    staging = np.array([[2, 2]] * 7)  # bytes per rank
    ok = [True, True, False, True, True, True, True]
    # a layer that cannot stack and a new row shape end a run; lone layers are left out
    assert stack_groups(ok, keys, staging, 100, 2) == [[0, 1], [3, 4], [5, 6]]
    assert stack_groups(ok, keys, staging, 100, 4) == [[0, 1], [3, 4], [5, 6]]
    assert stack_groups([True] * 5, keys[:5], staging[:5], 100, 2) == [[0, 1], [2, 3]]  # at most 2
    assert stack_groups([True] * 5, keys[:5], staging[:5], 100, 3) == [[0, 1, 2], [3, 4]]
    assert stack_groups([True] * 5, keys[:5], staging[:5], 3, 4) == []  # two layers need 4 bytes on each rank
    # the slot must hold the stack on every rank: here each rank needs 2 of 2 for two layers
    alternating = np.array([[2, 0], [0, 2], [2, 0]])
    assert stack_groups([True] * 3, keys[:3], alternating, 2, 4) == [[0, 1]]

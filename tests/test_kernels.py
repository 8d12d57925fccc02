"""Triton pack / unpack / copy_rows against the torch reference, byte for byte.

On a machine without CUDA the `device` fixture's "cpu" case runs the kernels through the
Triton interpreter (conftest sets TRITON_INTERPRET=1); the "cuda" case (gpu marker) runs them
compiled. Inputs are random bytes (never zeros) and outputs are poisoned before every op.
Sizes stay small so the interpreter stays fast.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from eplb_triton.layout import ExpertLayout, KernelTuning, resolve_backend

POISON = 0xA5

# (trailing shape, dtype) per tensor of a layer.
ODD = [((5,), torch.uint8), ((3,), torch.float32), ((7170,), torch.bfloat16)]  # 5, 12, 14340 bytes
MIXED_3D = [((4, 8, 3), torch.bfloat16), ((2, 3), torch.float32), ((16,), torch.float8_e4m3fn), ((7, 2, 2), torch.int32)]
ALIGNED = [((64, 32), torch.bfloat16), ((32,), torch.float32), ((8, 16), torch.float8_e4m3fn)]
LAYERS = [
    pytest.param(ODD, id="odd-5-12-14340B"),
    pytest.param(MIXED_3D, id="3d-mixed-fp8"),
    pytest.param(ALIGNED, id="aligned-16B"),
]

# A tuning with tiny chunks and tiles: rows split into many chunks, many programs, each
# program looping over several chunks (the grid-stride path).
TINY_CHUNKS = KernelTuning(block_words=8, byte_block=16, programs_per_sm=3, waves=2, min_chunk=64, max_chunk=64, prefetch=True)
TUNINGS = [
    pytest.param(TINY_CHUNKS, id="64B-chunks-prefetch"),
    pytest.param(KernelTuning(block_words=4, byte_block=8, programs_per_sm=5, min_chunk=256, max_chunk=256, prefetch=False, blocked=True), id="256B-chunks-16B-tiles-blocked-no-prefetch"),
    pytest.param(KernelTuning(block_words=16, programs_per_sm=7, min_chunk=128, max_chunk=128, balance=True, streaming=True, blocked=True, prefetch=True), id="128B-blocked-prefetch-balanced-streaming"),
]


@pytest.fixture(autouse=True)
def _cpu_needs_interpreter(request):
    """CPU cases run the kernels through the interpreter, which conftest turns on only on
    machines without CUDA; on a GPU machine they are skipped (the cuda cases run instead)."""
    if "device" in request.fixturenames and request.getfixturevalue("device").type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_bytes(nbytes: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def random_layer(specs, num_local: int, device, seed: int = 0, offset_bytes: int = 0) -> list[torch.Tensor]:
    """Random tensors ``(num_local, *shape)``; ``offset_bytes`` > 0 makes each one a view whose
    base sits that many bytes into a larger buffer (not 16-byte aligned)."""
    gen = _gen(seed)
    tensors = []
    for shape, dtype in specs:
        elem = torch.empty(0, dtype=dtype).element_size()
        nbytes = num_local * math.prod(shape) * elem
        raw = random_bytes(nbytes + offset_bytes + 16, gen).to(device)
        tensors.append(raw[offset_bytes : offset_bytes + nbytes].view(dtype).view(num_local, *shape))
    return tensors


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8).cpu()


def assert_same_bytes(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = as_bytes(a), as_bytes(e)
        bad = (a != e).nonzero().flatten()
        assert bad.numel() == 0, f"tensor {i}: {bad.numel()} bytes differ, first at byte {int(bad[0])}"


def clone_layer(tensors):
    return [t.clone() for t in tensors]


def pack_both(specs, num_local, rows, device, tuning=None, spare=37, buf_offset=0, seed=0):
    """Pack ``rows`` with the kernel and the reference into poisoned buffers; returns both."""
    tensors = random_layer(specs, num_local, device, seed=seed)
    layout = ExpertLayout(tensors)
    need = len(rows) * layout.expert_bytes
    out = torch.full((buf_offset + need + spare,), POISON, dtype=torch.uint8, device=device)
    ref = out.clone()
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
    if tuning is None:
        layout.pack(rows, out[buf_offset:], backend="triton")
    else:
        layout.launch("pack", out[buf_offset:], src_rows=rows_t, tuning=tuning)
    layout.pack_reference(rows_t, ref[buf_offset : buf_offset + need])
    return out, ref, layout


def pack_rows_cases(num_local: int):
    rng = np.random.default_rng(num_local)
    return {
        "one-expert": [num_local - 1],
        "every-expert-unsorted": list(rng.permutation(num_local)),
        "repeated": [1, 1, 0, 1, num_local - 1, 0],
    }


@pytest.mark.parametrize("rows_case", ["one-expert", "every-expert-unsorted", "repeated"])
@pytest.mark.parametrize("specs", LAYERS)
def test_pack_matches_reference(device, specs, rows_case):
    rows = pack_rows_cases(5)[rows_case]
    out, ref, _ = pack_both(specs, 5, rows, device)
    assert torch.equal(out.cpu(), ref.cpu())


def test_pack_leaves_spare_bytes_and_padding(device):
    out, ref, layout = pack_both(ODD, 4, [2, 0], device, spare=100)
    out = out.cpu()
    assert torch.equal(out, ref.cpu())
    need = 2 * layout.expert_bytes
    assert bool((out[need:] == POISON).all()), "pack wrote past the packed experts"
    # padding after tensor 0's 5-byte segment is never written
    pad = out[layout.segment_offsets[0] + 5 : layout.segment_offsets[1]]
    assert bool((pad == POISON).all())


@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("specs", LAYERS)
def test_pack_many_chunks_per_row(device, specs, tuning):
    """Rows split into small chunks over a persistent grid of several programs."""
    out, ref, _ = pack_both(specs, 5, [4, 2, 2, 0, 3], device, tuning=tuning)
    assert torch.equal(out.cpu(), ref.cpu())


def test_pack_into_unaligned_buffer(device):
    """A packed buffer at an odd address takes the byte path for every tensor."""
    out, ref, _ = pack_both(ALIGNED, 3, [2, 1], device, buf_offset=3)
    assert torch.equal(out.cpu(), ref.cpu())


@pytest.mark.parametrize("offset", [pytest.param(3, id="base+3B"), pytest.param(6, id="base+6B"), pytest.param(4, id="base+4B")])
def test_pack_unpack_unaligned_views(device, offset):
    specs = [((24,), torch.uint8), ((40,), torch.uint8)] if offset == 3 else [((12, 2), torch.bfloat16), ((16,), torch.bfloat16)]
    if offset == 4:
        specs = [((9,), torch.float32), ((32,), torch.float32)]
    tensors = random_layer(specs, 4, device, seed=3, offset_bytes=offset)
    assert all(t.data_ptr() % 16 for t in tensors)
    layout = ExpertLayout(tensors)
    rows = [3, 0, 3]
    out = torch.full((3 * layout.expert_bytes,), POISON, dtype=torch.uint8, device=device)
    ref = out.clone()
    layout.pack(rows, out, backend="triton")
    layout.pack(rows, ref, backend="torch")
    assert torch.equal(out.cpu(), ref.cpu())

    expected = clone_layer(tensors)
    ExpertLayout(expected).unpack(ref[: 2 * layout.expert_bytes], [1, 2], backend="torch")
    layout.unpack(ref[: 2 * layout.expert_bytes], [1, 2], backend="triton")
    assert_same_bytes(tensors, expected)


def unpack_both(specs, num_local, rows, device, tuning=None, seed=0):
    tensors = random_layer(specs, num_local, device, seed=seed)  # random contents act as poison
    expected = clone_layer(tensors)
    layout = ExpertLayout(tensors)
    buf = random_bytes(len(rows) * layout.expert_bytes + 11, _gen(seed + 1)).to(device)
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
    if tuning is None:
        layout.unpack(buf, rows, backend="triton")
    else:
        layout.launch("unpack", buf, dst_rows=rows_t, tuning=tuning)
    ExpertLayout(expected).unpack_reference(buf[: len(rows) * layout.expert_bytes], rows_t)
    return tensors, expected


@pytest.mark.parametrize("rows_case", ["one-expert", "every-expert-unsorted"])
@pytest.mark.parametrize("specs", LAYERS)
def test_unpack_matches_reference(device, specs, rows_case):
    rows = pack_rows_cases(5)[rows_case]
    tensors, expected = unpack_both(specs, 5, rows, device)
    assert_same_bytes(tensors, expected)


@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("specs", LAYERS)
def test_unpack_many_chunks_per_row(device, specs, tuning):
    tensors, expected = unpack_both(specs, 6, [5, 0, 3], device, tuning=tuning)
    assert_same_bytes(tensors, expected)


def test_one_local_expert(device):
    out, ref, _ = pack_both(MIXED_3D, 1, [0, 0], device)
    assert torch.equal(out.cpu(), ref.cpu())
    tensors, expected = unpack_both(MIXED_3D, 1, [0], device)
    assert_same_bytes(tensors, expected)


def test_unpack_repeated_rows_raise_before_writing(device):
    tensors = random_layer(ALIGNED, 4, device)
    before = clone_layer(tensors)
    layout = ExpertLayout(tensors)
    buf = random_bytes(3 * layout.expert_bytes, _gen(9)).to(device)
    with pytest.raises(ValueError, match="destination rows repeat"):
        layout.unpack(buf, [2, 0, 2], backend="triton")
    with pytest.raises(ValueError, match="destination rows repeat"):
        layout.unpack(buf, torch.tensor([1, 1, 3], device=device), backend="triton")
    assert_same_bytes(tensors, before)


@pytest.mark.parametrize(
    "src,dst",
    [
        pytest.param([0, 3], [1, 2], id="disjoint-one-launch"),
        pytest.param([0, 0, 0], [1, 2, 4], id="duplicates"),
        pytest.param([1, 3], [3, 1], id="swap-overlap"),
        pytest.param([1, 2, 3, 4, 0], [0, 1, 2, 3, 4], id="cycle-overlap"),
        pytest.param([2, 2, 0], [0, 4, 2], id="duplicates-overlap"),
    ],
)
@pytest.mark.parametrize("specs", [LAYERS[0], LAYERS[1]])
@pytest.mark.parametrize("with_scratch", [False, True], ids=["no-scratch", "scratch"])
def test_copy_rows_matches_reference(device, specs, src, dst, with_scratch):
    tensors = random_layer(specs, 5, device, seed=4)
    expected = clone_layer(tensors)
    layout = ExpertLayout(tensors)
    scratch = None
    if with_scratch:
        scratch = torch.full((len(src) * layout.expert_bytes + 5,), POISON, dtype=torch.uint8, device=device)
    layout.copy_rows(np.array(src), np.array(dst), backend="triton", scratch=scratch)
    ref_layout = ExpertLayout(expected)
    ref_layout.copy_rows(np.array(src), np.array(dst), backend="torch")
    assert_same_bytes(tensors, expected)


@pytest.mark.parametrize(
    "tuning", [*TUNINGS, pytest.param(KernelTuning(min_chunk=64, max_chunk=64, prefetch=False), id="64B-cyclic-no-prefetch")]
)
def test_copy_rows_many_chunks(device, tuning):
    tensors = random_layer(MIXED_3D, 5, device, seed=6)
    expected = clone_layer(tensors)
    layout = ExpertLayout(tensors)
    src = torch.tensor([4, 4, 0], device=device)
    dst = torch.tensor([1, 2, 3], device=device)
    layout.launch("copy", None, src_rows=src, dst_rows=dst, tuning=tuning)
    ExpertLayout(expected).copy_rows_reference(src, dst)
    assert_same_bytes(tensors, expected)


def test_rows_as_device_tensor(device):
    """Rows given as a tensor on the weights' device (checked with one host copy)."""
    tensors = random_layer(MIXED_3D, 6, device, seed=8)
    layout = ExpertLayout(tensors)
    rows = torch.tensor([5, 1, 1], device=device, dtype=torch.int32)
    out = torch.full((3 * layout.expert_bytes,), POISON, dtype=torch.uint8, device=device)
    ref = out.clone()
    layout.pack(rows, out, backend="triton")
    layout.pack(rows, ref, backend="torch")
    assert torch.equal(out.cpu(), ref.cpu())


def test_roundtrip_every_expert(device):
    """pack(every row) then unpack into a fresh layer of the same layout gives the same bytes."""
    tensors = random_layer(MIXED_3D, 7, device, seed=11)
    other = random_layer(MIXED_3D, 7, device, seed=12)
    layout, other_layout = ExpertLayout(tensors), ExpertLayout(other)
    rows = np.random.default_rng(1).permutation(7)
    buf = torch.full((7 * layout.expert_bytes,), POISON, dtype=torch.uint8, device=device)
    layout.pack(rows, buf, backend="triton")
    other_layout.unpack(buf, rows, backend="triton")
    assert_same_bytes(other, tensors)


@pytest.mark.parametrize(
    "specs",
    [
        pytest.param([((0,), torch.float32)], id="only-empty-rows"),
        pytest.param([((0, 4), torch.bfloat16), ((3,), torch.uint8), ((2, 0), torch.int32)], id="some-empty-rows"),
    ],
)
def test_zero_byte_rows(device, specs):
    out, ref, _ = pack_both(specs, 3, [2, 0], device)
    assert torch.equal(out.cpu(), ref.cpu())
    tensors, expected = unpack_both(specs, 3, [1, 2], device)
    assert_same_bytes(tensors, expected)


def test_auto_backend_picks_triton_on_cuda_only():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"


@pytest.mark.gpu
def test_int64_offsets_past_2gib():
    """Row addresses past 2**31 bytes: num_local=3 rows of 1.1e9 bytes (about 10 GB of GPU memory)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    row = 1_100_000_016
    big = torch.empty((3, row), dtype=torch.uint8, device="cuda")
    big.random_(0, 256)
    layout = ExpertLayout([big])
    out = torch.full((2 * layout.expert_bytes,), POISON, dtype=torch.uint8, device="cuda")
    layout.pack([2, 0], out, backend="triton")
    assert torch.equal(out[:row], big[2]) and torch.equal(out[layout.expert_bytes :], big[0])
    del out
    keep = big[2].clone()
    layout.copy_rows([2], [1], backend="triton")
    assert torch.equal(big[1], keep)


# -- two moves in one launch (layout.move_pair: one layer's unpack beside the next one's pack) ----
def _part(specs, num_local, rows, mode, device, seed, buf_offset):
    """One part of a pair launch and its reference: tensors, the packed buffer (random bytes
    to unpack, or poisoned to pack into, ``buf_offset`` bytes into a larger buffer), and the
    expected tensors and buffer after the move."""
    tensors = random_layer(specs, num_local, device, seed=seed)
    layout = ExpertLayout(tensors)
    need = len(rows) * layout.expert_bytes
    if mode == "unpack":
        buf = random_bytes(buf_offset + need + 19, _gen(seed + 100)).to(device)
    else:
        buf = torch.full((buf_offset + need + 19,), POISON, dtype=torch.uint8, device=device)
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
    want_tensors, want_buf = clone_layer(tensors), buf.clone()
    ref = ExpertLayout(want_tensors)
    if mode == "unpack":
        ref.unpack_reference(want_buf[buf_offset : buf_offset + need], rows_t)
    else:
        ref.pack_reference(rows_t, want_buf[buf_offset : buf_offset + need])
    return layout, buf[buf_offset:], rows_t, (tensors, buf), (want_tensors, want_buf)


PAIR_MODES = [
    pytest.param(("unpack", "pack"), id="unpack+pack"),
    pytest.param(("pack", "unpack"), id="pack+unpack"),
    pytest.param(("pack", "pack"), id="pack+pack"),
]


@pytest.mark.parametrize("modes", PAIR_MODES)
@pytest.mark.parametrize(
    "specs_a,specs_b,offsets",
    [
        pytest.param(ODD, MIXED_3D, (0, 0), id="odd+3d-fp8"),
        pytest.param(ALIGNED, ALIGNED, (0, 0), id="aligned+aligned"),
        pytest.param(ALIGNED, MIXED_3D, (0, 3), id="aligned+3d-buffer+3B"),
    ],
)
@pytest.mark.parametrize("tuning", [None, TINY_CHUNKS], ids=["default-chunks", "64B-chunks"])
def test_move_pair_matches_two_reference_moves(device, specs_a, specs_b, offsets, modes, tuning):
    """Both parts of one launch equal the reference ops byte for byte: tensors (unpack) and
    buffers (pack: poisoned first; spare bytes after the packed rows stay untouched)."""
    from eplb_triton.layout import move_pair

    rows = {"unpack": ([3, 0, 4], [6, 1]), "pack": ([4, 4, 0, 2], [6, 0, 6])}
    part_a = _part(specs_a, 5, rows[modes[0]][0], modes[0], device, seed=1, buf_offset=offsets[0])
    part_b = _part(specs_b, 7, rows[modes[1]][1], modes[1], device, seed=2, buf_offset=offsets[1])
    (la, buf_a, rows_a, got_a, want_a), (lb, buf_b, rows_b, got_b, want_b) = part_a, part_b
    move_pair(la, modes[0], buf_a, rows_a, lb, modes[1], buf_b, rows_b, backend="triton", tuning=tuning)
    for (tensors, buf), (want_tensors, want_buf) in ((got_a, want_a), (got_b, want_b)):
        assert_same_bytes(tensors, want_tensors)
        assert_same_bytes([buf], [want_buf])


def test_move_pair_with_an_empty_part_or_a_copy(device):
    """An empty part leaves one move (no pair launch); ``copy`` is not a pair mode."""
    from eplb_triton.layout import move_pair

    (la, buf_a, rows_a, got_a, want_a) = _part(ODD, 5, [2, 1], "unpack", device, seed=3, buf_offset=0)
    (lb, buf_b, _, got_b, _) = _part(ALIGNED, 4, [0], "pack", device, seed=4, buf_offset=0)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    before = got_b[1].clone()
    move_pair(la, "unpack", buf_a, rows_a, lb, "pack", buf_b, empty, backend="triton")
    assert_same_bytes(got_a[0], want_a[0])
    assert_same_bytes([got_b[1]], [before])
    with pytest.raises(ValueError, match="'pack' or 'unpack'"):
        move_pair(la, "copy", buf_a, rows_a, lb, "pack", buf_b, empty)


@pytest.mark.gpu
@pytest.mark.parametrize("specs", LAYERS)
def test_bound_launch_equals_launch(specs):
    """``ExpertLayout.launcher``: None until the launch is compiled (it compiles nothing), then a
    callable moving exactly what ``launch`` moves, on the stream current when called."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda", torch.cuda.current_device())
    tensors = random_layer(specs, 9, device, seed=21)
    layout = ExpertLayout(tensors)
    rows = torch.tensor([7, 0, 4, 2], dtype=torch.int64, device=device)
    buf = random_bytes(4 * layout.expert_bytes + 5, _gen(22)).to(device)[1:]  # 1 byte off alignment
    assert layout.launcher("unpack", buf, dst_rows=rows[:3]) is None  # never launched with 3 rows here
    layout.launch("unpack", buf, dst_rows=rows, compile_only=True)
    bound = layout.launcher("unpack", buf, dst_rows=rows)
    assert callable(bound)
    expected = clone_layer(tensors)
    ExpertLayout(expected).unpack_reference(buf[: 4 * layout.expert_bytes], rows)
    before = clone_layer(tensors)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~25 ms: the launch must queue behind this, on the side stream
        bound()
    meanwhile = [t.cpu() for t in tensors]  # on the default stream, while the side stream sleeps
    side.synchronize()
    assert_same_bytes(meanwhile, before)  # not launched on the default stream
    assert_same_bytes(tensors, expected)
    assert layout.launcher("unpack", buf, dst_rows=rows[:0])() is None  # no rows: nothing to launch

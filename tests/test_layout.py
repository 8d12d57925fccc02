"""ExpertLayout without kernels: the byte layout, argument checks, backend choice, launch shape,
and the torch reference against a per-row loop written independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eplb_triton.layout as layout_mod
from eplb_triton.layout import ALIGN_BYTES, BACKEND_ENV, ExpertLayout, KernelTuning, resolve_backend


def random_tensors(specs, num_local, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in specs:
        elem = torch.empty(0, dtype=dtype).element_size()
        raw = torch.randint(0, 256, (num_local * int(np.prod(shape)) * elem,), dtype=torch.uint8, generator=gen)
        out.append(raw.view(dtype).view(num_local, *shape))
    return out


SPECS = [((3, 5), torch.bfloat16), ((7,), torch.uint8), ((2, 2, 2), torch.float32), ((4,), torch.float8_e4m3fn)]


def row_bytes_of(t: torch.Tensor, row: int) -> torch.Tensor:
    return t[row].contiguous().view(-1).view(torch.uint8)


def test_segments_are_16_byte_aligned():
    layout = ExpertLayout(random_tensors(SPECS, 3))
    assert layout.row_bytes == [30, 7, 32, 4]
    assert layout.segment_offsets == [0, 32, 48, 80]
    assert layout.expert_bytes == 96 and layout.expert_bytes % ALIGN_BYTES == 0
    assert layout.layer_bytes == 3 * (30 + 7 + 32 + 4)


def test_reference_pack_unpack_copy_against_row_loop():
    tensors = random_tensors(SPECS, 5, seed=1)
    layout = ExpertLayout(tensors)
    rows = [4, 0, 4, 2]
    buf = torch.full((len(rows) * layout.expert_bytes,), 0x5A, dtype=torch.uint8)
    layout.pack(rows, buf, backend="torch")
    for k, row in enumerate(rows):
        for t, off in zip(tensors, layout.segment_offsets):
            seg = buf[k * layout.expert_bytes + off :][: t[0].numel() * t.element_size()]
            assert torch.equal(seg, row_bytes_of(t, row))

    before = [t.clone() for t in tensors]
    layout.copy_rows([1, 3], [3, 1], backend="torch")  # a swap
    for t, b in zip(tensors, before):
        assert torch.equal(row_bytes_of(t, 1), row_bytes_of(b, 3)) and torch.equal(row_bytes_of(t, 3), row_bytes_of(b, 1))

    layout.unpack(buf[: 2 * layout.expert_bytes], [2, 0], backend="torch")
    for t, b in zip(tensors, before):
        assert torch.equal(row_bytes_of(t, 2), row_bytes_of(b, 4)) and torch.equal(row_bytes_of(t, 0), row_bytes_of(b, 0))


@pytest.mark.parametrize(
    "rows,message",
    [
        pytest.param([0, 5], r"rows must lie in \[0, 5\)", id="too-large"),
        pytest.param([-1], r"rows must lie in \[0, 5\)", id="negative"),
        pytest.param(np.zeros((1, 2), dtype=np.int64), "rows must be 1-D", id="2d"),
    ],
)
def test_bad_rows(rows, message):
    layout = ExpertLayout(random_tensors(SPECS, 5))
    buf = torch.empty(4 * layout.expert_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        layout.pack(rows, buf, backend="torch")


def test_bad_buffers():
    layout = ExpertLayout(random_tensors(SPECS, 5))
    with pytest.raises(TypeError, match="uint8"):
        layout.pack([0], torch.empty(layout.expert_bytes, dtype=torch.int8))
    with pytest.raises(ValueError, match="experts need"):
        layout.pack([0, 1], torch.empty(layout.expert_bytes, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2 sources but 1 destinations"):
        layout.copy_rows([0, 1], [2])


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, cpu) == "torch" and resolve_backend(None, cuda) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend(None, cuda) == "torch"
    assert resolve_backend("triton", cpu) == "triton"  # an explicit argument beats the variable
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", cpu)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(layout_mod, "_interpreted", lambda kernel: False)
    layout = ExpertLayout(random_tensors(SPECS, 2))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        layout.pack([0], torch.empty(layout.expert_bytes, dtype=torch.uint8), backend="triton")


@pytest.mark.interpreter
def test_launch_shape_limits():
    """Chunk within its bounds, a power of two; the grid capped; tiles no wider than a chunk."""
    layout = ExpertLayout(random_tensors([((1000,), torch.uint8), ((48,), torch.uint8)], 8))
    tuning = KernelTuning(block_words=256, programs_per_sm=4, waves=2, min_chunk=64, max_chunk=512)
    shape = layout.launch_shape(8, tuning)
    assert 64 <= shape.chunk <= 512 and shape.chunk & (shape.chunk - 1) == 0
    state = layout._triton()
    assert 1 <= shape.programs <= state.sm_count * 4
    assert shape.block_words * 4 <= shape.chunk
    one = layout.launch_shape(1, KernelTuning(min_chunk=16, max_chunk=16, programs_per_sm=1000))
    assert one.programs == -(-1000 // 16) + -(-48 // 16)  # one program per chunk when the cap allows


@pytest.mark.interpreter
def test_triton_state_is_shared_by_layouts_over_the_same_memory(monkeypatch):
    # a rearrangement builds new layouts on every call: their launch cache must outlive them
    tensors = random_tensors(SPECS, 4, seed=3)
    first, again = ExpertLayout(tensors), ExpertLayout(list(tensors))
    assert first._triton() is again._triton()
    buf = torch.empty(2 * first.expert_bytes, dtype=torch.uint8)
    first.launch("pack", buf, src_rows=torch.tensor([1, 3]))
    assert again._triton().shapes or again._triton().launches, "the second layout sees the first one's launch"
    # other memory (a copy of the same shapes) gets its own state; so does another launch setting
    moved = ExpertLayout([t.clone() for t in tensors])
    assert moved._triton() is not first._triton()
    monkeypatch.setenv(layout_mod.FAST_LAUNCH_ENV, "0")
    assert ExpertLayout(tensors)._triton() is not first._triton()


def test_programs_per_sm_override_for_measurements(monkeypatch):
    from eplb_triton.layout import DEFAULT_TUNING, PROGRAMS_PER_SM_ENV, default_tuning

    monkeypatch.delenv(PROGRAMS_PER_SM_ENV, raising=False)
    assert default_tuning() == DEFAULT_TUNING
    monkeypatch.setenv(PROGRAMS_PER_SM_ENV, "4")
    assert default_tuning().programs_per_sm == 4 and default_tuning().waves == DEFAULT_TUNING.waves
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(PROGRAMS_PER_SM_ENV, bad)
        with pytest.raises(ValueError, match=PROGRAMS_PER_SM_ENV):
            default_tuning()


@pytest.mark.parametrize(
    "rows,first",
    [pytest.param([2, 3, 4], 2, id="run-one-copy-per-tensor"), pytest.param([4, 0, 2], -1, id="scattered-index-copy")],
)
def test_unpack_by_tensor_writes_tensor_major_rows(device, rows, first):
    specs = SPECS[:2] + [((0,), torch.float32)] + SPECS[2:]  # a tensor whose rows have no bytes: left out
    tensors = [t.to(device) for t in random_tensors(specs, 5, seed=3)]
    before = [t.clone() for t in tensors]
    layout = ExpertLayout(tensors)
    sources = random_tensors(specs, len(rows), seed=4)  # the message: all rows of tensor 0, then of tensor 1...
    message = torch.cat([s.reshape(-1).view(torch.uint8) for s in sources]).to(device)
    assert message.numel() == len(rows) * sum(layout.row_bytes)
    layout.unpack_by_tensor(message, torch.tensor(rows, device=device), first)
    for t, b, src in zip(tensors, before, sources):
        for r in range(5):
            expected = src[rows.index(r)] if r in rows else b[r]
            assert torch.equal(row_bytes_of(t.cpu(), r), row_bytes_of(expected.cpu().unsqueeze(0), 0))
    if first >= 0:  # the sender's side: the same message, read straight from the rows
        assert torch.equal(torch.cat(layout.rows_by_tensor(first, len(rows))), message)

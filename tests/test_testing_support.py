"""eplb_triton/testing/: the one table of model shapes and the one Machine line."""

from __future__ import annotations

import os
import platform
import time

import pytest
import torch
import triton

from eplb_triton.testing.launch import run_ranks
from eplb_triton.testing.machine import machine_line
from eplb_triton.testing.shapes import LAYER_CONFIGS, PRESETS, scaled
from eplb_triton.testing.synthetic import TensorSpec


def test_model_layers_take_their_tensors_from_the_presets():
    qwen = LAYER_CONFIGS["qwen3-30b-a3b-bf16"]
    assert qwen.tensors == list(PRESETS["qwen3-30b-a3b"].tensors)
    deepseek = LAYER_CONFIGS["deepseek-v3-fp8"]
    preset = PRESETS["deepseek-v3"].tensors
    # float8 carried as uint8: same shapes, same bytes per row
    assert [t.shape for t in deepseek.tensors] == [t.shape for t in preset]
    assert [t.row_bytes() for t in deepseek.tensors] == [t.row_bytes() for t in preset]
    assert [t.dtype for t in deepseek.tensors] == [torch.uint8, torch.float32, torch.uint8, torch.float32]


@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_layer_configs_unpack_as_local_moved_specs(name):
    local, moved, specs = LAYER_CONFIGS[name]
    assert 0 < moved <= local and moved % 2 == 0  # the one-rank benchmarks swap moved/2 row pairs
    assert all(isinstance(s, TensorSpec) for s in specs)


def test_scaled_divides_every_dimension_and_keeps_at_least_one():
    specs = [TensorSpec((1536, 2048), torch.bfloat16), TensorSpec((3,), torch.int32)]
    assert scaled(specs, 8) == [TensorSpec((192, 256), torch.bfloat16), TensorSpec((1,), torch.int32)]
    assert scaled(specs, 1) == specs


def test_machine_line_names_the_cpu_and_the_versions(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = machine_line("cpu")
    assert line == f"Machine: CPU {platform.machine()} x{os.cpu_count()}, torch {torch.__version__}, triton {triton.__version__}"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "(Triton interpreter)" in machine_line("cpu")
    assert machine_line("cpu", world_size=4, dist_backend="gloo").split(",")[0].endswith("(4 gloo ranks)")


def _sleeps_past_the_dump(rank, world):
    time.sleep(0.8)
    return rank


def test_ranks_print_their_stacks_after_the_dump_delay(monkeypatch, capfd):
    """EPLB_TRITON_DUMP_STACKS_S (diagnosing a hang on a lent machine): a rank prints its
    threads' stacks once it has run that long, and still returns its result. One rank: two
    ranks dump at the same moment into one stderr, and their lines interleaved (a flaky count
    in CI, session 11)."""
    monkeypatch.setenv("EPLB_TRITON_DUMP_STACKS_S", "0.2")
    assert run_ranks(1, _sleeps_past_the_dump) == [0]
    err = capfd.readouterr().err
    assert err.count("in _sleeps_past_the_dump") == 1, err[-2000:]

"""The one table of model shapes used by the demo, the CLI benchmark, tests and bench/.

Two views of the same models:

* :data:`PRESETS`: whole models (layer count, logical experts, redundant slots per rank and
  the full-size tensors of one expert); ``Preset.specs(scale)`` shrinks them for CPU runs.
  ``eplb-triton demo|bench --preset NAME`` picks one.
* :data:`LAYER_CONFIGS`: the reference layers of the kernel, worker and link benchmarks (issue
  3's configs): one layer's expert tensors, ``num_local`` experts per rank and ``moved`` of
  them rewritten. The two model layers take their tensors from :data:`PRESETS`; ``small`` and
  ``tiny`` are synthetic layers with many small experts (where per-message costs dominate).

Test and benchmark support, not part of the runtime API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .synthetic import TensorSpec

__all__ = ["LAYER_CONFIGS", "PRESETS", "LayerConfig", "Preset", "scaled"]

BF16, FP8, U8, F32 = torch.bfloat16, torch.float8_e4m3fn, torch.uint8, torch.float32


def scaled(specs, scale: int) -> list[TensorSpec]:
    """Every dimension divided by ``scale`` (at least 1); ``scale=1`` returns the specs as they are."""
    if scale == 1:
        return list(specs)
    return [TensorSpec(tuple(max(1, d // scale) for d in s.shape), s.dtype) for s in specs]


@dataclass(frozen=True)
class Preset:
    """A model's MoE shape: full-size tensors per expert; ``scale`` divides their dimensions."""

    num_layers: int
    num_logical: int
    redundant_per_rank: int
    tensors: tuple[TensorSpec, ...]

    def specs(self, scale: int) -> list[TensorSpec]:
        """The tensors at 1/``scale`` size; short 1-D tensors (per-expert scales) keep theirs."""
        out = []
        for spec in self.tensors:
            shape = tuple(max(1, d // scale) for d in spec.shape) if len(spec.shape) > 1 or spec.shape[0] > 64 else spec.shape
            out.append(TensorSpec(shape, spec.dtype))
        return out


PRESETS: dict[str, Preset] = {
    # hidden 2048, moe_intermediate 768: w13 (2*768, 2048), w2 (2048, 768), bf16
    "qwen3-30b-a3b": Preset(48, 128, 2, (TensorSpec((1536, 2048), BF16), TensorSpec((2048, 768), BF16))),
    # hidden 7168, moe_intermediate 2048, fp8 with 128x128 block scales
    "deepseek-v3": Preset(
        58,
        256,
        1,
        (TensorSpec((4096, 7168), FP8), TensorSpec((32, 56), F32), TensorSpec((7168, 2048), FP8), TensorSpec((56, 16), F32)),
    ),
    # hidden 4096, intermediate 14336, bf16
    "mixtral-8x7b": Preset(32, 8, 1, (TensorSpec((28672, 4096), BF16), TensorSpec((4096, 14336), BF16))),
    # small and mixed: odd row sizes, a 3-D tensor and a per-expert int32 scale
    "tiny": Preset(
        6,
        16,
        1,
        (
            TensorSpec((48, 33), BF16),
            TensorSpec((3, 5, 7), torch.float16),
            TensorSpec((40, 24), U8),
            TensorSpec((3,), torch.int32),
        ),
    ),
}


class LayerConfig(NamedTuple):
    """One reference layer: ``num_local`` experts per rank, ``moved`` of them rewritten, and
    the tensors of one expert (unpacks as ``local, moved, specs = LAYER_CONFIGS[name]``)."""

    num_local: int
    moved: int
    tensors: list[TensorSpec]


def _fp8_as_bytes(specs) -> list[TensorSpec]:
    # the reference layer has always carried float8 weights as uint8: the same bytes (the
    # kernels and the wire move bytes, whatever the dtype), so the committed results stay comparable
    return [TensorSpec(s.shape, U8) if s.dtype == FP8 else s for s in specs]


LAYER_CONFIGS: dict[str, LayerConfig] = {
    "qwen3-30b-a3b-bf16": LayerConfig(16, 8, list(PRESETS["qwen3-30b-a3b"].tensors)),
    "deepseek-v3-fp8": LayerConfig(9, 4, _fp8_as_bytes(PRESETS["deepseek-v3"].tensors)),
    "small-bf16": LayerConfig(64, 32, [TensorSpec((512, 1024), BF16), TensorSpec((1024, 256), BF16)]),
    "tiny-bf16": LayerConfig(128, 64, [TensorSpec((256, 512), BF16), TensorSpec((512, 128), BF16)]),
}

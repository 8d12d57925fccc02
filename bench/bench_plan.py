"""pytest-benchmark: planning and alignment on DeepSeek-V3 shapes (`pytest bench/bench_plan.py --benchmark-only`).

58 layers x 288 slots (256 experts + 32 redundant) over 32 ranks in 4 nodes, two consecutive
placements of the hierarchical EPLB-style generator. ``bench/plan_table.py`` prints the
same timings as a table (with the Python-loop references) plus the quality numbers.
"""

from __future__ import annotations

import os
import sys

import pytest

from eplb_triton import align_placement, plan_rearrangement
from eplb_triton.testing.balancer import placement_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_table import per_expert_loop_plan, python_loop_plan  # noqa: E402

SEQ = placement_sequence(2, 58, 256, 32, 32, seed=0, ranks_per_node=8, num_groups=8)
OLD, NEW = SEQ[0], SEQ[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"sender_policy": "vllm"}, id="vllm"),
        pytest.param({}, id="balanced"),
        pytest.param({"ranks_per_node": 8}, id="balanced-rpn8"),
        pytest.param({"rounds": "pair"}, id="balanced-rounds-pair"),
        pytest.param({"rounds": "expert"}, id="balanced-rounds-expert"),
    ],
)
def test_plan_deepseek(benchmark, kwargs):
    plan = benchmark(plan_rearrangement, OLD, NEW, 32, **kwargs)
    assert plan.num_layers == 58


def test_python_dict_loop_deepseek(benchmark):
    benchmark.pedantic(python_loop_plan, args=(OLD, NEW, 32), rounds=3, iterations=1)


def test_per_expert_loop_deepseek(benchmark):
    benchmark.pedantic(per_expert_loop_plan, args=(OLD, NEW, 32), rounds=2, iterations=1)


@pytest.mark.parametrize("objective", [pytest.param("copies_then_bottleneck", id="default"), pytest.param("copies", id="copies")])
@pytest.mark.parametrize("rpn", [pytest.param(None, id="flat"), pytest.param(8, id="rpn8")])
def test_align_deepseek(benchmark, rpn, objective):
    aligned = benchmark(align_placement, OLD, NEW, 32, ranks_per_node=rpn, objective=objective)
    assert aligned.shape == NEW.shape

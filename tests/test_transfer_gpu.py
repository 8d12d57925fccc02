"""The blocking transfer on one GPU: a world-size-1 NCCL group exercises local moves,
duplicate fills, -1 slots and stashed rounds with CUDA tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb_triton import rearrange_expert_weights_inplace
from eplb_triton.testing.launch import free_port
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches

pytestmark = pytest.mark.gpu

SPECS = [
    TensorSpec((96, 70), torch.bfloat16),
    TensorSpec((3, 5), torch.float32),
    TensorSpec((33, 17, 3), torch.uint8),
    TensorSpec((64, 56), torch.float8_e4m3fn),
]


@pytest.fixture(scope="module")
def nccl_world1():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize(
    "budget", [pytest.param(None, id="one-pass"), pytest.param(2, id="budget-2-experts-stash")]
)
def test_local_moves_and_duplicates_on_gpu(nccl_world1, backend, budget):
    rng = np.random.default_rng(0)
    layers, num_local = 3, 12
    old = np.stack([rng.permutation(num_local) for _ in range(layers)])
    new = np.stack([rng.choice(num_local, num_local) for _ in range(layers)])
    new[:, 0] = -1
    new[1] = np.roll(old[1], 1)  # one long cycle of local moves
    weights = make_rank_weights(SPECS, layers, num_local, "cuda")
    fill_rank_weights(weights, old, 0, seed=5)
    packed = sum(-(-s.row_bytes() // 16) * 16 for s in SPECS)
    stats = rearrange_expert_weights_inplace(
        old, new, weights, nccl_world1, max_buffer_bytes=None if budget is None else budget * packed, backend=backend
    )
    assert row_mismatches(weights, old, new, 0, seed=5) == []
    assert stats.p2p_ops == 0 and stats.local_copies > 0

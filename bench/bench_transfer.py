"""pytest-benchmark: a small end-to-end gloo rearrangement (`pytest bench/ --benchmark-only`).

The benchmark process is rank 0; forked peers run the same rearrangement whenever rank 0
broadcasts "go", so each measured call is one whole multi-rank rearrangement, old -> new or
new -> old, with no process start-up inside the timing.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist

from eplb_triton import rearrange_expert_weights_inplace
from eplb_triton.testing.baseline import rearrange_per_expert
from eplb_triton.testing.balancer import make_placements
from eplb_triton.testing.shapes import PRESETS
from eplb_triton.testing.launch import free_port
from eplb_triton.testing.synthetic import fill_rank_weights, make_rank_weights, row_mismatches

METHODS = {"eplb_triton": rearrange_expert_weights_inplace, "per-expert": rearrange_per_expert}


class Ranks:
    """Rank 0 in this process, ranks 1.. in forked processes, all running the same loop."""

    def __init__(self, world_size: int, preset: str, layers: int, method: str):
        self.world_size, self.method = world_size, method
        spec = PRESETS[preset]
        self.old, self.new = make_placements(layers, spec.num_logical, world_size, spec.redundant_per_rank, seed=0)
        self.specs = spec.specs(1)
        port = free_port()
        ctx = mp.get_context("fork")
        self.peers = [ctx.Process(target=self._peer, args=(rank, port), daemon=True) for rank in range(1, world_size)]
        for proc in self.peers:
            proc.start()
        self._init(0, port)
        self.weights = self._weights(0)
        self.flip = False
        self.maps = (self.old, self.old)  # (before, after) of the last rearrangement

    def _init(self, rank: int, port: int) -> None:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=self.world_size,
            timeout=datetime.timedelta(seconds=60),
        )

    def _weights(self, rank: int):
        weights = make_rank_weights(self.specs, self.old.shape[0], self.old.shape[1] // self.world_size)
        fill_rank_weights(weights, self.old, rank)
        return weights

    def _peer(self, rank: int, port: int) -> None:
        torch.set_num_threads(1)
        self._init(rank, port)
        self.weights, self.flip = self._weights(rank), False
        while self._go():
            self._once()
        dist.destroy_process_group()

    def _go(self, value: int = 0) -> bool:
        command = torch.tensor([value])
        dist.broadcast(command, 0)
        return bool(command.item())

    def _once(self) -> None:
        old, new = (self.new, self.old) if self.flip else (self.old, self.new)
        METHODS[self.method](old, new, self.weights)
        self.flip = not self.flip
        self.maps = (old, new)

    def __call__(self) -> None:
        self._go(1)
        self._once()

    def close(self) -> list:
        bad = row_mismatches(self.weights, *self.maps, 0)
        self._go(0)
        dist.destroy_process_group()
        for proc in self.peers:
            proc.join(timeout=30)
        return bad


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("world_size", [pytest.param(2, id="W2"), pytest.param(4, id="W4")])
def test_gloo_rearrangement_tiny(benchmark, world_size, method):
    ranks = Ranks(world_size, "tiny", layers=4, method=method)
    try:
        benchmark.pedantic(ranks, rounds=10, iterations=1, warmup_rounds=1)
    finally:
        bad = ranks.close()
    assert bad == []

"""The per-expert baseline: what vLLM's EPLB does today, for fair comparisons.

As in vLLM's ``rebalance_execute.py`` (``move_to_buffer`` / ``move_from_buffer``): one layer
buffer (``empty_like`` of every tensor) allocated once per call; per layer, local moves are
``copy_``-ed into the buffer; then one message per expert, per destination rank, per tensor,
sends and receives ordered by expert id (sends first), every op of the layer in one
``batch_isend_irecv``; each missing expert is received once into its first destination row of
the buffer; after the wait every changed row is copied from the buffer into the weights, and
duplicates are copied row by row. It uses the same plan (same senders) as eplb_triton, so only
the data movement differs.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..comm import Communicator
from ..plan import plan_rearrangement
from ..transfer import TransferStats

__all__ = ["rearrange_per_expert"]


def rearrange_per_expert(old, new, expert_weights: Sequence[Sequence[torch.Tensor]], ep_group=None) -> TransferStats:
    """Per-expert P2P rearrangement (the baseline); same result as the library, more messages."""
    comm = Communicator.from_group(ep_group)
    plan = plan_rearrangement(old, new, comm.world_size)
    old_ids = np.asarray(old, dtype=np.int64).reshape(len(plan.layers), -1)
    stats = TransferStats.empty(comm.rank, comm.world_size)
    buffers = [torch.empty_like(t) for t in expert_weights[0]] if expert_weights else []  # once per call
    for layer, (layer_plan, tensors) in enumerate(zip(plan.layers, expert_weights)):
        if [b.shape for b in buffers] != [t.shape for t in tensors]:  # layers of another shape
            buffers = [torch.empty_like(t) for t in tensors]
        begin = time.perf_counter()
        view = layer_plan.rank(comm.rank)
        base = comm.rank * layer_plan.num_local
        for src, dst in zip(view.local_src_rows.tolist(), view.local_dst_rows.tolist()):
            for t, buf in zip(tensors, buffers):
                buf[dst].copy_(t[src])
        # (expert id, peer, row): sends by expert, then destination rank; receives by expert
        sends = sorted(
            (int(old_ids[layer, base + row]), peer, int(row)) for peer, rows in view.send_rows.items() for row in rows
        )
        recvs = sorted(
            (int(old_ids[layer, layer_plan.route[base + row]]), peer, int(row))
            for peer, rows in view.recv_rows.items()
            for row in rows
        )
        ops = [
            dist.P2POp(dist.isend, t[row], comm.global_rank(peer), comm.group) for _, peer, row in sends for t in tensors
        ]
        ops += [
            dist.P2POp(dist.irecv, buf[row], comm.global_rank(peer), comm.group) for _, peer, row in recvs for buf in buffers
        ]
        requests = dist.batch_isend_irecv(ops) if ops else []
        for request in requests:
            request.wait()
        written = view.local_dst_rows.tolist() + [row for _, _, row in recvs]
        for row in written:
            for t, buf in zip(tensors, buffers):
                t[row].copy_(buf[row])
        for src, dst in zip(view.dup_src_rows.tolist(), view.dup_dst_rows.tolist()):
            for t in tensors:
                t[dst].copy_(t[src])
        eb = sum(t[0].numel() * t.element_size() for t in tensors)
        for peer, rows in view.send_rows.items():
            stats.bytes_sent[peer] += len(rows) * eb
        for peer, rows in view.recv_rows.items():
            stats.bytes_received[peer] += len(rows) * eb
        stats.p2p_ops += len(ops)
        stats.rounds += 1
        stats.local_copies += int(view.local_dst_rows.size + view.dup_dst_rows.size)
        stats.peak_staging_bytes = max(stats.peak_staging_bytes, sum(b.numel() * b.element_size() for b in buffers))
        if tensors[0].is_cuda:
            torch.cuda.current_stream().synchronize()
        stats.layer_times_s.append(time.perf_counter() - begin)
    return stats

"""The per-expert baseline: what vLLM and SGLang do today, for fair comparisons.

Per layer: one ``isend``/``irecv`` per expert *per tensor*, all in one
``batch_isend_irecv``; rows received into a layer-sized buffer; local moves by ``copy_`` into
that buffer; then every changed row is copied from the buffer into the weights. It uses the same
plan (same senders) as eplb_triton, so only the data movement differs.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.distributed as dist

from .comm import Communicator
from .plan import plan_rearrangement
from .transfer import TransferStats

__all__ = ["rearrange_per_expert"]


def rearrange_per_expert(old, new, expert_weights: Sequence[Sequence[torch.Tensor]], ep_group=None) -> TransferStats:
    """Per-expert P2P rearrangement (the baseline); same result as the library, more messages."""
    comm = Communicator.from_group(ep_group)
    plan = plan_rearrangement(old, new, comm.world_size)
    stats = TransferStats.empty(comm.rank, comm.world_size)
    for layer_plan, tensors in zip(plan.layers, expert_weights):
        begin = time.perf_counter()
        view = layer_plan.rank(comm.rank)
        buffers = [torch.empty_like(t) for t in tensors]  # the layer-sized receive buffer
        ops = []
        for peer in view.peers:
            # same wire order on both sides: deliveries by destination slot, tensors in order
            for row in view.recv_rows.get(peer, ()):
                for buf in buffers:
                    ops.append(dist.P2POp(dist.irecv, buf[row], comm.global_rank(peer), comm.group))
            for row in view.send_rows.get(peer, ()):
                for t in tensors:
                    ops.append(dist.P2POp(dist.isend, t[row], comm.global_rank(peer), comm.group))
        requests = dist.batch_isend_irecv(ops) if ops else []
        for src, dst in zip(view.local_src_rows.tolist(), view.local_dst_rows.tolist()):
            for t, buf in zip(tensors, buffers):
                buf[dst].copy_(t[src])
        for request in requests:
            request.wait()
        written = list(view.local_dst_rows.tolist()) + [int(r) for rows in view.recv_rows.values() for r in rows]
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

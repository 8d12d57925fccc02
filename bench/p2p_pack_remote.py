"""Ways to move one layer's experts to a peer over NVLink, GPU and host time each (issue 17).

    python bench/p2p_pack_remote.py [--configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16]

Two ranks (one per GPU, NCCL group, symmetric memory mapped once). Each rank sends the first
``moved`` experts of one layer of the config to the other; per way, ``--iters`` layers back to
back on the current stream, timed with CUDA events (GPU ms per layer) and the host clock (host
us per layer to queue it):

* ``nccl``: one ``batch_isend_irecv`` of the packed bytes (the floor; not packed here);
* ``pull``: pack into my symmetric buffer, barrier, copy-engine copy of the peer's, barrier
  (the p2p transport's packed pass);
* ``push-ce``: barrier, one copy-engine copy per tensor from my weight rows into the peer's
  buffer, barrier (the direct pass of session 11);
* ``pack-remote``: barrier, the Triton pack kernel writing straight into the peer's buffer,
  barrier (SMs do the NVLink writes: no copy engine, no second copy);
* ``unpack``: the Triton unpack of the received experts into rows (what each way adds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_gpu as mg  # noqa: E402,F401  (NVLink multicast off before torch loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb_triton.comm import Communicator  # noqa: E402
from eplb_triton.layout import ExpertLayout, index_tensor  # noqa: E402
from eplb_triton.p2p import P2PTransport  # noqa: E402
from eplb_triton.testing.launch import run_ranks  # noqa: E402
from eplb_triton.testing.machine import machine_line  # noqa: E402
from eplb_triton.testing.shapes import LAYER_CONFIGS  # noqa: E402
from eplb_triton.testing.synthetic import make_rank_weights  # noqa: E402


def _timed(fn, iters: int, repeats: int) -> tuple[float, float]:
    """(GPU ms per iteration, host us per iteration), medians over ``repeats``."""
    gpu, host = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin = time.perf_counter()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        host.append((time.perf_counter() - begin) / iters * 1e6)
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / iters)
    return statistics.median(gpu), statistics.median(host)


def _rank(rank: int, world: int, args: dict) -> dict:
    peer = 1 - rank
    device = torch.device("cuda", torch.cuda.current_device())
    comm = Communicator.from_group(None)
    out = {}
    for config in args["configs"]:
        local, moved, specs = LAYER_CONFIGS[config]
        layer = make_rank_weights(specs, 1, local, device)[0]
        for t in layer:
            t.view(torch.uint8).random_()
        layout = ExpertLayout(layer)
        eb, rows = layout.expert_bytes, index_tensor(np.arange(moved), device)
        nbytes = moved * eb
        transport = P2PTransport.create(comm, device, 2 * nbytes)
        send_local, recv_local = transport.buffer[:nbytes], transport.buffer[nbytes : 2 * nbytes]
        peer_send, peer_recv = transport.peer_bytes(peer, 0, nbytes), transport.peer_bytes(peer, nbytes, nbytes)
        scratch = torch.empty(nbytes, dtype=torch.uint8, device=device)
        parts = layout.rows_by_tensor(0, moved)
        at, remote_parts = nbytes, []
        for part in parts:
            remote_parts.append(transport.peer_bytes(peer, at, part.numel()))
            at += part.numel()

        def nccl():
            for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, scratch, peer), dist.P2POp(dist.isend, send_local, peer)]):
                w.wait()

        def pull():
            layout.move("pack", send_local, src_rows=rows)
            transport.barrier()
            recv_local.copy_(peer_send)
            transport.barrier()

        def push_ce():
            transport.barrier()
            for dst, src in zip(remote_parts, parts):
                dst.copy_(src)
            transport.barrier()

        def pack_remote():
            transport.barrier()
            layout.move("pack", peer_recv, src_rows=rows)
            transport.barrier()

        def unpack():
            layout.move("unpack", scratch, dst_rows=rows)

        ways = {"nccl": nccl, "pull": pull, "push-ce": push_ce, "pack-remote": pack_remote, "unpack": unpack}
        # check pack-remote's bytes: what the peer packed lands in my receive region
        pack_remote()
        torch.cuda.synchronize()
        dist.barrier()
        layout.move("pack", scratch, src_rows=rows)
        mine = scratch.clone()
        theirs = torch.empty_like(mine)
        dist.batch_isend_irecv([dist.P2POp(dist.irecv, theirs, peer), dist.P2POp(dist.isend, mine, peer)])[0].wait()
        torch.cuda.synchronize()
        exact = bool(torch.equal(recv_local, theirs))
        res = {"bytes": nbytes, "pack_remote_exact": exact}
        for name, fn in ways.items():
            fn()
            res[name] = _timed(fn, args["iters"], args["repeats"])
        out[config] = res
        torch.cuda.synchronize()
        dist.barrier()
        transport.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=["qwen3-30b-a3b-bf16", "deepseek-v3-fp8", "tiny-bf16"])
    parser.add_argument("--iters", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = run_ranks(2, _rank, vars(args), backend="nccl", timeout_s=300.0)
    print(machine_line(world_size=2, dist_backend="nccl"))
    print(f"{'config':22} {'MB':>6} {'way':12} {'GPU ms/layer':>12} {'x nccl':>7} {'GB/s':>6} {'host us/layer (rank 0 / 1)':>28}")
    for config in args.configs:
        r0, r1 = results[0][config], results[1][config]
        floor = max(r0["nccl"][0], r1["nccl"][0])
        for way in ("nccl", "pull", "push-ce", "pack-remote", "unpack"):
            ms = max(r0[way][0], r1[way][0])
            print(f"{config:22} {r0['bytes'] / 1e6:6.1f} {way:12} {ms:12.3f} {ms / floor:7.2f} {r0['bytes'] / ms / 1e6:6.0f} "
                  f"{r0[way][1]:13.1f} / {r1[way][1]:.1f}")
        print(f"{config:22} pack-remote bytes exact: {r0['pack_remote_exact'] and r1['pack_remote_exact']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(world_size=2, dist_backend="nccl"), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host cost of the calls a transfer makes, on two GPUs (issue 12 diagnosis).

    python bench/host_costs.py            # prints one line per measurement (rank 0)

Measures, with the device busy or idle: how long ``batch_isend_irecv`` keeps the host (does it
wait for work queued on the stream?), one Triton pack launch, one pinned index upload, the
input agreement, and :func:`eplb_triton.transfer.prepare_layers` for 4 qwen3 layers.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_gpu as mg  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb_triton.comm import Communicator  # noqa: E402
from eplb_triton.testing.launch import run_ranks  # noqa: E402
from eplb_triton.testing.shapes import LAYER_CONFIGS  # noqa: E402
from eplb_triton.layout import ExpertLayout, index_tensor  # noqa: E402
from eplb_triton.testing.synthetic import fill_rank_weights, make_rank_weights  # noqa: E402
from eplb_triton.transfer import prepare_layers  # noqa: E402


def _median_us(fn, n=20, busy_us=0):
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        if busy_us:
            torch.cuda._sleep(int(busy_us * 1980))  # ~1.98 GHz: cycles per us
        begin = time.perf_counter()
        fn()
        out.append((time.perf_counter() - begin) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def _rank(rank, world, _):
    peer = 1 - rank
    nbytes = 75 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def batch():
        ops = [dist.P2POp(dist.irecv, dst, peer), dist.P2POp(dist.isend, src, peer)]
        return dist.batch_isend_irecv(ops)

    def batch_wait():
        for w in batch():
            w.wait()

    def three_batches():
        for _ in range(3):
            for w in batch():
                w.wait()

    lines = {}
    # posting one layer's exchange (1 MiB each way) with 2 ms queued on the stream: host time only
    comm = Communicator.from_group(None)
    small_src, small_dst = src[: 1 << 20], dst[: 1 << 20]
    splits = [0, 0]
    splits[peer] = small_src.numel()
    group = dist.group.WORLD

    def library_post():
        comm.wait(comm.exchange({peer: small_src}, {peer: small_dst}))

    def all_to_all():
        dist.all_to_all_single(small_dst, small_src, splits, splits, async_op=True).wait()

    def alltoall_base():  # the process group's own method: no Python checks around it
        opts = dist.AllToAllOptions()
        group.alltoall_base(small_dst, small_src, splits, splits, opts).wait()

    for name, fn in [("library post (coalesced send+recv) + wait", library_post), ("all_to_all_single + wait", all_to_all),
                     ("ProcessGroup.alltoall_base + wait", alltoall_base), ("batch_isend_irecv + wait (1 MiB)", None)]:
        if fn is None:
            def fn():
                for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, small_dst, peer), dist.P2POp(dist.isend, small_src, peer)]):
                    w.wait()
        try:
            fn()
            lines[f"{name}, 2 ms queued"] = _median_us(fn, n=50, busy_us=2000)
        except Exception as exc:  # noqa: BLE001 - a torch without it: say so
            print(f"rank {rank}: {name}: {type(exc).__name__}: {exc}")
            lines[f"{name}, 2 ms queued"] = float("nan")
    stream = torch.cuda.current_stream()

    def mark():  # what the blocking loop records per item for layer_times_s
        torch.cuda.Event(enable_timing=True).record(stream)

    lines["CUDA timing event, create + record, 2 ms queued"] = _median_us(mark, n=50, busy_us=2000)
    batch_wait()
    lines["batch_isend_irecv+wait, stream idle"] = _median_us(batch_wait)
    lines["batch_isend_irecv+wait, 2 ms queued on the stream"] = _median_us(batch_wait, busy_us=2000)
    lines["3 x (batch+wait) back to back, idle"] = _median_us(three_batches)
    local, moved, specs = LAYER_CONFIGS["qwen3-30b-a3b-bf16"]
    old, new = mg.ref_maps(4, world, local, moved)
    weights = make_rank_weights(specs, 4, local, "cuda")
    fill_rank_weights(weights, old, rank, 1)
    layout = ExpertLayout(weights[0])
    rows = index_tensor(np.arange(8), torch.device("cuda"))
    buf = torch.empty(8 * layout.expert_bytes, dtype=torch.uint8, device="cuda")
    layout.move("pack", buf, src_rows=rows)
    lines["one Triton pack launch (8 qwen3 experts)"] = _median_us(lambda: layout.move("pack", buf, src_rows=rows))
    lines["one pinned index upload (8 rows)"] = _median_us(lambda: index_tensor(np.arange(8), torch.device("cuda")))
    lines["agreement (all_reduce + .cpu())"] = _median_us(lambda: comm.agree(None, 123))
    lines["prepare_layers, 4 qwen3 layers (agreement included)"] = _median_us(lambda: prepare_layers(old, new, weights, comm))
    lines.update(_p2p_costs(comm, src, dst, peer))
    lines.update(_warm_costs(layout, buf, rows))
    return lines


def _warm_us(fn, n=200) -> float:
    """Host time per call of ``fn`` called ``n`` times back to back (caches warm, as in the
    per-layer loop; ``_median_us`` times one cold call after a barrier)."""
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - begin
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def _warm_costs(layout, buf, rows) -> dict[str, float]:
    """Session 12: the per-layer loop's calls, warm, and ways to launch the pack kernel with
    less host time (the compiled runner with integer addresses and the stream given)."""
    layout.move("pack", buf, src_rows=rows)
    state = layout._triton()
    run, table, extra = next(v for k, v in state.launches.items() if k[0] == "pack" and v is not None)
    device = buf.device
    stream = torch.cuda.current_stream(device)
    raw = stream.cuda_stream
    ints = (table.data_ptr(), rows.data_ptr(), rows.data_ptr(), buf.data_ptr())
    event = torch.cuda.Event(enable_timing=True)
    costs = {
        "warm: layout.move('pack') (the library's launch)": lambda: layout.move("pack", buf, src_rows=rows),
        "warm: compiled runner, tensors": lambda: run(table, rows, rows, ints[3], *extra),
        "warm: compiled runner, integer addresses": lambda: run(*ints, *extra),
        "warm: compiled runner, integer addresses, stream given": lambda: run(*ints, *extra, stream=raw),
        "warm: torch.cuda.current_stream(device)": lambda: torch.cuda.current_stream(device),
        "warm: torch._C._cuda_getCurrentRawStream(index)": lambda: torch._C._cuda_getCurrentRawStream(device.index),
        "warm: torch.cuda.current_device()": torch.cuda.current_device,
        "warm: event.record(stream) (made once)": lambda: event.record(stream),
        "warm: torch.cuda.Event() + record()": lambda: torch.cuda.Event().record(),
        "warm: tensor.data_ptr()": buf.data_ptr,
        "warm: buf[a:b] (a slice)": lambda: buf[64:128],
    }
    out = {}
    for name, fn in costs.items():
        try:
            out[name] = _warm_us(fn)
        except Exception as exc:  # noqa: BLE001 - a Triton whose runner takes no stream=: say so
            print(f"{name}: {type(exc).__name__}: {exc}")
            out[name] = float("nan")
    return out


def _p2p_costs(comm, src, dst, peer) -> dict[str, float]:
    """The p2p transport's per-exchange calls (session 11: a direct push layer took ~350 us of
    host): each with 2 ms queued on the stream, so nothing waits for the device."""
    from eplb_triton.p2p import P2PTransport

    device = src.device
    transport = P2PTransport.create(comm, device, 4 << 20)
    remote = transport.peer_bytes(peer, 0, 1 << 20)
    side = torch.cuda.Stream(device=device)
    caller = torch.cuda.current_stream(device)
    event = torch.cuda.Event()
    event.record()

    def record():
        torch.cuda.Event().record()

    def in_side():
        with torch.cuda.stream(side):
            pass

    costs = {
        "p2p: transport.barrier() (device barrier kernel)": transport.barrier,
        "p2p: handle.barrier() alone": transport.handle.barrier,
        "p2p: 1 MiB copy_ into the peer's buffer": lambda: remote.copy_(src[: 1 << 20]),
        "p2p: 1 MiB local copy_": lambda: dst[: 1 << 20].copy_(src[: 1 << 20]),
        "torch.cuda.current_stream(device)": lambda: torch.cuda.current_stream(device),
        "torch.cuda.current_stream()": torch.cuda.current_stream,
        "side.wait_stream(caller)": lambda: side.wait_stream(caller),
        "with torch.cuda.stream(side): pass": in_side,
        "torch.cuda.Event() + record()": record,
        "caller.wait_event(event)": lambda: caller.wait_event(event),
    }
    out = {}
    for name, fn in costs.items():
        fn()
        out[name] = _median_us(fn, n=50, busy_us=2000)
    out["warm: transport.barrier()"] = _warm_us(transport.barrier)  # every rank calls it as often
    torch.cuda.synchronize()
    transport.close()
    return out


def main() -> int:
    results = run_ranks(2, _rank, None, backend="nccl", timeout_s=300.0, group_timeout_s=120.0)
    for name, us in results[0].items():
        print(f"{name:60} {us:10.1f} us   (rank 1: {results[1][name]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

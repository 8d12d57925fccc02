"""GPU kernel timeline of one blocking call on two GPUs: does the wire ever wait? (issue 12 diagnosis)

    python bench/overlap_trace.py --config deepseek-v3-fp8 --layers 16 --budget-layers 2

Runs one call under ``torch.profiler`` on each rank and reads the kernels from its trace: the
NCCL kernels (the wire) and the pack/unpack kernels (``move_rows``). Prints, per rank, the
span from the first kernel to the last, the time the wire was busy, the gaps between
consecutive NCCL kernels (the wire waiting), each NCCL kernel's duration, and how long pack and
unpack kernels ran while a NCCL kernel was running (their overlap).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_gpu as mg  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb_triton import rearrange_expert_weights_inplace  # noqa: E402
from eplb_triton.testing.launch import run_ranks  # noqa: E402
from eplb_triton.testing.machine import machine_line  # noqa: E402


def _kernels(trace_path: str) -> list[tuple[str, float, float]]:
    """(kind, start us, end us) of every GPU kernel in a chrome trace, kind nccl / move / other."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel":
            continue
        name = e.get("name", "").lower()
        kind = "nccl" if "nccl" in name else "move" if "move_rows" in name else "other"
        out.append((kind, float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return sorted(out, key=lambda k: k[1])


def _overlap(intervals, others) -> float:
    total = 0.0
    for _, a, b in intervals:
        for _, c, d in others:
            total += max(0.0, min(b, d) - max(a, c))
    return total


def _rank(rank, world, args):
    from torch.profiler import ProfilerActivity, profile

    weights, maps, budget = mg.warmed_ref_call(rank, world, args, "cuda")
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        stats = rearrange_expert_weights_inplace(maps[0], maps[1], weights, max_buffer_bytes=budget)
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        kernels = _kernels(f.name)
    nccl = [k for k in kernels if k[0] == "nccl"]
    moves = [k for k in kernels if k[0] == "move"]
    gaps = [b[1] - a[2] for a, b in zip(nccl, nccl[1:])]
    return {
        "overlapped_layers": stats.overlapped_layers,
        "span_us": kernels[-1][2] - kernels[0][1] if kernels else 0.0,
        "first_kernel_to_first_nccl_us": nccl[0][1] - kernels[0][1] if nccl else 0.0,
        "nccl_busy_us": sum(b - a for _, a, b in nccl),
        "nccl_us": [round(b - a, 1) for _, a, b in nccl],
        "nccl_gaps_us": [round(g, 1) for g in gaps],
        "move_us": [round(b - a, 1) for _, a, b in moves],
        "move_during_nccl_us": _overlap(moves, nccl),
    }


def main() -> int:
    args = mg.ref_call_parser(__doc__.splitlines()[0], layers=16).parse_args()
    print(machine_line(world_size=2, dist_backend="nccl"))
    results = run_ranks(2, _rank, vars(args), backend="nccl", timeout_s=300.0, group_timeout_s=120.0)
    print(f"{args.config}, {args.layers} layers, budget {args.budget_layers or 'default'} layers")
    for rank, r in enumerate(results):
        med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        print(
            f"rank {rank}: overlapped {r['overlapped_layers']}, kernel span {r['span_us']:.0f} us, wire busy "
            f"{r['nccl_busy_us']:.0f} us ({r['nccl_busy_us'] / max(r['span_us'], 1):.0%}), first NCCL kernel after "
            f"{r['first_kernel_to_first_nccl_us']:.0f} us; NCCL kernel median {med(r['nccl_us']):.0f} us, gap median "
            f"{med(r['nccl_gaps_us']):.0f} us (max {max(r['nccl_gaps_us'] or [0]):.0f}); move kernels median "
            f"{med(r['move_us']):.0f} us, {r['move_during_nccl_us']:.0f} us of them during a NCCL kernel"
        )
        print(f"rank {rank}: NCCL kernels us {r['nccl_us']}")
        print(f"rank {rank}: gaps us {r['nccl_gaps_us']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

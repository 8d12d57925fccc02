"""Where the host time of a blocking rearrangement goes (issue 12): cProfile on rank 0.

    python bench/host_profile.py --config qwen3-30b-a3b-bf16 --layers 4 --calls 10 --out $OUT

Two ranks (one per GPU, NCCL; or gloo with ``--backend gloo``), the reference config's maps
(:func:`multi_gpu.ref_maps`), warm-up calls first, then ``--calls`` whole calls of
:func:`eplb_triton.rearrange_expert_weights_inplace` under cProfile on rank 0. Prints the
median call time, the time of :func:`eplb_triton.transfer.prepare_layers` alone, and the top
functions by own and cumulative time (also written to ``--out``).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_gpu as mg  # noqa: E402  (NVLink multicast off before torch loads)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb_triton import rearrange_expert_weights_inplace  # noqa: E402
from eplb_triton.comm import Communicator  # noqa: E402
from eplb_triton.testing.launch import run_ranks  # noqa: E402
from eplb_triton.transfer import prepare_layers  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank(rank: int, world: int, args: dict) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if args["backend"] == "nccl" else torch.device("cpu")
    weights, maps, budget = mg.warmed_ref_call(rank, world, args, device, scale=args["scale"])
    comm = Communicator.from_group(None)
    prep = []
    for _ in range(args["calls"]):
        _sync(device)
        dist.barrier()
        begin = time.perf_counter()
        prepare_layers(maps[0], maps[1], weights, comm, budget, stack=True)
        prep.append(time.perf_counter() - begin)
    calls = []
    profiler = cProfile.Profile()
    for _ in range(args["calls"]):
        _sync(device)
        dist.barrier()
        begin = time.perf_counter()
        if rank == 0:
            profiler.enable()
        rearrange_expert_weights_inplace(maps[0], maps[1], weights, max_buffer_bytes=budget)
        if rank == 0:
            profiler.disable()
        calls.append(time.perf_counter() - begin)
        maps.reverse()
    text = ""
    if rank == 0:
        for key in ("tottime", "cumtime"):
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(args["top"])
            text += f"\n===== by {key} ({args['calls']} calls) =====\n" + stream.getvalue()
    return {"call_ms": statistics.median(calls) * 1e3, "prepare_ms": statistics.median(prep) * 1e3, "profile": text}


def main() -> int:
    parser = mg.ref_call_parser(__doc__.splitlines()[0], layers=4)
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cfg = vars(args)
    results = run_ranks(2, _rank, cfg, backend=args.backend, timeout_s=600.0, group_timeout_s=300.0)
    summary = (
        f"{args.config}, {args.layers} layers per call: call {max(r['call_ms'] for r in results):.3f} ms "
        f"(slowest rank, median), prepare_layers {max(r['prepare_ms'] for r in results):.3f} ms"
    )
    print(summary)
    print(results[0]["profile"])
    if args.out:
        Path(args.out, f"host_profile-{args.config}.txt").write_text(summary + "\n" + results[0]["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

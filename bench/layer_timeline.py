"""Per-layer timeline of one blocking call on two GPUs (issue 12 diagnosis).

    python bench/layer_timeline.py --config qwen3-30b-a3b-bf16 --layers 4 [--budget-layers 2]

Uses the transfer's named points (``eplb_triton.transfer.fault_hook``: layer_start, before_send,
posted, in_flight, pass_applied, before_confirm) as probes: at each point the host clock is read
and a CUDA event is recorded on the current stream. Prints, per rank, the host time at each
point since the call began and the GPU time at which the stream reached it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multi_gpu as mg  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb_triton import rearrange_expert_weights_inplace, transfer  # noqa: E402
from eplb_triton.comm import Communicator  # noqa: E402
from eplb_triton.layout import ExpertLayout  # noqa: E402
from eplb_triton.testing.launch import run_ranks  # noqa: E402
from eplb_triton.testing.machine import machine_line  # noqa: E402


def _rank(rank, world, args):
    # --budget-layers 2: two layers' staging fit, so layers overlap (run_layers' two slots)
    weights, maps, budget = mg.warmed_ref_call(rank, world, args, "cuda")
    probes = []
    spent: dict[str, list[float]] = {}

    def timed(owner, name):  # host time of each call of owner.name, by name
        original = getattr(owner, name)

        def wrapper(*a, **k):
            begin = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent.setdefault(f"{owner.__name__}.{name}", []).append((time.perf_counter() - begin) * 1e6)

        setattr(owner, name, wrapper)

    from eplb_triton import executor, inputs, prepare

    # each function is wrapped where its caller looks it up (the module that imported it)
    for owner, name in [(Communicator, "exchange"), (Communicator, "wait"), (Communicator, "agree_start"),
                        (Communicator, "confirm"), (Communicator, "_post_coalesced"), (ExpertLayout, "move"),
                        (ExpertLayout, "launch"), (transfer.PassWork, "device_rows"),
                        (transfer.PassWork, "batches"), (transfer.PassWork, "post_batches"),
                        (transfer.PassWork, "apply"), (transfer.PassWork, "count_into"),
                        (transfer.PassWork, "from_view"), (transfer.LayerWork, "run"),
                        (transfer.LayerWork, "start"), (transfer.LayerWork, "finish"),
                        (transfer, "prepare_layers"), (prepare, "plan_from_maps"), (prepare, "schedule_layer"),
                        (executor, "upload_rows"), (transfer, "finish_transfer"), (transfer, "layer_times"), (prepare, "stacked_rank_views"),
                        (executor, "_mark"), (prepare, "check_inputs"), (prepare, "agree_inputs_start"),
                        (inputs, "check_weights"), (inputs, "normalize_maps")]:
        timed(owner, name)

    def probe(point, **info):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        probes.append((f"{point} L{info.get('layer', '-')}", time.perf_counter(), event))

    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    begin = time.perf_counter()
    transfer.fault_hook = probe
    try:
        stats = rearrange_expert_weights_inplace(maps[0], maps[1], weights, max_buffer_bytes=budget)
    finally:
        transfer.fault_hook = None
    end_host = time.perf_counter()
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    torch.cuda.synchronize()
    rows = [(name, (t - begin) * 1e3, start.elapsed_time(e)) for name, t, e in probes]
    rows.append(("return", (end_host - begin) * 1e3, start.elapsed_time(end)))
    # the last call's share: the warm-up calls ran before the wrappers? no: wrappers were set
    # before them, so report per-call medians
    import statistics

    costs = {k: (len(v), statistics.median(v)) for k, v in spent.items()}
    return rows, costs, stats.overlapped_layers


def main() -> int:
    args = mg.ref_call_parser(__doc__.splitlines()[0], layers=4).parse_args()
    print(machine_line(world_size=2, dist_backend="nccl"))
    results = run_ranks(2, _rank, vars(args), backend="nccl", timeout_s=300.0, group_timeout_s=120.0)
    print(f"{args.config}, {args.layers} layers: ms since the call began (host clock | GPU stream)")
    for rank, (rows, costs, overlapped) in enumerate(results):
        print(f"rank {rank}: {overlapped} layers overlapped with the one before")
        print(f"rank {rank}: " + "  ".join(f"{n} {h:.2f}|{g:.2f}" for n, h, g in rows))
        print(f"rank {rank} host us per call (calls, median): " + ", ".join(
            f"{k} {n}x {us:.0f}" for k, (n, us) in sorted(costs.items(), key=lambda kv: -kv[1][1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

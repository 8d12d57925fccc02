"""Why the background worker is slower than the blocking call (issue 12 diagnosis), two GPUs.

    python bench/worker_steps.py --config qwen3-30b-a3b-bf16 --layers 16

For each way of calling ``step()`` (a tight loop, or a sleep between calls as a serving loop
would leave), and each interpreter switch interval, one worker rearrangement per repeat:
the whole time per layer, the number of steps, the median host time of one ``step()``, and the
worker thread's own time per layer (``TransferStats.layer_times_s``, submit to publish).
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

import multi_gpu as mg  # noqa: E402  (NVLink multicast off before torch loads)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb_triton import TransferWorker, rearrange_expert_weights_inplace  # noqa: E402
from eplb_triton.testing.launch import run_ranks  # noqa: E402
from eplb_triton.testing.machine import machine_line  # noqa: E402
from eplb_triton.testing.shapes import LAYER_CONFIGS, scaled  # noqa: E402
from eplb_triton.testing.synthetic import fill_rank_weights, make_rank_weights, row_mismatches  # noqa: E402

MODES = (("tight", 0.0, None), ("sleep 0.2 ms", 2e-4, None), ("sleep 1 ms", 1e-3, None), ("tight, switch 0.1 ms", 0.0, 1e-4))


def _rank(rank: int, world: int, args: dict) -> dict:
    gpu = args["backend"] == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if gpu else (lambda: None)
    local, moved, specs = LAYER_CONFIGS[args["config"]]
    old, new = mg.ref_maps(args["layers"], world, local, moved)
    weights = make_rank_weights(scaled(specs, args["scale"]), args["layers"], local, device)
    fill_rank_weights(weights, old, rank, 1)
    worker = TransferWorker(weights)
    maps = [old, new]
    default_interval = sys.getswitchinterval()
    rows = {}
    for _ in range(2):  # warm-up: both directions
        rearrange_expert_weights_inplace(maps[0], maps[1], weights)
        maps.reverse()
    blocking = []
    for _ in range(args["repeats"]):
        sync(); dist.barrier(); sync()
        begin = time.perf_counter()
        rearrange_expert_weights_inplace(maps[0], maps[1], weights)
        sync()
        blocking.append((time.perf_counter() - begin) / args["layers"])
        maps.reverse()
    rows["blocking call"] = {"ms_per_layer": statistics.median(blocking) * 1e3}
    for name, pause, interval in MODES:
        sys.setswitchinterval(interval or default_interval)
        per_layer, counts, step_us, thread, bad = [], [], [], [], 0
        for repeat in range(args["repeats"] + 1):
            sync(); dist.barrier(); sync()
            begin = time.perf_counter()
            worker.submit(maps[0], maps[1])
            steps = []
            while worker.busy:
                t = time.perf_counter()
                worker.step()
                steps.append(time.perf_counter() - t)
                if pause:
                    time.sleep(pause)
            stats = worker.wait()
            sync()
            bad += len(row_mismatches(weights, maps[0], maps[1], rank, 1))  # untimed: every call checked
            if repeat:
                per_layer.append((time.perf_counter() - begin) / args["layers"])
                counts.append(len(steps))
                step_us.append(statistics.median(steps) * 1e6 if steps else 0.0)
                thread.append(statistics.median(stats.layer_times_s) if stats.layer_times_s else 0.0)
            maps.reverse()
        rows[f"worker, {name}"] = {
            "ms_per_layer": statistics.median(per_layer) * 1e3,
            "steps": statistics.median(counts),
            "step_us": statistics.median(step_us),
            "thread_ms_per_layer": statistics.median(thread) * 1e3,
            "bad_rows": bad,
        }
    sys.setswitchinterval(default_interval)
    worker.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--config", default="qwen3-30b-a3b-bf16", choices=list(LAYER_CONFIGS))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--json", default=None, help="write every rank's rows here")
    args = parser.parse_args()
    results = run_ranks(2, _rank, vars(args), backend=args.backend, timeout_s=600.0, group_timeout_s=300.0)
    print(machine_line("cuda" if args.backend == "nccl" else "cpu", world_size=2, dist_backend=args.backend))
    print(f"{args.config}, {args.layers} layers per call, median of {args.repeats}; the slowest rank's time")
    print(f"{'mode':28s} {'ms/layer':>9s} {'steps':>6s} {'step us':>8s} {'thread ms/layer':>16s}")
    for mode in results[0]:
        row = max((r[mode] for r in results), key=lambda x: x["ms_per_layer"])
        print(f"{mode:28s} {row['ms_per_layer']:9.3f} {row.get('steps', 0):6.0f} {row.get('step_us', 0):8.0f} "
              f"{row.get('thread_ms_per_layer', 0):16.3f}")
    bad = sum(r[mode].get("bad_rows", 0) for r in results for mode in r)
    print(f"bit-exact: {'yes' if bad == 0 else f'NO ({bad} rows wrong)'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "ranks": results}, indent=1))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

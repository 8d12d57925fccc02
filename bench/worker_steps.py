"""Why the background worker is slower than the blocking call (issue 12 diagnosis), two GPUs.

    python bench/worker_steps.py --config qwen3-30b-a3b-bf16 --layers 16

For each way of calling ``step()`` (a tight loop, or a sleep between calls as a serving loop
would leave; each interpreter switch interval; no loop, ``wait()`` at once; or nothing until the
worker thread has moved all the layers its buffers allow, then ``wait()``), one worker
rearrangement per repeat:
the whole time per layer, the number of steps, the median host time of one ``step()``, and the
worker thread's own time per layer (``TransferStats.layer_times_s``, submit to publish).

``--layers-ahead N``: the worker's staging buffers (``TransferWorker(layers_ahead=N)``).
``--phases``: also the host (wall) time per layer of the worker's methods, per thread, in the
tight mode (each method wrapped by a timer: ~1 us per call added), to see where a layer's
host time goes on each thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
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

# (module, class, method): the worker's host work, per thread (see --phases)
PHASES = (
    ("eplb_triton.worker.thread", "ThreadMixin", "_transfer_layer"),
    ("eplb_triton.worker.staging", "StagingMixin", "_load_kernels"),
    ("eplb_triton.worker.front", "TransferWorker", "submit"),
    ("eplb_triton.worker.thread", "ThreadMixin", "_publish"),
    ("eplb_triton.worker.thread", "ThreadMixin", "_finish_stream"),
    ("eplb_triton.worker.thread", "ThreadMixin", "_await_staging_buffer"),
    ("eplb_triton.worker.staging", "_PreparedLayer", "upload"),
    ("eplb_triton.passes", "PassWork", "post_batches"),
    ("eplb_triton.comm", "Communicator", "wait"),
    ("eplb_triton.worker.front", "TransferWorker", "step"),
    ("eplb_triton.worker.agreement", "AgreementMixin", "_agree_ready"),
    ("eplb_triton.worker.staging", "StagingMixin", "_swap_ready"),
    # inside submit(): the module functions as the caller looks them up (class None)
    ("eplb_triton.worker.front", None, "prepare_layers"),
    ("eplb_triton.prepare", None, "agree_on_inputs"),
    ("eplb_triton.prepare", None, "check_inputs"),
    ("eplb_triton.prepare", None, "_plan_while_agreeing"),
    ("eplb_triton.prepare", "AgreedInputs", "build"),
    ("eplb_triton.worker.staging", "StagingMixin", "_build_job"),
    ("eplb_triton.worker.thread", None, "upload_prepared"),
)


def _time_phases() -> dict:
    """Wrap each PHASES method in a wall-clock timer; returns {(thread, method): [seconds of each call]}."""
    import importlib

    spent = collections.defaultdict(list)
    for module, cls, name in PHASES:
        owner = importlib.import_module(module)
        owner = owner if cls is None else getattr(owner, cls)
        if name not in vars(owner):
            continue  # this version has no such method
        original = vars(owner)[name]

        def timed(*args, _original=original, _name=name, **kwargs):
            begin = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                thread = "worker" if threading.current_thread().name.startswith("eplb-transfer") else "main"
                spent[(thread, _name)].append(time.perf_counter() - begin)

        setattr(owner, name, timed)
    return spent


# (name, pause between step() calls, switch interval); pause None: no step() loop, wait() at once;
# "alone": no call at all until the worker thread has moved every layer its buffers allow, then wait()
MODES = (("tight", 0.0, None), ("sleep 0.2 ms", 2e-4, None), ("sleep 1 ms", 1e-3, None), ("tight, switch 0.1 ms", 0.0, 1e-4),
         ("wait()", None, None), ("alone, then wait()", None, None))


def _rank(rank: int, world: int, args: dict) -> dict:
    gpu = args["backend"] == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if gpu else (lambda: None)
    local, moved, specs = LAYER_CONFIGS[args["config"]]
    old, new = mg.ref_maps(args["layers"], world, local, moved)
    weights = make_rank_weights(scaled(specs, args["scale"]), args["layers"], local, device)
    fill_rank_weights(weights, old, rank, 1)
    worker = TransferWorker(weights, layers_ahead=args["layers_ahead"])
    spent = _time_phases() if args["phases"] else None
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
        if spent is not None:
            spent.clear()
        per_layer, counts, step_us, thread, bad = [], [], [], [], 0
        for repeat in range(args["repeats"] + 1):
            sync(); dist.barrier(); sync()
            begin = time.perf_counter()
            worker.submit(maps[0], maps[1])
            steps = []
            if name.startswith("alone"):  # the thread alone: no step() competes with it for the GIL
                moved = min(args["layers"], args["layers_ahead"])
                while worker.progress.layers_moved < moved:
                    time.sleep(1e-4)
            while worker.busy and pause is not None:
                t = time.perf_counter()
                worker.step()
                steps.append(time.perf_counter() - t)
                if pause:
                    time.sleep(pause)
            stats = worker.wait()
            sync()
            elapsed = time.perf_counter() - begin
            bad += len(row_mismatches(weights, maps[0], maps[1], rank, 1))  # untimed: every call checked
            if repeat:
                per_layer.append(elapsed / args["layers"])
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
        if spent is not None and name == "tight":  # the median call (one-off compilations left out) x calls per layer
            done = args["layers"] * (args["repeats"] + 1)  # the timed repeats and the warm-up one
            rows["phases, tight"] = {
                f"{t}:{m}": {"median_us": statistics.median(v) * 1e6, "calls_per_layer": len(v) / done,
                             "us_per_layer": statistics.median(v) * 1e6 * len(v) / done}
                for (t, m), v in sorted(spent.items())
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
    parser.add_argument("--layers-ahead", type=int, default=2, help="TransferWorker(layers_ahead=N)")
    parser.add_argument("--phases", action="store_true", help="host time per layer of the worker's methods, per thread")
    parser.add_argument("--json", default=None, help="write every rank's rows here")
    args = parser.parse_args()
    results = run_ranks(2, _rank, vars(args), backend=args.backend, timeout_s=600.0, group_timeout_s=300.0)
    print(machine_line("cuda" if args.backend == "nccl" else "cpu", world_size=2, dist_backend=args.backend))
    print(f"{args.config}, {args.layers} layers per call, layers_ahead {args.layers_ahead}, median of {args.repeats}; "
          "the slowest rank's time")
    print(f"{'mode':28s} {'ms/layer':>9s} {'steps':>6s} {'step us':>8s} {'thread ms/layer':>16s}")
    for mode in results[0]:
        if mode.startswith("phases"):
            continue
        row = max((r[mode] for r in results), key=lambda x: x["ms_per_layer"])
        print(f"{mode:28s} {row['ms_per_layer']:9.3f} {row.get('steps', 0):6.0f} {row.get('step_us', 0):8.0f} "
              f"{row.get('thread_ms_per_layer', 0):16.3f}")
    for rank, rows in enumerate(results):
        phases = rows.get("phases, tight")
        if phases:
            print(f"rank {rank}, tight mode, host time per layer: " + ", ".join(
                f"{k} {v['us_per_layer']:.0f} us ({v['calls_per_layer']:.2f} calls of {v['median_us']:.0f})" for k, v in phases.items()))
    bad = sum(r[mode].get("bad_rows", 0) for r in results for mode in r if not mode.startswith("phases"))
    print(f"bit-exact: {'yes' if bad == 0 else f'NO ({bad} rows wrong)'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "ranks": results}, indent=1))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""TransferWorker on one GPU: the swap's cost on the serving stream, and step()'s host time.

    python bench/gpu_worker.py                  # H100/H200: the four reference layer configs
    python bench/gpu_worker.py --device cpu --scale 8 --repeats 5   # smoke run without a GPU

For each reference layer (issue 3's configs: ``local`` experts per rank, ``moved`` of them
rewritten), a one-rank worker rearranges one layer back and forth (``moved/2`` row pairs
swap places). With one rank every write is a local move, which the worker stages exactly as
it stages received rows, so ``step()`` does what it does on any EP size: one unpack of
``moved`` packed experts into the live rows, on the current stream.

Measured, per config (medians over ``--repeats``):

* ``swap_gpu_us``: GPU time of ``step()``'s work on the main stream (CUDA events around
  ``step()``, queued behind a ``torch.cuda._sleep`` so the events time the GPU work only, not
  host launch gaps);
* ``floor_us``: bytes the swap must move (``moved`` rows read from staging + written to the
  weights) / the device copy bandwidth measured in this run (a large ``copy_``); target
  ``swap_gpu_us <= 1.2 x floor_us``;
* ``unpack_us``: the unpack kernel alone (``triton.testing.do_bench``, cold L2);
* ``copy_same_us``: a ``copy_`` of the same byte count (the floor including one launch);
* ``step_host_swap_us`` / ``step_host_idle_us``: host time of a ``step()`` call that swaps
  a layer / that finds nothing ready while a transfer is in flight (the serving thread pays
  this every forward pass). One rank: no agreement collective is included; with EP > 1 add
  one gloo ``all_reduce`` of two int64 (see bench/bench_worker.py for its CPU cost).

Prints a ``Machine:`` line and a table; writes JSON to ``$OUT/gpu_worker.json`` when ``OUT``
is set, else ``bench/results/gpu_worker.json`` (``--json`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from eplb_triton import TransferWorker  # noqa: E402
from eplb_triton.layout import ExpertLayout  # noqa: E402
from eplb_triton.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches  # noqa: E402

BF16, U8, F32 = torch.bfloat16, torch.uint8, torch.float32
CONFIGS = {
    "qwen3-30b-a3b-bf16": (16, 8, [TensorSpec((1536, 2048), BF16), TensorSpec((2048, 768), BF16)]),
    "deepseek-v3-fp8": (
        9,
        4,
        [TensorSpec((4096, 7168), U8), TensorSpec((32, 56), F32), TensorSpec((7168, 2048), U8), TensorSpec((56, 16), F32)],
    ),
    "small-bf16": (64, 32, [TensorSpec((512, 1024), BF16), TensorSpec((1024, 256), BF16)]),
    "tiny-bf16": (128, 64, [TensorSpec((256, 512), BF16), TensorSpec((512, 128), BF16)]),
}
SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU time: covers step()'s host-side launch latency


def machine_line(device: torch.device) -> str:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()} x{os.cpu_count()}"
    return f"Machine: {name}, torch {torch.__version__}, triton {triton.__version__}"


def scaled(specs: list[TensorSpec], scale: int) -> list[TensorSpec]:
    return [TensorSpec(tuple(max(1, d // scale) for d in s.shape), s.dtype) for s in specs]


def swap_maps(local: int, moved: int) -> tuple[np.ndarray, np.ndarray]:
    """A: identity; B: ``moved/2`` pairs of rows exchange experts (``moved`` rows rewritten)."""
    a = np.arange(local)[None, :]
    b = a.copy()
    half = moved // 2
    b[0, :half], b[0, half:moved] = a[0, half:moved], a[0, :half]
    return a, b


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # benchmark bookkeeping only, outside every timed region


def _median_us(values) -> float:
    return statistics.median(values) * 1e6 if values else float("nan")


def time_fn_us(fn, device: torch.device, reps: int = 50) -> float:
    """Median time of ``fn`` in microseconds: do_bench on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
    fn()
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return _median_us(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = time_fn_us(lambda: dst.copy_(src), device, reps=10)
    return 2 * nbytes / (us * 1e-6)


def _wait_published(worker: TransferWorker, count: int, timeout_s: float = 30.0) -> None:
    # Internal counter: the benchmark wants step() to find exactly one layer ready.
    deadline = time.monotonic() + timeout_s
    while worker._job is not None and worker._job.published < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not publish the layer")
        time.sleep(50e-6)


def bench_config(name: str, local: int, moved: int, specs: list[TensorSpec], device: torch.device, args) -> dict:
    a, b = swap_maps(local, moved)
    weights = make_rank_weights(specs, 1, local, device)
    fill_rank_weights(weights, a, 0, seed=1)
    row_bytes = sum(s.row_bytes() for s in specs)
    swap_bytes = 2 * moved * row_bytes  # read from staging + written to the rows
    gpu_ms, host_swap, host_busy_idle, host_idle, bad = [], [], [], [], 0
    with TransferWorker(weights, backend=args.backend, verify=args.verify, timeout_s=args.timeout_s) as worker:
        state = a
        for it in range(args.warmup + args.repeats):
            target = b if state is a else a
            worker.submit(state, target)
            _wait_published(worker, 1)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(SLEEP_CYCLES)
                start.record()
            begin = time.perf_counter()
            done = worker.step()
            host = time.perf_counter() - begin
            if device.type == "cuda":
                end.record()
            assert done == [0], done
            _sync(device)
            bad += len(row_mismatches(weights, a, target, 0, seed=1))
            if it >= args.warmup:
                host_swap.append(host)
                if device.type == "cuda":
                    gpu_ms.append(start.elapsed_time(end))
            state = target

            # step() while a transfer is in flight but nothing is ready yet
            target = b if state is a else a
            if device.type == "cuda":
                torch.cuda._sleep(20 * SLEEP_CYCLES)  # the worker's stream waits for this (submit's event)
            else:
                _hold_worker(worker, 0.01)
            worker.submit(state, target)
            for _ in range(5):
                begin = time.perf_counter()
                done = worker.step()
                elapsed = time.perf_counter() - begin
                if done:
                    break  # became ready: not an idle sample
                if it >= args.warmup:
                    host_busy_idle.append(elapsed)
            worker.wait()
            _sync(device)
            bad += len(row_mismatches(weights, a, target, 0, seed=1))
            state = target
            begin = time.perf_counter()
            worker.step()  # not busy: returns at once
            host_idle.append(time.perf_counter() - begin)

    # The unpack kernel alone and a same-size copy, on the same rows and staging.
    layout = ExpertLayout(weights[0])
    rows = np.arange(moved)
    staging = torch.empty(moved * layout.expert_bytes, dtype=torch.uint8, device=device)
    layout.pack(rows, staging, backend=args.backend)
    unpack_us = time_fn_us(lambda: layout.unpack(staging, rows, backend=args.backend), device)
    flat_src = torch.empty(moved * row_bytes, dtype=torch.uint8, device=device)
    flat_dst = torch.empty_like(flat_src)
    copy_same_us = time_fn_us(lambda: flat_dst.copy_(flat_src), device)
    floor_us = swap_bytes / args.bandwidth * 1e6
    swap_gpu_us = statistics.median(gpu_ms) * 1e3 if gpu_ms else float("nan")
    return {
        "config": name,
        "local": local,
        "moved": moved,
        "swap_MB": swap_bytes / 1e6,
        "swap_gpu_us": swap_gpu_us,
        "floor_us": floor_us,
        "swap_vs_floor": swap_gpu_us / floor_us,
        "unpack_us": unpack_us,
        "unpack_vs_floor": unpack_us / floor_us,
        "copy_same_us": copy_same_us,
        "step_host_swap_us": _median_us(host_swap),
        "step_host_busy_idle_us": _median_us(host_busy_idle),
        "step_host_not_busy_us": _median_us(host_idle),
        "busy_idle_samples": len(host_busy_idle),
        "bad_rows": bad,
    }


def _hold_worker(worker: TransferWorker, seconds: float) -> None:
    """CPU runs: delay the next layer's transfer so step() finds nothing ready for a while."""
    def delayed(job, index, stage):
        time.sleep(seconds)
        del worker._transfer_layer  # once: back to the class's method
        return worker._transfer_layer(job, index, stage)

    worker._transfer_layer = delayed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="divide every tensor dimension (CPU smoke runs)")
    parser.add_argument("--backend", default=None, choices=[None, "auto", "triton", "torch"])
    parser.add_argument("--verify", action="store_true", help="TransferWorker(verify=True): checksums on the worker stream")
    parser.add_argument("--timeout-s", type=float, default=None, help="TransferWorker(timeout_s=...)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    args.bandwidth = copy_bandwidth(device, (512 << 20) if device.type == "cuda" else (64 << 20) // args.scale)
    machine = machine_line(device)
    rows = []
    for name in args.configs:
        local, moved, specs = CONFIGS[name]
        rows.append(bench_config(name, local, moved, scaled(specs, args.scale), device, args))
    result = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(device),
        "backend": args.backend or "auto",
        "scale": args.scale,
        "verify": args.verify,
        "timeout_s": args.timeout_s,
        "repeats": args.repeats,
        "copy_bandwidth_GBps": args.bandwidth / 1e9,
        "rows": rows,
    }
    print(machine)
    print(f"device={device} backend={result['backend']} scale=1/{args.scale} repeats={args.repeats} "
          f"copy bandwidth {args.bandwidth / 1e9:.0f} GB/s (read+write)")
    header = (
        f"{'config':<20} {'moved':>5} {'swap MB':>8} {'swap GPU us':>11} {'floor us':>9} {'x floor':>7} "
        f"{'unpack us':>9} {'copy us':>8} {'step host swap us':>17} {'step host none us':>17} {'idle us':>7} {'bad':>4}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['config']:<20} {r['moved']:>5} {r['swap_MB']:>8.2f} {r['swap_gpu_us']:>11.1f} {r['floor_us']:>9.1f} "
            f"{r['swap_vs_floor']:>7.2f} {r['unpack_us']:>9.1f} {r['copy_same_us']:>8.1f} {r['step_host_swap_us']:>17.1f} "
            f"{r['step_host_busy_idle_us']:>17.1f} {r['step_host_not_busy_us']:>7.1f} {r['bad_rows']:>4}"
        )
    out = args.json
    if out is None:
        out = os.path.join(os.environ["OUT"], "gpu_worker.json") if os.environ.get("OUT") else "bench/results/gpu_worker.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if any(r["bad_rows"] for r in rows):
        raise SystemExit("bit-exactness check failed")
    return result


if __name__ == "__main__":
    main()

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
  host launch gaps), with L2 flushed first (a 256 MiB write), so the swap reads the staging
  the worker just wrote from memory, not from L2;
* ``floor_us``: a ``copy_`` of the bytes the swap moves (``moved`` rows), timed in the same
  iteration and the same way: L2 flushed, behind the same sleep, between CUDA events. Swap and
  floor therefore start from the same (cold) cache state; target ``swap_gpu_us <= 1.2 x floor_us``;
* ``bandwidth_floor_us``: the swap's bytes (read from staging + written to the weights) / the
  device copy bandwidth of a large ``copy_`` in this run (no launch cost; for reference);
* ``unpack_us``: the unpack kernel alone (``triton.testing.do_bench``, cold L2);
* ``copy_same_us``: a ``copy_`` of the same byte count under ``do_bench`` (cold L2);
* ``step_host_swap_us`` / ``step_host_idle_us``: host time of a ``step()`` call that swaps
  a layer / that finds nothing ready while a transfer is in flight (the serving thread pays
  this every forward pass). The swap is timed right after the host waited for the worker
  (sleeping 50 us at a time): a cold host;
* ``step_host_swap_busy_us``: the same swap right after the host queued ``SERVING_LAUNCHES``
  small kernels, as a serving loop's forward pass leaves it (separate repeats). One rank: no agreement collective is included; with EP > 1 add
  one gloo ``all_reduce`` of two int64 (see bench/bench_worker.py for its CPU cost).

``--profile``: also run the swapping ``step()`` calls under ``cProfile`` (timed apart from the
table's numbers, which stay unprofiled) and print each config's 25 costliest functions.

Prints a ``Machine:`` line and a table; writes JSON to ``$OUT/gpu_worker.json`` when ``OUT``
is set, else ``bench/results/gpu_worker.json`` (``--json`` overrides).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from eplb_triton import TransferWorker  # noqa: E402
from eplb_triton.layout import ExpertLayout  # noqa: E402
from eplb_triton.testing.machine import machine_line  # noqa: E402
from eplb_triton.testing.shapes import LAYER_CONFIGS, scaled  # noqa: E402
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches  # noqa: E402

SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU time: covers step()'s host-side launch latency
SERVING_LAUNCHES = 200  # small kernels queued before a "busy" swap: a forward pass's launches
L2_FLUSH_BYTES = 256 << 20  # written before every timed swap and copy: larger than any GPU's L2 (H200: 50 MB)


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
    # The floor: a copy_ of the same bytes, timed in the same iteration as the swap and in the
    # same cache state (L2 flushed before each, behind the same sleep, between CUDA events).
    flat_src = torch.empty(moved * row_bytes, dtype=torch.uint8, device=device).random_()
    flat_dst = torch.empty_like(flat_src)
    flush = torch.empty(L2_FLUSH_BYTES if device.type == "cuda" else 0, dtype=torch.uint8, device=device)
    gpu_ms, copy_ms, host_swap, host_busy_idle, host_idle, host_swap_busy, bad = [], [], [], [], [], [], 0
    serving = torch.zeros(64, device=device)
    profiler = cProfile.Profile() if args.profile else None
    with TransferWorker(weights, backend=args.backend, verify=args.verify, timeout_s=args.timeout_s) as worker:
        state = a
        for it in range(args.warmup + args.repeats):
            target = b if state is a else a
            worker.submit(state, target)
            _wait_published(worker, 1)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                flush.zero_()  # evicts the staging the worker just wrote: the swap reads it cold, like the copy
                torch.cuda._sleep(SLEEP_CYCLES)
                start.record()
            begin = time.perf_counter()
            done = worker.step()
            host = time.perf_counter() - begin
            if device.type == "cuda":
                end.record()
                copy_start, copy_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                flush.zero_()
                torch.cuda._sleep(SLEEP_CYCLES)
                copy_start.record()
                flat_dst.copy_(flat_src)
                copy_end.record()
            else:
                copy_begin = time.perf_counter()
                flat_dst.copy_(flat_src)
                copy_seconds = time.perf_counter() - copy_begin
            assert done == [0], done
            _sync(device)
            bad += len(row_mismatches(weights, a, target, 0, seed=1))
            if it >= args.warmup:  # the same swap once more, after the host queued a "forward pass"
                state, target = target, state
                worker.submit(state, target)
                _wait_published(worker, 1)
                for _ in range(SERVING_LAUNCHES):
                    serving.add_(1.0)
                begin = time.perf_counter()
                assert worker.step() == [0]
                host_swap_busy.append(time.perf_counter() - begin)
                _sync(device)
                bad += len(row_mismatches(weights, a, target, 0, seed=1))
            if profiler is not None and it >= args.warmup:  # the same swap once more, profiled
                state, target = target, state
                worker.submit(state, target)
                _wait_published(worker, 1)
                profiler.enable()
                assert worker.step() == [0]
                profiler.disable()
                _sync(device)
                bad += len(row_mismatches(weights, a, target, 0, seed=1))
            if it >= args.warmup:
                host_swap.append(host)
                if device.type == "cuda":
                    gpu_ms.append(start.elapsed_time(end))
                    copy_ms.append(copy_start.elapsed_time(copy_end))
                else:
                    copy_ms.append(copy_seconds * 1e3)
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
    copy_same_us = time_fn_us(lambda: flat_dst.copy_(flat_src), device)
    bandwidth_floor_us = swap_bytes / args.bandwidth * 1e6
    floor_us = statistics.median(copy_ms) * 1e3
    swap_gpu_us = statistics.median(gpu_ms) * 1e3 if gpu_ms else float("nan")
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(f"--- {name}: the swapping step() under cProfile, {args.repeats} calls, by own time", text.getvalue(), sep="\n")
    return {
        "config": name,
        "local": local,
        "moved": moved,
        "swap_MB": swap_bytes / 1e6,
        "swap_gpu_us": swap_gpu_us,
        "floor_us": floor_us,
        "bandwidth_floor_us": bandwidth_floor_us,
        "swap_vs_floor": swap_gpu_us / floor_us,
        "unpack_us": unpack_us,
        "unpack_vs_floor": unpack_us / floor_us,
        "copy_same_us": copy_same_us,
        "step_host_swap_us": _median_us(host_swap),
        "step_host_swap_us_range": [min(host_swap) * 1e6, max(host_swap) * 1e6] if host_swap else None,
        "step_host_swap_busy_us": _median_us(host_swap_busy),
        "step_host_swap_busy_us_range": [min(host_swap_busy) * 1e6, max(host_swap_busy) * 1e6] if host_swap_busy else None,
        "step_host_busy_idle_us": _median_us(host_busy_idle),
        "step_host_not_busy_us": _median_us(host_idle),
        "busy_idle_samples": len(host_busy_idle),
        "bad_rows": bad,
    }


def _hold_worker(worker: TransferWorker, seconds: float) -> None:
    """CPU runs: delay the next layer's transfer so step() finds nothing ready for a while."""
    def delayed(job, index, prepared):
        time.sleep(seconds)
        del worker._transfer_layer  # once: back to the class's method
        return worker._transfer_layer(job, index, prepared)

    worker._transfer_layer = delayed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="*", default=list(LAYER_CONFIGS), choices=list(LAYER_CONFIGS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="divide every tensor dimension (CPU smoke runs)")
    parser.add_argument("--backend", default=None, choices=[None, "auto", "triton", "torch"])
    parser.add_argument("--verify", action="store_true", help="TransferWorker(verify=True): checksums on the worker stream")
    parser.add_argument("--timeout-s", type=float, default=None, help="TransferWorker(timeout_s=...)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the swapping step() per config")
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
        local, moved, specs = LAYER_CONFIGS[name]
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
        f"{'config':<20} {'moved':>5} {'swap MB':>8} {'swap GPU us':>11} {'floor us':>9} {'x floor':>7} {'bw floor us':>11} "
        f"{'unpack us':>9} {'copy us':>8} {'step host swap us':>17} {'busy swap us':>12} {'step host none us':>17} {'idle us':>7} {'bad':>4}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['config']:<20} {r['moved']:>5} {r['swap_MB']:>8.2f} {r['swap_gpu_us']:>11.1f} {r['floor_us']:>9.1f} "
            f"{r['swap_vs_floor']:>7.2f} {r['bandwidth_floor_us']:>11.1f} {r['unpack_us']:>9.1f} {r['copy_same_us']:>8.1f} {r['step_host_swap_us']:>17.1f} {r['step_host_swap_busy_us']:>12.1f} "
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

"""Tuning sweep on a GPU: each KernelTuning variant's pack / unpack bandwidth as % of a
same-size copy_, on the issue's four configs, in one run (``python bench/gpu_kernels.py OUT_DIR``).

Usage: ``python bench/gpu_kernels.py OUT_DIR [variant,variant,...] [rounds]``. Writes
``OUT_DIR/kernels-sweep.json`` (every call's median, p10 and p90) and prints, per variant, the
median over rounds; rounds interleave the variants so that a slow spell of the machine does
not land on one variant only. Also measures the host time of the public pack()/unpack().
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_table import CONFIGS, measure, peak_copy_gbs, timer  # noqa: E402

from eplb_triton.layout import DEFAULT_TUNING, KernelTuning  # noqa: E402
from eplb_triton.testing.machine import machine_line  # noqa: E402

# Variants as measured in run 3 (bench/KERNEL_NOTES.md), spelled out in full so they keep
# their meaning when the library's defaults change. "pps16-np" is the library default now.
V2 = dict(block_words=4096, num_warps=4, programs_per_sm=8, waves=4, min_chunk=16 << 10, max_chunk=256 << 10, prefetch=True)


def _v(**changes) -> KernelTuning:
    return KernelTuning(**{**V2, **changes})


NP = dict(prefetch=False)
VARIANTS = {
    "v2-default": _v(),
    "no-prefetch": _v(**NP),
    "pps16": _v(programs_per_sm=16),
    "pps16-np": _v(programs_per_sm=16, **NP),
    "pps12-np": _v(programs_per_sm=12, **NP),
    "blocked": _v(blocked=True),
    "blocked-np": _v(blocked=True, **NP),
    "blocked-pps16": _v(blocked=True, programs_per_sm=16),
    "blocked-pps16-np": _v(blocked=True, programs_per_sm=16, **NP),
    "b8192-w8-c32k-np": _v(block_words=8192, num_warps=8, min_chunk=32 << 10, **NP),
    "c64k-b8192-w8-np": _v(min_chunk=64 << 10, max_chunk=64 << 10, block_words=8192, num_warps=8, **NP),
    "blocked-c64k-b8192-w8": _v(min_chunk=64 << 10, max_chunk=64 << 10, block_words=8192, num_warps=8, blocked=True),
    "pps24-np": _v(programs_per_sm=24, **NP),
    "pps16-np-c32k": _v(programs_per_sm=16, min_chunk=32 << 10, **NP),
}
assert VARIANTS["pps16-np"] == DEFAULT_TUNING, "the library default is the sweep's winner"


def distribution_timer(device, samples: list):
    """Like kernel_table.timer, but also keeps each call's (median, p10, p90)."""
    import triton.testing

    def time_us(fn):
        times = sorted(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all"))
        q = lambda p: 1e3 * times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
        samples.append((q(0.5), q(0.1), q(0.9)))
        return q(0.5)

    return time_us


def api_overhead(device) -> dict:
    """Host microseconds per call (tiny config, rows from numpy): public pack()/unpack() with the
    rows' pageable non-blocking copy (the library's choice) and with pinning first, against
    launch() alone and the index_select reference."""
    import numpy as np

    import eplb_triton.layout as lay
    from kernel_table import make_layer

    layout, rows = make_layer(CONFIGS[3], device)
    buf = torch.empty(len(rows) * layout.expert_bytes, dtype=torch.uint8, device=device)
    rows_dev = torch.as_tensor(rows, device=device)
    pageable = lay._as_index_tensor

    def pinned(rows_in, host, dev):
        if isinstance(rows_in, torch.Tensor):
            return rows_in.to(device=dev, dtype=torch.int64, non_blocking=True)
        return torch.from_numpy(np.ascontiguousarray(host)).pin_memory().to(dev, non_blocking=True)

    def host_us(fn, n=300):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - begin) / n * 1e6
        torch.cuda.synchronize()
        return host

    out = {"launch_only": host_us(lambda: layout.launch("pack", buf, src_rows=rows_dev))}
    out["pack_pageable"] = host_us(lambda: layout.pack(rows, buf))
    out["unpack_pageable"] = host_us(lambda: layout.unpack(buf, rows))
    lay._as_index_tensor = pinned
    try:
        out["pack_pinned"] = host_us(lambda: layout.pack(rows, buf))
        out["unpack_pinned"] = host_us(lambda: layout.unpack(buf, rows))
    finally:
        lay._as_index_tensor = pageable
    out["index_select_ref"] = host_us(lambda: layout.pack_reference(rows_dev, buf))
    half = buf.numel() // 2
    out["copy_only"] = host_us(lambda: buf[:half].copy_(buf[half : 2 * half]))
    return out


def main() -> int:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    names = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else list(VARIANTS)
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    device = torch.device("cuda")
    samples: list = []
    time_us = distribution_timer(device, samples)
    peak = peak_copy_gbs(device, time_us, 1 << 30)
    print(machine_line(device))
    print(f"large-copy peak {peak:.0f} GB/s")
    report = {"machine": machine_line(device), "peak_copy_gbs": peak, "variants": {n: {"tuning": repr(VARIANTS[n]), "rounds": []} for n in names}}
    report["api_overhead_us"] = api_overhead(device)
    print("host us per call:", {k: round(v, 1) for k, v in report["api_overhead_us"].items()}, flush=True)
    # Rounds interleave the variants, so a slow spell of the machine hits all of them alike.
    for rnd in range(rounds):
        for name in names:
            tuning = VARIANTS[name]
            results = []
            for cfg in CONFIGS:
                del samples[:]
                r = measure(cfg, device, time_us, tuning=tuning, baselines=False)
                r["copy_q"], r["pack_q"], r["unpack_q"] = samples[0], samples[1], samples[2]
                results.append(r)
            report["variants"][name]["rounds"].append(results)
            with open(os.path.join(out_dir, "kernels-sweep.json"), "w") as fh:
                json.dump(report, fh, indent=1)
        print(f"round {rnd} done", flush=True)
    print("median over rounds of % of same-size copy (pack / unpack):")
    for name in names:
        cells = []
        for c, cfg in enumerate(CONFIGS):
            per = [rr[c] for rr in report["variants"][name]["rounds"]]
            p = sorted(100 * r["copy_us"] / r["pack_us"] for r in per)
            u = sorted(100 * r["copy_us"] / r["unpack_us"] for r in per)
            exact = "" if all(r["pack_exact"] for r in per) else " NOT-EXACT"
            cells.append(f"{cfg.name[:8]} p{p[len(p) // 2]:5.1f} u{u[len(u) // 2]:5.1f} [{min(p + u):4.0f}-{max(p + u):4.0f}]{exact}")
        print(f"{name:22s} " + " | ".join(cells), flush=True)
    # Pick the variant whose worst (config, op) median is best; ties go to the better mean.
    scores = {}
    for name in names:
        meds = []
        for c in range(len(CONFIGS)):
            per = [rr[c] for rr in report["variants"][name]["rounds"]]
            for op in ("pack", "unpack"):
                vals = sorted(100 * r["copy_us"] / r[f"{op}_us"] for r in per)
                meds.append(vals[len(vals) // 2])
        scores[name] = (round(min(meds), 1), sum(meds) / len(meds))
    best = max(names, key=lambda n: scores[n])
    report["selected"] = best
    report["scores"] = scores
    with open(os.path.join(out_dir, "kernels-sweep.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(out_dir, "selected.txt"), "w") as fh:
        fh.write(best + "\n")
    print(f"selected: {best} (worst median {scores[best][0]:.1f}%, mean {scores[best][1]:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

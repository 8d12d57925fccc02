"""Tuning sweep on a GPU: each KernelTuning variant's pack / unpack bandwidth as % of a
same-size copy_, on the issue's four configs, in one run (``python bench/gpu_kernels.py OUT_DIR``).

Writes ``OUT_DIR/kernels-sweep.json`` and prints one line per variant. The default tuning is
timed twice (first and last) so the spread between identical runs is visible.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_table import CONFIGS, machine_line, measure, peak_copy_gbs, timer  # noqa: E402

from eplb_triton.layout import DEFAULT_TUNING, KernelTuning  # noqa: E402

D = DEFAULT_TUNING
VARIANTS = {
    "default": D,
    "block2048": KernelTuning(block_words=2048),
    "block8192-w8": KernelTuning(block_words=8192, num_warps=8),
    "block4096-w8": KernelTuning(block_words=4096, num_warps=8),
    "block1024-w2": KernelTuning(block_words=1024, num_warps=2),
    "pps4": KernelTuning(programs_per_sm=4),
    "pps16": KernelTuning(programs_per_sm=16),
    "waves1": KernelTuning(waves=1),
    "waves16": KernelTuning(waves=16),
    "chunk64k": KernelTuning(min_chunk=64 << 10, max_chunk=64 << 10),
    "chunk1m": KernelTuning(min_chunk=1 << 20, max_chunk=1 << 20, programs_per_sm=4),
    "one-chunk-per-program": KernelTuning(programs_per_sm=1 << 20, min_chunk=64 << 10, max_chunk=64 << 10),
    "streaming": KernelTuning(streaming=True),
    "default-again": D,
}


def main() -> int:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    device = torch.device("cuda")
    time_us = timer(device)
    peak = peak_copy_gbs(device, time_us, 1 << 30)
    print(machine_line(device))
    print(f"large-copy peak {peak:.0f} GB/s")
    report = {"machine": machine_line(device), "peak_copy_gbs": peak, "variants": {}}
    for name in names:
        tuning = VARIANTS[name]
        begin = time.perf_counter()
        results = [measure(cfg, device, time_us, tuning=tuning, baselines=False) for cfg in CONFIGS]
        report["variants"][name] = {"tuning": repr(tuning), "results": results}
        cells = []
        for r in results:
            exact = "" if r["pack_exact"] else " NOT-EXACT"
            cells.append(
                f"{r['config'][:10]} p{100 * r['copy_us'] / r['pack_us']:5.1f} u{100 * r['copy_us'] / r['unpack_us']:5.1f}{exact}"
            )
        print(f"{name:22s} " + " | ".join(cells) + f"  ({time.perf_counter() - begin:.0f}s)", flush=True)
        with open(os.path.join(out_dir, "kernels-sweep.json"), "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

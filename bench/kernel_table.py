"""Pack / unpack speed table: the Triton launch vs a same-size copy, index_select/index_copy_
and a per-row copy_ loop, on the per-rank layer configs of issue 3.

    python bench/kernel_table.py            # on a GPU: the four configs, do_bench medians
    python bench/kernel_table.py --small    # anywhere (CPU: Triton interpreter, wall-clock medians)

Prints a ``Machine:`` line and the table, and writes ``bench/results/kernels-<device>.json``.
Each config is measured ``--repeat`` times (fresh buffers each time); the table shows medians.
Bytes count read + written (2 x the packed payload, padding excluded). "% copy" is the
bandwidth of one contiguous ``copy_`` of the same bytes measured in the same run; "% peak" is
that of a 1 GiB copy. The Triton column times :meth:`ExpertLayout.launch` with the rows
already on the device (the public ``pack``/``unpack`` add the host-side row checks; their
time with numpy rows is in the JSON as ``api_us``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass

if __name__ == "__main__" and "--small" in sys.argv and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np
import torch

from eplb_triton.layout import DEFAULT_TUNING, ExpertLayout, KernelTuning
from eplb_triton.testing.machine import machine_line
from eplb_triton.testing.shapes import LAYER_CONFIGS


@dataclass(frozen=True)
class Config:
    name: str
    num_local: int
    moved: int
    tensors: tuple  # ((shape...), dtype) per tensor of one expert


# the reference layers of eplb_triton.testing.shapes (the one table of model shapes)
CONFIGS = [
    Config(name, c.num_local, c.moved, tuple((spec.shape, spec.dtype) for spec in c.tensors))
    for name, c in LAYER_CONFIGS.items()
]
SMALL_CONFIGS = [
    Config("cpu-small-bf16", 8, 4, (((32, 64), torch.bfloat16), ((64, 16), torch.bfloat16))),
    Config("cpu-odd-fp8", 6, 3, (((17, 33), torch.float8_e4m3fn), ((5,), torch.float32))),
]


def make_layer(cfg: Config, device, seed: int = 0):
    """Random tensors of one layer, the layout, and ``moved`` distinct unsorted rows."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = []
    for shape, dtype in cfg.tensors:
        elem = torch.empty(0, dtype=dtype).element_size()
        raw = torch.randint(0, 256, (cfg.num_local * math.prod(shape) * elem,), dtype=torch.uint8, device=device, generator=gen)
        tensors.append(raw.view(dtype).view(cfg.num_local, *shape))
    layout = ExpertLayout(tensors)
    rows = np.random.default_rng(seed).permutation(cfg.num_local)[: cfg.moved].astype(np.int64)
    return layout, rows


def payload_bytes(layout: ExpertLayout, count: int) -> int:
    return count * sum(layout.row_bytes)


def timer(device: torch.device):
    """``time_us(fn)``: median microseconds (do_bench with events on CUDA, wall clock on CPU)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def time_us(fn, reps: int = 5):
        fn()
        samples = []
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
        return 1e6 * statistics.median(samples)

    return time_us


def row_loop_pack(layout: ExpertLayout, rows: np.ndarray, packed: torch.Tensor) -> None:
    """The naive baseline: one copy_ per row and tensor."""
    table = packed.view(len(rows), layout.expert_bytes)
    for k, row in enumerate(rows.tolist()):
        for view, off, nbytes in zip(layout._byte_views, layout.segment_offsets, layout.row_bytes):
            table[k, off : off + nbytes].copy_(view[row])


def row_loop_unpack(layout: ExpertLayout, packed: torch.Tensor, rows: np.ndarray) -> None:
    table = packed.view(len(rows), layout.expert_bytes)
    for k, row in enumerate(rows.tolist()):
        for view, off, nbytes in zip(layout._byte_views, layout.segment_offsets, layout.row_bytes):
            view[row].copy_(table[k, off : off + nbytes])


def peak_copy_gbs(device: torch.device, time_us, nbytes: int) -> float:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src))
    return 2 * nbytes / us / 1e3


def measure(cfg: Config, device: torch.device, time_us, tuning: KernelTuning | None = None, baselines: bool = True) -> dict:
    """Times of one config: copy, Triton pack/unpack, and (optionally) the torch baselines."""
    layout, rows = make_layer(cfg, device)
    n = len(rows)
    nbytes = payload_bytes(layout, n)
    rows_dev = torch.as_tensor(rows, device=device)
    buf = torch.randint(0, 256, (n * layout.expert_bytes,), dtype=torch.uint8, device=device)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    res = {"config": cfg.name, "payload_bytes": nbytes, "rows": n, "expert_bytes": layout.expert_bytes}
    res["copy_us"] = time_us(lambda: dst.copy_(src))
    # Correctness of what is timed: the kernel against the reference, byte for byte.
    ref = torch.full_like(buf, 0xA5)
    out = ref.clone()
    layout.pack_reference(rows_dev, ref)
    layout.launch("pack", out, src_rows=rows_dev, tuning=tuning)
    res["pack_exact"] = bool(torch.equal(out, ref))
    res["launch_shape"] = repr(layout.launch_shape(n, tuning))
    res["pack_us"] = time_us(lambda: layout.launch("pack", buf, src_rows=rows_dev, tuning=tuning))
    res["unpack_us"] = time_us(lambda: layout.launch("unpack", buf, dst_rows=rows_dev, tuning=tuning))
    if baselines:
        res["pack_api_us"] = time_us(lambda: layout.pack(rows, buf, backend="triton"))
        res["unpack_api_us"] = time_us(lambda: layout.unpack(buf, rows, backend="triton"))
        res["pack_index_us"] = time_us(lambda: layout.pack_reference(rows_dev, buf))
        res["unpack_index_us"] = time_us(lambda: layout.unpack_reference(buf, rows_dev))
        res["pack_loop_us"] = time_us(lambda: row_loop_pack(layout, rows, buf))
        res["unpack_loop_us"] = time_us(lambda: row_loop_unpack(layout, buf, rows))
    return res


def combine(runs: list[dict]) -> dict:
    """One result from repeated measurements: the median of each time, the runs kept too."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if key.endswith("_us"):
            out[key] = statistics.median(r[key] for r in runs)
    out["pack_exact"] = all(r["pack_exact"] for r in runs)
    out["runs"] = runs
    return out


def rows_of_table(results: list[dict], peak_gbs: float) -> list[list[str]]:
    table = []
    for r in results:
        mb = r["payload_bytes"] / 1e6
        for op in ("pack", "unpack"):
            us = r[f"{op}_us"]
            gbs = 2 * r["payload_bytes"] / us / 1e3
            table.append(
                [
                    r["config"],
                    op,
                    f"{mb:.1f}" if mb >= 1 else f"{mb:.3f}",
                    f"{gbs:.0f}",
                    f"{100 * r['copy_us'] / us:.1f}%",
                    f"{100 * gbs / peak_gbs:.1f}%",
                    f"{r[f'{op}_index_us'] / us:.2f}x" if f"{op}_index_us" in r else "-",
                    f"{r[f'{op}_loop_us'] / us:.1f}x" if f"{op}_loop_us" in r else "-",
                ]
            )
    return table


HEADER = ["config", "op", "MB", "GB/s", "% copy", "% peak", "x index", "x loop"]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU / interpreter)")
    parser.add_argument("--repeat", type=int, default=3, help="measure each config this often; the table shows medians")
    parser.add_argument("--tuning", default=None, help="a variant name of bench/gpu_kernels.py (default: the library's)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = SMALL_CONFIGS if args.small or device.type == "cpu" else CONFIGS
    time_us = timer(device)
    peak_bytes = (1 << 30) if device.type == "cuda" else (16 << 20)
    peak = peak_copy_gbs(device, time_us, peak_bytes)
    tuning = None
    if args.tuning:
        from gpu_kernels import VARIANTS

        tuning = VARIANTS[args.tuning]
    results = [combine([measure(cfg, device, time_us, tuning=tuning) for _ in range(args.repeat)]) for cfg in configs]
    machine = machine_line(device)
    table = format_table(rows_of_table(results, peak))
    print(machine)
    print(f"tuning: {args.tuning or 'library default'} = {tuning or DEFAULT_TUNING}")
    print(f"large-copy peak: {peak:.0f} GB/s ({peak_bytes >> 20} MiB copy_, read + written)")
    print(table)
    bad = [r["config"] for r in results if not r["pack_exact"]]
    if bad:
        print(f"NOT BYTE-EXACT: {bad}")
    slug = re.sub(r"[^a-z0-9]+", "-", (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu").lower()).strip("-")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels-{slug}.json")
    with open(path, "w") as fh:
        json.dump({"machine": machine, "tuning": repr(tuning or DEFAULT_TUNING), "peak_copy_gbs": peak, "peak_copy_bytes": peak_bytes, "results": results, "table": table}, fh, indent=1)
    print(f"wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

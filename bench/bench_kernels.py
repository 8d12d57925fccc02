"""pytest-benchmark: pack / unpack of one layer (`pytest bench/bench_kernels.py --benchmark-only`).

On a GPU: the four per-rank configs of issue 3, Triton vs index_select/index_copy_ vs a per-row
copy_ loop. Without one: small shapes, the Triton kernel under the interpreter (its times say
nothing about GPU speed; it runs so the file stays exercised). Each call ends with a device
sync, so the numbers are wall time of complete ops. ``bench/kernel_table.py`` gives
event-timed medians and bandwidth.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_table import CONFIGS, SMALL_CONFIGS, make_layer, row_loop_pack, row_loop_unpack  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PARAMS = [pytest.param(cfg, id=cfg.name) for cfg in (CONFIGS if DEVICE.type == "cuda" else SMALL_CONFIGS)]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["public", "triton", "index", "loop"])
@pytest.mark.parametrize("op", ["pack", "unpack"])
@pytest.mark.parametrize("cfg", PARAMS)
def test_pack_unpack(benchmark, cfg, op, impl):
    layout, rows = make_layer(cfg, DEVICE)
    rows_dev = torch.as_tensor(rows, device=DEVICE)
    buf = torch.randint(0, 256, (len(rows) * layout.expert_bytes,), dtype=torch.uint8, device=DEVICE)
    fns = {  # "public": what users call (host rows checked and uploaded), "triton": the launch alone
        ("pack", "public"): lambda: layout.pack(rows, buf),
        ("unpack", "public"): lambda: layout.unpack(buf, rows),
        ("pack", "triton"): lambda: layout.launch("pack", buf, src_rows=rows_dev),
        ("pack", "index"): lambda: layout.pack_reference(rows_dev, buf),
        ("pack", "loop"): lambda: row_loop_pack(layout, rows, buf),
        ("unpack", "triton"): lambda: layout.launch("unpack", buf, dst_rows=rows_dev),
        ("unpack", "index"): lambda: layout.unpack_reference(buf, rows_dev),
        ("unpack", "loop"): lambda: row_loop_unpack(layout, buf, rows),
    }
    fn = fns[(op, impl)]

    def run():
        fn()
        _sync()

    run()  # compile / warm up outside the measurement
    benchmark.extra_info["payload_bytes"] = len(rows) * sum(layout.row_bytes)
    if DEVICE.type == "cuda":
        benchmark(run)
    else:  # the interpreter takes ~10 ms a call: a few rounds are enough
        benchmark.pedantic(run, rounds=5, iterations=1)

"""bench/pacing.py (issue 19's benchmark) on 2 gloo CPU ranks with tiny shapes.

Runs the script as users do (a subprocess) and checks what it writes: every setting present,
every transfer bit-exact and complete, ratios consistent with the medians they come from
(never the values: speed is for the GPU run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "pacing.py"
ROW_KEYS = {"setting", "knobs", "base_ms", "loaded_ms", "slowdown", "transfer_ms", "transfer_x_unpaced", "iterations",
            "bad_rows", "layers_done", "meets_target"}


def test_cpu_smoke_run_writes_json_table_and_chart(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--world", "2", "--quick", "--layers", "3", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("Machine: CPU") and "bit-exact: yes" in proc.stdout
    result = json.loads((tmp_path / "pacing.json").read_text())
    assert {"machine", "config", "environment", "rows", "all_correct", "target", "layer_gate_bytes"} <= set(result)
    assert result["environment"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    rows = result["rows"]
    assert len(rows) >= 6 and rows[0]["setting"] == "unpaced" and rows[0]["knobs"] == {}
    assert {"layers_per_step", "bytes_per_step", "steps_per_layer"} <= {k for r in rows for k in r["knobs"]}
    for row in rows:
        assert ROW_KEYS <= set(row), row["setting"]
        assert row["bad_rows"] == 0 and row["layers_done"] == 3, row
        assert row["transfer_x_unpaced"] == pytest.approx(row["transfer_ms"] / rows[0]["transfer_ms"])
        assert row["base_ms"]["p10_ms"] <= row["base_ms"]["median_ms"] <= row["base_ms"]["p90_ms"]
    assert result["all_correct"] is True
    table = (tmp_path / "pacing.md").read_text()
    assert all(f"| {r['setting']} |" in table for r in rows) and "Machine: CPU" in table
    if (tmp_path / "pacing.png").exists():  # matplotlib is an optional (bench) extra
        assert (tmp_path / "pacing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

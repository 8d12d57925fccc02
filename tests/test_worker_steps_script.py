"""bench/worker_steps.py on 2 gloo CPU ranks with tiny shapes: every mode timed and bit-exact,
and the tight mode's host time per method and thread (speed is for the GPU run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_run_times_every_mode_and_checks_the_bytes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "steps.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "worker_steps.py"), "--backend", "gloo", "--scale", "64", "--layers", "2",
         "--repeats", "1", "--layers-ahead", "3", "--phases", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bit-exact: yes" in proc.stdout
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2
    for rows in ranks:
        phases = rows.pop("phases, tight")
        assert list(rows)[0] == "blocking call" and len(rows) == 7
        assert phases["worker:_transfer_layer"]["calls_per_layer"] == 1.0, phases  # one per layer
        assert phases["main:step"]["calls_per_layer"] >= 0.5 and phases["main:_swap_ready"]["us_per_layer"] > 0, phases
        for mode, row in rows.items():
            assert row["ms_per_layer"] > 0, mode
            if mode != "blocking call":
                loop = "wait()" not in mode  # the wait() modes call no step() themselves
                assert (row["steps"] >= 1) == loop and row["bad_rows"] == 0, (mode, row)

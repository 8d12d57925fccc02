"""bench/link_speed.py (issue 12's benchmark) in its gloo quick mode: 2 CPU ranks.

Runs the script as users do (a subprocess), then re-reads its JSON with ``--from-json``. Every
method's result must be bit-exact; speed figures are checked for presence and consistency
(ratios against the floor computed from the same medians), never for values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "link_speed.py"
METHODS = ["floor", "torch-packed", "per-expert", "blocking", "worker"]


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("link_speed")
    proc = _run("--backend", "gloo", "--quick", "--layers", "2", "--repeats", "2", "--configs", "tiny-bf16",
                "--presets", "qwen3-30b-a3b", "--chunks", "256", "--variants", "EPLB_TRITON_DIRECT_POST=0", "--budgets", "1.5", "--worker-ahead", "3",
                "--json", str(out / "run.json"))
    return out, json.loads((out / "run.json").read_text()), proc.stdout


def test_every_method_is_bit_exact_and_timed(quick_run):
    _, result, stdout = quick_run
    configs = result["summary"]["configs"]
    assert list(configs) == ["tiny-bf16", "qwen3-30b-a3b (preset)"]
    for name, config in configs.items():
        variants = ["worker[ahead=3]", "blocking[EPLB_TRITON_CHUNK_BYTES=256]", "blocking[EPLB_TRITON_DIRECT_POST=0]",
                    "blocking[budget=1.5 layers]",
                    "blocking[budget=1.5 layers, EPLB_TRITON_DIRECT_POST=0]"]  # --variants apply to the budget rows too
        assert list(config["methods"]) == METHODS + variants, name
        assert all(b == 0 for rank in config["bad_rows"] for b in rank.values()), config["bad_rows"]
        assert set(config["bad_rows"][0]) == set(METHODS[1:]) | set(variants)
        floor = config["methods"]["floor"]["ms_per_layer"]
        for method, row in config["methods"].items():
            assert row["min_ms"] <= row["ms_per_layer"] <= row["max_ms"], (name, method)
            assert row["x_floor"] == pytest.approx(row["ms_per_layer"] / floor), (name, method)
    assert result["summary"]["machine"].startswith("Machine: CPU") and "bit-exact: yes" in stdout


def test_from_json_reprints_and_writes_the_table_and_the_chart(quick_run):
    pytest.importorskip("matplotlib")
    out, result, _ = quick_run
    proc = _run("--from-json", str(out / "run.json"), "--plot", str(out / "chart.png"), "--markdown", str(out / "table.md"))
    assert "blocking" in proc.stdout and "x floor" in proc.stdout
    table = (out / "table.md").read_text()
    assert table.count("| blocking |") == 2 and "ms/layer, median [min-max]" in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

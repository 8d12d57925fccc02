"""`python -m eplb_triton bench` on CPU: runs, verifies, writes JSON with the three columns."""

from __future__ import annotations

import json

from eplb_triton.__main__ import main


def test_bench_tiny_world2_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--world-size", "2", "--layers", "2", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    methods = {row["method"]: row for row in result["rows"]}
    assert set(methods) == {"eplb_triton", "per-expert"}  # packed-torch only differs on GPUs
    assert all(row["bad_rows"] == 0 for row in result["rows"])
    assert methods["eplb_triton"]["p2p_ops_per_layer"] < methods["per-expert"]["p2p_ops_per_layer"]
    assert result["machine"].startswith("Machine: ")
    assert "Machine:" in capsys.readouterr().out


def test_bench_plot_writes_a_png(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert main(["bench", "--preset", "tiny", "--world-size", "2", "--layers", "1", "--repeats", "1", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""`python -m eplb_triton bench` on CPU: runs, verifies, writes JSON with medians and spread, and a chart."""

from __future__ import annotations

import json

from eplb_triton.__main__ import main


def test_bench_tiny_world2_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--world-size", "2", "--layers", "2", "--repeats", "3", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    methods = {row["method"]: row for row in result["rows"]}
    assert set(methods) == {"eplb_triton", "per-expert"}  # packed-torch only differs on GPUs
    assert all(row["bad_rows"] == 0 for row in result["rows"])
    assert methods["eplb_triton"]["p2p_ops_per_layer"] < methods["per-expert"]["p2p_ops_per_layer"]
    for row in result["rows"]:  # the median over repeats, with its spread and every repeat
        repeats = row["time_per_layer_ms_repeats"]
        assert len(repeats) == 3 and sorted(repeats)[1] == row["time_per_layer_ms"]
        assert row["time_per_layer_ms_min"] == min(repeats) and row["time_per_layer_ms_max"] == max(repeats)
        q1, q3 = row["time_per_layer_ms_iqr"]
        assert min(repeats) <= q1 <= row["time_per_layer_ms"] <= q3 <= max(repeats)
    low, high = methods["eplb_triton"]["speedup_min_max"]
    assert low <= methods["eplb_triton"]["speedup_vs_per_expert"] <= high
    assert methods["per-expert"]["speedup_min_max"] is None
    assert result["config"]["repeats"] == 3 and result["config"]["world_size"] == 2
    assert result["machine"].startswith("Machine: ")
    printed = capsys.readouterr().out
    assert "Machine:" in printed and "min-max ms" in printed and "\r" not in printed


def test_bench_plot_writes_a_png(tmp_path):
    # matplotlib is in the test extra (make test installs it): run, never skip
    png = tmp_path / "bench.png"
    assert main(["bench", "--preset", "tiny", "--world-size", "2", "--layers", "1", "--repeats", "1", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The README's first command, small: the demo rebalances and verifies every row."""

from __future__ import annotations

from eplb_triton.__main__ import main


def test_demo_runs_and_verifies(capsys):
    assert main(["demo", "--world-size", "2", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "verified: every row holds its new expert, bit for bit" in out


def test_demo_preset_scaled_down(capsys):
    assert main(["demo", "--preset", "qwen3-30b-a3b", "--world-size", "4", "--layers", "1", "--scale", "32"]) == 0
    assert "verified" in capsys.readouterr().out


def test_cli_usage():
    assert main([]) == 2

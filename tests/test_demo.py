"""The README's first command, small: the demo rebalances several times and verifies every row."""

from __future__ import annotations

import pytest

from eplb_triton.__main__ import main


@pytest.mark.parametrize("mode", [pytest.param([], id="worker"), pytest.param(["--sync"], id="sync")])
def test_demo_runs_and_verifies(capsys, mode):
    argv = ["demo", "--world-size", "2", "--layers", "2", "--rebalances", "2", "--no-progress", *mode]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "verified: every row holds its new expert, bit for bit" in out
    for column in ("time s", "network MB", "local MB", "staging MB", "bad rows"):
        assert f"{column}: " in out, f"the legend does not explain {column!r}"
    if mode:  # the blocking API has no step(): no stall column, no word about it
        assert "stall" not in out and "step()" not in out
    else:
        assert "stall ms/layer: " in out


def test_demo_preset_scaled_down(capsys):
    argv = ["demo", "--preset", "qwen3-30b-a3b", "--world-size", "4", "--layers", "1", "--scale", "32", "--no-progress"]
    assert main(argv) == 0
    assert "verified" in capsys.readouterr().out


def test_demo_module_main_still_works(capsys):
    from eplb_triton import demo

    assert demo.main(["--world-size", "1", "--layers", "1", "--rebalances", "1", "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().out

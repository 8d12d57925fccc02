"""The command line: argument errors, help text, progress and tables (`eplb_triton/__main__.py`, `_cli.py`)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eplb_triton import _cli, demo
from eplb_triton.testing import benchmark
from eplb_triton.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m eplb_triton ARGS`` in a fresh process with stdout and stderr piped (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "eplb_triton", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )


@pytest.fixture
def no_ranks(monkeypatch):
    """Any rank started fails the test: argument errors must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("ranks were started despite a bad argument")

    monkeypatch.setattr(demo, "run_ranks", refuse)
    monkeypatch.setattr(benchmark, "run_ranks", refuse)


def _assert_usage_error(capsys, argv: list[str], fragment: str) -> None:
    """argparse's convention: exit status 2, usage lines, then exactly one ``error:`` line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.rstrip("\n").split("\n")
    assert lines[0].startswith("usage: eplb-triton "), captured.err
    assert all(line.startswith(" ") for line in lines[1:-1]), captured.err  # usage continuation lines only
    assert lines[-1].startswith(f"eplb-triton {argv[0]}: error: "), captured.err
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in captured.err and captured.out == ""


BAD_ARGUMENTS = [
    pytest.param(["demo", "--world-size", "0"], "--world-size: must be at least 1, got 0", id="demo-world-size-0"),
    pytest.param(["demo", "--world-size", "-2"], "--world-size: must be at least 1, got -2", id="demo-world-size-neg"),
    pytest.param(["demo", "--world-size", "two"], "--world-size: must be an integer", id="demo-world-size-text"),
    pytest.param(["demo", "--scale", "0"], "--scale: must be at least 1", id="demo-scale-0"),
    pytest.param(["demo", "--layers", "0"], "--layers: must be at least 1", id="demo-layers-0"),
    pytest.param(["demo", "--rebalances", "0"], "--rebalances: must be at least 1", id="demo-rebalances-0"),
    pytest.param(["demo", "--timeout", "0"], "--timeout: must be a finite number above 0", id="demo-timeout-0"),
    pytest.param(["demo", "--seed", "-1"], "--seed: must be 0 or more", id="demo-seed-neg"),
    pytest.param(["demo", "--preset", "gpt5"], "--preset: invalid choice", id="demo-preset-unknown"),
    pytest.param(["bench", "--repeats", "0"], "--repeats: must be at least 1, got 0", id="bench-repeats-0"),
    pytest.param(["bench", "--world-size", "0"], "--world-size: must be at least 1", id="bench-world-size-0"),
    pytest.param(["bench", "--layers", "0"], "--layers: must be at least 1", id="bench-layers-0"),
    pytest.param(["bench", "--json", "/no/such/dir/out.json"], "does not exist", id="bench-json-no-dir"),
    pytest.param(["bench", "--plot", "/no/such/dir/out.png"], "does not exist", id="bench-plot-no-dir"),
]


@pytest.mark.parametrize("argv, fragment", BAD_ARGUMENTS)
def test_bad_argument_is_one_error_line_and_status_2(capsys, no_ranks, argv, fragment):
    _assert_usage_error(capsys, argv, fragment)


def test_json_path_that_is_a_directory(capsys, no_ranks, tmp_path):
    _assert_usage_error(capsys, ["bench", "--json", str(tmp_path)], "is a directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("command", ["demo", "bench"])
def test_nccl_without_gpu(capsys, no_ranks, command):
    _assert_usage_error(capsys, [command, "--dist-backend", "nccl"], "nccl needs a CUDA GPU and none is visible")


def test_nccl_world_larger_than_gpu_count(capsys, no_ranks, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _assert_usage_error(capsys, ["demo", "--dist-backend", "nccl", "--world-size", "2"], "needs 2 GPUs (one per rank); 1 visible")


def test_plot_without_matplotlib(capsys, no_ranks, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then reports it missing
    _assert_usage_error(capsys, ["bench", "--plot", str(tmp_path / "b.png")], "--plot needs matplotlib")


def test_triton_kernels_on_cpu_without_interpreter(capsys, no_ranks, monkeypatch):
    monkeypatch.setattr(_cli, "_triton_interpreted", lambda: False)
    _assert_usage_error(capsys, ["demo", "--kernel-backend", "triton"], "needs TRITON_INTERPRET=1")


def test_kernel_backend_from_environment_is_checked(capsys, no_ranks, monkeypatch):
    monkeypatch.setenv("EPLB_TRITON_BACKEND", "cuda")
    _assert_usage_error(capsys, ["bench"], "EPLB_TRITON_BACKEND='cuda' is not one of auto, triton, torch")


def test_triton_on_cpu_without_interpreter_in_a_fresh_process():
    """The real thing: without TRITON_INTERPRET the kernels compile for GPUs only."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = _run_cli("demo", "--kernel-backend", "triton", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith("python -m eplb_triton demo: error: --kernel-backend triton on CPU")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_old_backend_option_still_accepted(capsys):
    args = build_parser().parse_args(["demo", "--backend", "gloo"])
    assert args.dist_backend == "gloo"
    assert "--backend is now --dist-backend" in capsys.readouterr().err
    assert build_parser().parse_args(["demo"]).dist_backend == "gloo"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "eplb-triton: error: the following arguments are required: COMMAND"


def _help(capsys, argv: list[str], prog: str = "eplb-triton") -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"], prog=prog)
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [pytest.param([], id="top"), pytest.param(["demo"], id="demo"), pytest.param(["bench"], id="bench")])
def test_help_is_plain_text(capsys, argv):
    text = _help(capsys, argv)
    for markup in ("``", ":class:", ":func:", ":meth:", ":mod:", ".. "):
        assert markup not in text, f"raw reST {markup!r} in help:\n{text}"


def test_top_level_help_lists_the_commands(capsys):
    text = _help(capsys, [])
    assert re.search(r"^\s+demo\s+\S", text, re.M) and re.search(r"^\s+bench\s+\S", text, re.M), text
    assert "--version" in text


def test_help_shows_defaults_and_keeps_lists(capsys):
    demo_help = " ".join(_help(capsys, ["demo"]).split())  # argparse wraps to the terminal's width
    assert "(default: tiny)" in demo_help and "(default: 3)" in demo_help and "(default: 0)" in demo_help
    assert "--dist-backend" in demo_help and "--kernel-backend" in demo_help
    assert "--backend " not in demo_help.replace("--dist-backend ", "").replace("--kernel-backend ", "")
    bench_help = _help(capsys, ["bench"])
    assert "(default: 5)" in " ".join(bench_help.split())
    methods = [line.split()[0] for line in bench_help.splitlines() if re.match(r"^  (eplb_triton|per-expert|packed-torch) ", line)]
    assert methods == ["eplb_triton", "per-expert", "packed-torch"], bench_help


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert re.fullmatch(r"eplb-triton \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_prog_name_follows_how_it_was_started():
    assert _run_cli("--help").stdout.startswith("usage: python -m eplb_triton ")
    script = Path(sys.executable).parent / "eplb-triton"
    if not script.exists():
        pytest.skip("no eplb-triton console script next to this interpreter")
    out = subprocess.run([str(script), "bench", "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.startswith("usage: eplb-triton bench ")


def test_demo_output_in_a_pipe_is_clean_lines():
    """Not a terminal: no carriage returns, one progress line per rebalance, the table header on
    its own line after them."""
    result = _run_cli("demo", "--world-size", "2", "--layers", "2", "--rebalances", "2")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout and "\r" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("eplb_triton demo: preset=tiny")
    assert [l.split(":")[0] for l in lines[1:3]] == ["rebalance 1/2", "rebalance 2/2"], lines
    assert lines[3].split() == ["rebalance", "time", "s", "ms/layer", "network", "MB", "local", "MB", "GB/s", "p2p",
                                "ops", "staging", "MB", "stall", "ms/layer", "bad", "rows"]
    assert [l.split()[0] for l in lines[4:6]] == ["1", "2"]
    assert lines[6] == "columns:"


def test_demo_runs_without_tqdm():
    """tqdm is an optional extra (`cli`): without it the demo prints plain progress lines."""
    probe = (
        "import sys; sys.modules['tqdm'] = None; from eplb_triton.__main__ import main; "
        "sys.exit(main(['demo', '--world-size', '1', '--layers', '1', '--rebalances', '2']))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "rebalance 2/2: 1 layers in" in result.stdout and "verified: every row" in result.stdout


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no descriptor")


def test_progress_mode(monkeypatch):
    assert _cli.progress_mode(False, _Terminal()) == "off"
    assert _cli.progress_mode(True, io.StringIO()) == "lines"
    assert _cli.progress_mode(True, _Terminal()) == "lines"  # a terminal of unknown width: no bar
    monkeypatch.setattr(_cli.os, "get_terminal_size", lambda fd: os.terminal_size((80, 24)))
    monkeypatch.setattr(_Terminal, "fileno", lambda self: 1)
    assert _cli.progress_mode(True, _Terminal()) == "bar"
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert _cli.progress_mode(True, _Terminal()) == "lines"


def test_progress_lines_and_bar():
    stream = io.StringIO()
    with _cli.Progress("lines", total=4, desc="layers", unit="layer", stream=stream) as progress:
        progress.update(2)
        progress.note("rebalance 1/2 done")
        progress.update(2)
        progress.note("rebalance 2/2 done")
    assert stream.getvalue() == "rebalance 1/2 done\nrebalance 2/2 done\n"

    pytest.importorskip("tqdm")
    stream = io.StringIO()
    with _cli.Progress("bar", total=4, desc="layers", unit="layer", stream=stream) as progress:
        progress.update(4)
        progress.note("all done")
    final = stream.getvalue().split("\r")[-1]
    assert final.startswith("layers: 100%") and "4/4" in final and final.endswith("\n")  # the bar stays

    stream = io.StringIO()
    with _cli.Progress("off", total=4, desc="layers", unit="layer", stream=stream) as progress:
        progress.update(4)
        progress.note("nothing")
    assert stream.getvalue() == ""


def test_format_table_aligns_columns():
    rows = [{"name": "eplb_triton", "ms": 1.5, "n": 3}, {"name": "per-expert", "ms": 12.25, "n": 33}]
    lines = _cli.format_table([("method", "name", "<"), ("ms/layer", "ms", ".2f"), ("ops", "n", "d")], rows)
    assert lines == [
        "method       ms/layer  ops",
        "eplb_triton      1.50    3",
        "per-expert      12.25   33",
    ]

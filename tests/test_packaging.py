"""What the package installs and exports: `kernels/` as `eplb_triton.kernels` (never a top-level
`kernels`), `py.typed`, `testing/` for the CLI commands, only torch, triton and numpy as hard
requirements, and a top level that exports what a runtime calls."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_maps_kernels_under_eplb_triton(tmp_path):
    kernels = importlib.import_module("eplb_triton.kernels")
    assert Path(kernels.__file__).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    # From a directory outside the repo (so the checkout itself is not on sys.path), the
    # installation must provide eplb_triton.kernels and no top-level `kernels`.
    probe = (
        "import importlib.util as u; "
        "print(u.find_spec('eplb_triton.kernels') is not None, u.find_spec('kernels') is None)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        cwd=build,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    (wheel,) = out.glob("eplb_triton-*.whl")
    return wheel


def test_wheel_ships_kernels_inside_eplb_triton(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "eplb_triton/kernels/__init__.py" in names
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"eplb_triton"}, f"unexpected top-level entries: {top_levels}"


def test_wheel_ships_the_runtime_adapters_and_the_vllm_plugin(wheel):
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    for module in ("__init__", "vllm", "sglang", "_staging", "_patches"):
        assert f"eplb_triton/integrations/{module}.py" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = archive.read(entry_points).decode()
    assert "[vllm.general_plugins]" in text and "eplb_triton.integrations.vllm:vllm_plugin" in text


def test_wheel_ships_py_typed(wheel):
    """PEP 561 marker: type checkers read the package's own hints."""
    assert "eplb_triton/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_wheel_needs_only_torch_triton_numpy(wheel):
    """tqdm and matplotlib are extras (`cli`, `bench`), not requirements of the library."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [l.split(":", 1)[1].strip() for l in archive.read(metadata).decode().splitlines() if l.startswith("Requires-Dist:")]
    hard = sorted(r.split(">")[0].split("=")[0].split(";")[0].strip() for r in requires if "extra ==" not in r)
    assert hard == ["numpy", "torch", "triton"], requires
    assert any(r.startswith("tqdm") and 'extra == "cli"' in r for r in requires), requires


# What a runtime calls; everything else stays importable from its module only.
RUNTIME_API = [
    "ChecksumMismatchError",
    "PeerError",
    "PeerFailedError",
    "PeerTimeoutError",
    "RearrangementPlan",
    "TransferError",
    "TransferProgress",
    "TransferStats",
    "TransferWorker",
    "align_placement",
    "plan_rearrangement",
    "rearrange_expert_weights_inplace",
    "reserve",
]
INTERNALS = {
    "LayerPlan": "eplb_triton.plan",
    "RankPlan": "eplb_triton.plan",
    "plan_layer": "eplb_triton.plan",
    "normalize_elastic_maps": "eplb_triton.plan",
    "ExpertLayout": "eplb_triton.layout",
    "ExpertMaps": "eplb_triton.maps",
    "normalize_maps": "eplb_triton.maps",
    "linear_assignment": "eplb_triton.align",
}


def test_top_level_exports_what_a_runtime_calls():
    import eplb_triton

    assert sorted(eplb_triton.__all__) == sorted(RUNTIME_API)
    for name in RUNTIME_API:
        assert getattr(eplb_triton, name) is not None, name


@pytest.mark.parametrize("name,module", [pytest.param(n, m, id=n) for n, m in INTERNALS.items()])
def test_internals_only_from_their_module(name, module):
    import eplb_triton

    assert not hasattr(eplb_triton, name)
    assert hasattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", ["TransferError", "PeerError", "PeerTimeoutError", "PeerFailedError", "ChecksumMismatchError"])
def test_errors_are_one_class_wherever_they_are_imported_from(name):
    """Defined once in eplb_triton.errors; docs, tests and runtimes also name them through
    eplb_triton and eplb_triton.comm."""
    import eplb_triton
    from eplb_triton import comm, errors

    assert getattr(eplb_triton, name) is getattr(errors, name) is getattr(comm, name)


TESTING_MODULES = ("__init__", "launch", "synthetic", "balancer", "shapes", "baseline", "benchmark", "machine")


def test_wheel_ships_what_the_cli_commands_use(wheel):
    """`eplb-triton demo|bench` run from an installed package: their support lives in eplb_triton/testing/."""
    names = zipfile.ZipFile(wheel).namelist()
    for module in TESTING_MODULES:
        assert f"eplb_triton/testing/{module}.py" in names
    assert "eplb_triton/demo.py" in names and "eplb_triton/errors.py" in names


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_cli_commands_run_outside_the_checkout(tmp_path, command):
    """From a directory outside the repo (no checkout on sys.path) each command imports and answers --help."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-m", "eplb_triton", command, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m eplb_triton {command}"), out.stdout[:200]

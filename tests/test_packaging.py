"""`kernels/` installs as `eplb_triton.kernels`, never as a top-level `kernels` package."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_maps_kernels_under_eplb_triton():
    kernels = importlib.import_module("eplb_triton.kernels")
    assert Path(kernels.__file__).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert importlib.util.find_spec("kernels") is None, "a top-level `kernels` package is importable"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        cwd=build,
        env={**__import__("os").environ, "PIP_NO_INPUT": "1"},
    )
    (wheel,) = out.glob("eplb_triton-*.whl")
    return wheel


def test_wheel_ships_kernels_inside_eplb_triton(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "eplb_triton/kernels/__init__.py" in names
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"eplb_triton"}, f"unexpected top-level entries: {top_levels}"

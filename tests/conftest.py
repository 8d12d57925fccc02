"""Shared fixtures: devices, the `gpu` marker, and the `distributed` helper."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run through the interpreter on CPU tensors; the variable must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eplb_triton.testing.launch import run_ranks

torch.set_num_threads(1)  # forked ranks must not inherit a live OpenMP pool

HAS_CUDA = torch.cuda.is_available()


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    # On a GPU machine conftest leaves the interpreter off, so Triton cannot run on CPU
    # tensors there; `CUDA_VISIBLE_DEVICES= python -m pytest` runs these tests on such a machine.
    skip_interpreter = pytest.mark.skip(reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRETED:
            item.add_marker(skip_interpreter)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def interpreted_on_cpu(device):
    """For tests that run Triton on ``device``: the CPU case needs the interpreter."""
    if device.type == "cpu" and not INTERPRETED:
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    return device


@pytest.fixture
def distributed():
    """``distributed(world_size, fn, *args)`` runs ``fn(rank, world_size, *args)`` on gloo ranks."""

    def launch(world_size, fn, *args, timeout_s: float = 120.0):
        return run_ranks(world_size, fn, *args, backend="gloo", timeout_s=timeout_s, group_timeout_s=60.0)

    return launch


@pytest.fixture(autouse=True, scope="session")
def _backend_from_environment():
    """With ``EPLB_TRITON_BACKEND=triton`` (CI's second run) every default backend must really be
    Triton, through the interpreter on CPU: fail the session early if it would fall back."""
    if os.environ.get("EPLB_TRITON_BACKEND") == "triton":
        from eplb_triton.layout import resolve_backend

        assert resolve_backend(None, torch.device("cpu")) == "triton"
        assert HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1", "the Triton backend on CPU needs TRITON_INTERPRET=1"
    yield

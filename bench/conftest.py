"""pytest-benchmark suites: `python -m pytest bench/ --benchmark-only`."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run through the interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)  # forked ranks must not inherit a live OpenMP pool

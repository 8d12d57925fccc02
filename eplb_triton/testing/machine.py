"""The ``Machine:`` line every benchmark prints and stores next to its numbers.

One format for every table and JSON under bench/results/: what ran (the GPU's name, the GPUs
and NCCL version of a multi-process run, or the CPU), then the torch and triton versions.

Test and benchmark support, not part of the runtime API.
"""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["machine_line"]


def machine_line(device: torch.device | str | None = None, *, world_size: int | None = None, dist_backend: str | None = None) -> str:
    """``Machine: <what ran>, torch X, triton Y``.

    ``device``: the device timed (default: the current CUDA device if there is one, else the
    CPU). ``world_size`` and ``dist_backend`` describe a multi-process run: ``nccl`` names
    every GPU kind and the NCCL version, ``gloo`` the number of CPU ranks.
    """
    import triton

    if dist_backend == "nccl":
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
        version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        what = f"{world_size} x {' / '.join(names)} (one process per GPU, NCCL {version})"
    else:
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(device)
        if device.type == "cuda":
            what = torch.cuda.get_device_name(device)
        else:
            what = f"CPU {platform.machine()} x{os.cpu_count()}"
            if os.environ.get("TRITON_INTERPRET") == "1":
                what += " (Triton interpreter)"
        if dist_backend == "gloo":
            what += f" ({world_size} gloo ranks)"
    return f"Machine: {what}, torch {torch.__version__}, triton {triton.__version__}"

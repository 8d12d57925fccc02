"""The worker's test seams, in one place so a test patches one module.

Nothing here is public API: tests replace these attributes (``monkeypatch.setattr``) to run
the worker's GPU ordering on CPU, or set :data:`eplb_triton.transfer.fault_hook` (the one
fault hook of both paths) to inject faults on the worker thread.
"""

from __future__ import annotations

import torch

from .. import transfer

#: Where events and the current stream come from (``torch.cuda``). A test seam: a fake with
#: ``Event`` and ``current_stream`` (plus a fake ``worker._stream``) records the order of the
#: worker's record/wait calls on CPU, where no CUDA stream exists.
_cuda = torch.cuda


def fault(point: str, **info) -> None:
    """Call :data:`eplb_triton.transfer.fault_hook` if set. The worker thread's points:
    ``layer_start`` (rank, layer), ``before_send`` (rank, layer, ``pass_index``: the staging pass), ``in_flight``
    (rank, layer, pass_index, ``received``: each peer's received packed experts, before they are checked)
    and ``before_publish`` (rank, layer). The hook may raise, sleep, exit or corrupt ``received``."""
    transfer.fault(point, **info)

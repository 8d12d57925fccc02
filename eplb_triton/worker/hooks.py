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


_STREAMS: dict[tuple, object] = {}  # torch's current-stream ids -> a Stream object for them (current_stream)
_get_current_stream = getattr(torch._C, "_cuda_getCurrentStream", None)  # private: may be absent


def current_stream(device: torch.device):
    """``_cuda.current_stream(device)``, with the Stream object cached by torch's stream id:
    ``torch.cuda.current_stream`` builds a new one per call: 18-36 us of a swapping ``step()``'s
    host time on an H200 host (session 13's instrumented swap; 6-16 us in a tight loop)."""
    if _cuda is not torch.cuda or _get_current_stream is None or device.index is None:
        return _cuda.current_stream(device)
    ids = _get_current_stream(device.index)  # (stream id, device index, device type)
    stream = _STREAMS.get(ids)
    if stream is None:
        if len(_STREAMS) >= 64:  # streams come and go (a runtime's side streams): keep it small
            _STREAMS.clear()
        stream = _STREAMS[ids] = _cuda.current_stream(device)  # the Stream object of those ids
    return stream


def fault(point: str, **info) -> None:
    """Call :data:`eplb_triton.transfer.fault_hook` if set. The worker thread's points:
    ``layer_start`` (rank, layer), ``before_send`` (rank, layer, ``pass_index``: the staging pass), ``in_flight``
    (rank, layer, pass_index, ``received``: each peer's received packed experts, before they are checked)
    and ``before_publish`` (rank, layer). The hook may raise, sleep, exit or corrupt ``received``."""
    transfer.fault(point, **info)

"""The blocking rearrangement staged in a runtime's own scratch buffer, shared by the adapters."""

from __future__ import annotations

import logging

from ..transfer import TransferStats
from ..transfer import rearrange_expert_weights_inplace as _rearrange

log = logging.getLogger(__name__)

# The messages of the library's ValueErrors that mean "this buffer is too small to stage it".
_TOO_SMALL = ("is too small for this layer", "less than one packed expert")


def rearrange_in_buffer(old, new, layers, group, buffer, **options) -> TransferStats:
    """Rearrange with ``buffer`` (a runtime's per-tensor scratch) as the staging, not atomic
    (the runtimes' own paths are not either), so nothing is allocated.

    When the schedule finds the buffer too small for some layer (move cycles that need more
    experts in one round than its largest tensor holds), every rank finds it (same maps, same
    buffer shapes) before any weight is touched; then the call runs again with the library's
    own staging, and a warning says so.
    """
    try:
        return _rearrange(old, new, layers, group, staging=buffer, atomic=False, **options)
    except ValueError as exc:
        if not any(text in str(exc) for text in _TOO_SMALL):
            raise
        log.warning("eplb_triton: the runtime's scratch buffer is too small here (%s); allocating staging", exc)
        return _rearrange(old, new, layers, group, **options)

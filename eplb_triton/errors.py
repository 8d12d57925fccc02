"""The errors a rearrangement raises once it has started (bad input raises ValueError/TypeError).

``TransferError`` is the base; ``PeerError`` (a peer timed out or failed: the process group must
be re-created) and ``ChecksumMismatchError`` (``verify=True`` found corrupted bytes; the group is
healthy) are its two kinds. ``eplb_triton`` and ``eplb_triton.comm`` re-export them.
"""

from __future__ import annotations

__all__ = ["ChecksumMismatchError", "PeerError", "PeerFailedError", "PeerTimeoutError", "TransferError"]


class TransferError(RuntimeError):
    """A rearrangement failed after it started. ``layer`` / ``peer`` name where, when known."""

    def __init__(self, message: str, *, layer: int | None = None, peer: int | None = None):
        super().__init__(message)
        self.layer = layer
        self.peer = peer


class PeerError(TransferError):
    """An exchange with ``peer`` failed; the process group must be considered broken."""


class PeerTimeoutError(PeerError):
    """``peer`` did not complete an exchange before the deadline."""


class PeerFailedError(PeerError):
    """The backend reported an error for an exchange with ``peer`` (e.g. its connection closed)."""


class ChecksumMismatchError(TransferError):
    """``verify=True`` found received bytes that differ from what the sender packed.

    ``expert`` is the logical expert id. The group itself is healthy: the exchanges completed.
    """

    def __init__(self, message: str, *, layer: int | None = None, peer: int | None = None, expert: int | None = None):
        super().__init__(message, layer=layer, peer=peer)
        self.expert = expert

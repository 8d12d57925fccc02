"""What one rank did during a rearrangement: :class:`TransferStats` (both paths fill it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["TransferStats"]


@dataclass
class TransferStats:
    """What one rank did during a rearrangement.

    ``bytes_sent[p]`` / ``bytes_received[p]``: packed bytes exchanged with EP peer ``p``
    (with ``verify``, the checksum trailers included: what went over the wire; a message sent
    straight from the weights carries the rows without the packed layout's padding).
    ``p2p_ops``: isend + irecv ops issued. ``layer_times_s[l]``: wall time of layer ``l`` (the
    layers of a stack share its time equally); on GPUs the blocking call may return before its
    layers ran, and the first read of ``layer_times_s`` then waits for them (CUDA events).
    ``peak_staging_bytes``: the largest staging buffer used at once. ``rounds``: staging
    passes over all layers (a stack of layers is one pass; the field keeps its old name; it does
    not count network rounds).
    ``local_copies``: rows written by local moves and duplicate fills. ``peak_undo_bytes``:
    the rollback buffer (layers that run in several passes). ``verified_experts``: received
    experts whose checksum was checked. ``rollbacks``: layers rolled back after a failure.
    ``failed_layers``: layers left old on this rank. ``control_ops``: ops of the final
    confirmation (not counted in ``p2p_ops``). ``exchanges``: batches of p2p ops issued (one
    per staging pass with network traffic, or one per network round with ``rounds=``);
    ``max_ops_per_exchange``: the largest batch (at most ``2 * (ep_size - 1)``, times the
    tensors with row bytes where messages go straight from the weights; at most 2 with
    ``rounds=``). ``overlapped_layers``: layers packed and posted while the layer before
    them was still on the wire (two staging slots, see :func:`eplb_triton.executor.run_layers`).
    ``stacked_layers``: layers that shared one exchange with other layers (:mod:`eplb_triton.stacked`);
    ``exchanges`` counts such a stack once.
    """

    rank: int
    ep_size: int
    bytes_sent: np.ndarray
    bytes_received: np.ndarray
    p2p_ops: int = 0
    _layer_times: list[float] = field(default_factory=list, repr=False)
    peak_staging_bytes: int = 0
    rounds: int = 0
    local_copies: int = 0
    peak_undo_bytes: int = 0
    verified_experts: int = 0
    rollbacks: int = 0
    failed_layers: list[int] = field(default_factory=list)
    control_ops: int = 0
    exchanges: int = 0
    max_ops_per_exchange: int = 0
    overlapped_layers: int = 0
    stacked_layers: int = 0
    _read_times: Callable[[], list[float]] | None = field(default=None, repr=False, compare=False)

    @property
    def layer_times_s(self) -> list[float]:
        read, self._read_times = self._read_times, None
        if read is not None:
            self._layer_times = read()
        return self._layer_times

    @layer_times_s.setter
    def layer_times_s(self, times: list[float]) -> None:
        self._read_times = None
        self._layer_times = list(times)

    def defer_layer_times(self, read: Callable[[], list[float]]) -> None:
        """Let the first read of :attr:`layer_times_s` call ``read()`` (which may wait for the device)."""
        self._read_times = read

    def __getstate__(self) -> dict:  # pickled or copied: with the times read
        state = dict(self.__dict__)
        state["_layer_times"], state["_read_times"] = self.layer_times_s, None
        return state

    @classmethod
    def empty(cls, rank: int, ep_size: int) -> "TransferStats":
        zeros = np.zeros(ep_size, dtype=np.int64)
        return cls(rank=rank, ep_size=ep_size, bytes_sent=zeros.copy(), bytes_received=zeros.copy())

    @property
    def total_bytes_sent(self) -> int:
        return int(self.bytes_sent.sum())

    @property
    def total_bytes_received(self) -> int:
        return int(self.bytes_received.sum())

    @property
    def total_time_s(self) -> float:
        return float(sum(self.layer_times_s))

    def traffic_summary(self) -> str:
        """One line: bytes sent / received per peer (peers with traffic only)."""
        sent = {p: int(b) for p, b in enumerate(self.bytes_sent) if b}
        received = {p: int(b) for p, b in enumerate(self.bytes_received) if b}
        return (
            f"rank {self.rank}: sent {self.total_bytes_sent} B {sent}, received {self.total_bytes_received} B "
            f"{received}, {len(self.layer_times_s)} layers in {self.total_time_s:.4f} s, {self.rounds} passes, "
            f"{self.p2p_ops} p2p ops"
        )

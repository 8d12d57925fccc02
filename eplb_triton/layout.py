"""Packed byte layout of one layer's expert rows, and the pack / unpack / copy ops on it.

A layer's weights on one rank are several tensors shaped ``(num_local, ...)`` of any dtype
(fp32, bf16, fp16, float8, uint8, int32 scales...) whose rows are contiguous. One *packed
expert* is the concatenation of one row of every tensor, each tensor's segment starting at a
16-byte aligned offset::

    | tensor 0 row (row_bytes[0]) | pad | tensor 1 row | pad | ... |   <- expert_bytes

so ``k`` experts pack into ``k * expert_bytes`` contiguous bytes (``uint8``), the unit that
travels over the network.

Ops (each has a Triton launcher for CUDA tensors and a torch reference, the oracle and the
CPU path):

* ``pack(rows, out)``: ``out[k*expert_bytes : (k+1)*expert_bytes] = expert(rows[k])``;
  rows may repeat.
* ``unpack(buf, rows)``: the inverse, writing into the tensors' rows; rows must be distinct.
* ``copy_rows(src_rows, dst_rows)``: ``row dst_rows[i] = old row src_rows[i]`` for every
  tensor, as if all sources were read before any destination is written.

Backends: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"triton"``, ``"torch"``.
The environment variable ``EPLB_TRITON_BACKEND`` overrides the default of ``None``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

__all__ = ["ALIGN_BYTES", "BACKENDS", "ExpertLayout", "resolve_backend"]

ALIGN_BYTES = 16  # one 16-byte vector access per thread: the widest global load on NVIDIA GPUs
BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "EPLB_TRITON_BACKEND"


def _align(nbytes: int) -> int:
    return (nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Turn ``None``/``"auto"`` into ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _byte_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A ``(num_local, row_bytes)`` uint8 view aliasing ``tensor``'s rows (any dtype)."""
    elem = tensor.element_size()
    row_bytes = tensor[0].numel() * elem if tensor.shape[0] else 0
    storage = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    storage.set_(tensor.untyped_storage())
    return storage.as_strided((tensor.shape[0], row_bytes), (tensor.stride(0) * elem, 1), tensor.storage_offset() * elem)


def _rows_contiguous(tensor: torch.Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(tensor.shape[1:]), reversed(tensor.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def check_layer_tensors(tensors: Sequence[torch.Tensor], where: str = "layer") -> None:
    """Raise TypeError/ValueError if ``tensors`` cannot form one layer's expert layout."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{where}: expected a list or tuple of tensors, got {type(tensors).__name__}")
    if not tensors:
        raise ValueError(f"{where}: has no tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}, tensor {i}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{where}, tensor {i}: must have a leading num_local dimension, got a 0-d tensor")
    num_local = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.shape[0] != num_local:
            raise ValueError(
                f"{where}: tensors disagree on num_local: tensor 0 has {num_local} rows, tensor {i} has {t.shape[0]}"
            )
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{where}: tensors on different devices: tensor 0 on {device}, tensor {i} on {t.device}")
        if not _rows_contiguous(t):
            raise ValueError(
                f"{where}, tensor {i}: rows are not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                "each t[row] must be one contiguous block"
            )


def _as_index_tensor(rows, device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        if rows.dtype != torch.int64:
            rows = rows.to(torch.int64)
        return rows.to(device, non_blocking=True)
    return torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)


class ExpertLayout:
    """The packed layout of one layer's expert rows across all its tensors.

    Args:
        tensors: the layer's weight tensors on this rank, each ``(num_local, ...)`` with
            contiguous rows, all on one device, any dtypes.

    Attributes:
        num_local: rows per tensor.
        row_bytes: bytes of one row of each tensor.
        segment_offsets: byte offset of each tensor's segment inside a packed expert.
        expert_bytes: bytes of one packed expert (multiple of 16).
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        check_layer_tensors(tensors)
        self.tensors = list(tensors)
        self.device = self.tensors[0].device
        self.num_local = int(self.tensors[0].shape[0])
        self.row_bytes = [int(t[0].numel() * t.element_size()) if self.num_local else 0 for t in self.tensors]
        offsets, offset = [], 0
        for nbytes in self.row_bytes:
            offsets.append(offset)
            offset += _align(nbytes)
        self.segment_offsets = offsets
        self.expert_bytes = max(offset, ALIGN_BYTES)
        self._byte_views = [_byte_rows(t) for t in self.tensors]
        self._triton_state = None  # descriptor tables, built on first Triton use

    @property
    def layer_bytes(self) -> int:
        """Bytes of this rank's rows of the layer (what a layer-sized staging buffer holds)."""
        return sum(self.row_bytes) * self.num_local

    def __repr__(self) -> str:
        return (
            f"ExpertLayout(num_local={self.num_local}, tensors={len(self.tensors)}, "
            f"row_bytes={self.row_bytes}, expert_bytes={self.expert_bytes}, device={self.device})"
        )

    # -- argument checks ------------------------------------------------------------------
    def _check_rows(self, rows, what: str, distinct: bool) -> torch.Tensor:
        rows_t = _as_index_tensor(rows, self.device)
        if rows_t.dim() != 1:
            raise ValueError(f"{what}: rows must be 1-D, got shape {tuple(rows_t.shape)}")
        if rows_t.numel():
            host = rows if isinstance(rows, np.ndarray) else rows_t.cpu().numpy()
            if host.min() < 0 or host.max() >= self.num_local:
                raise ValueError(f"{what}: rows must lie in [0, {self.num_local}), got min {host.min()} max {host.max()}")
            if distinct and np.unique(host).size != host.size:
                raise ValueError(f"{what}: destination rows repeat; each row may be written once")
        return rows_t

    def _check_buffer(self, buf: torch.Tensor, count: int, what: str) -> torch.Tensor:
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise TypeError(f"{what}: buffer must be a contiguous 1-D torch.uint8 tensor")
        if buf.device != self.device:
            raise ValueError(f"{what}: buffer on {buf.device}, weights on {self.device}")
        need = count * self.expert_bytes
        if buf.numel() < need:
            raise ValueError(f"{what}: buffer holds {buf.numel()} bytes, {count} experts need {need}")
        return buf[:need]

    # -- ops --------------------------------------------------------------------------------
    def pack(self, rows, out: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """Gather expert ``rows[k]`` into ``out[k*expert_bytes:]``; returns the used prefix of ``out``."""
        rows_t = self._check_rows(rows, "pack", distinct=False)
        packed = self._check_buffer(out, rows_t.numel(), "pack")
        if rows_t.numel() == 0:
            return packed
        if resolve_backend(backend, self.device) == "triton":
            from .layout_triton import triton_pack

            triton_pack(self, rows_t, packed)
        else:
            self.pack_reference(rows_t, packed)
        return packed

    def unpack(self, buf: torch.Tensor, rows, backend: str | None = None) -> None:
        """Scatter packed experts ``buf[k*expert_bytes:]`` into rows ``rows[k]`` (distinct)."""
        rows_t = self._check_rows(rows, "unpack", distinct=True)
        packed = self._check_buffer(buf, rows_t.numel(), "unpack")
        if rows_t.numel() == 0:
            return
        if resolve_backend(backend, self.device) == "triton":
            from .layout_triton import triton_unpack

            triton_unpack(self, packed, rows_t)
        else:
            self.unpack_reference(packed, rows_t)

    def copy_rows(self, src_rows, dst_rows, backend: str | None = None, scratch: torch.Tensor | None = None) -> None:
        """Copy old row ``src_rows[i]`` to row ``dst_rows[i]`` in every tensor.

        Sources are read as they were before the call, also when a source is another pair's
        destination. ``scratch`` (uint8, ``len(rows) * expert_bytes``) is used as staging when
        sources and destinations overlap.
        """
        src_t = self._check_rows(src_rows, "copy_rows", distinct=False)
        dst_t = self._check_rows(dst_rows, "copy_rows", distinct=True)
        if src_t.numel() != dst_t.numel():
            raise ValueError(f"copy_rows: {src_t.numel()} sources but {dst_t.numel()} destinations")
        if src_t.numel() == 0:
            return
        if resolve_backend(backend, self.device) == "triton":
            from .layout_triton import triton_copy_rows

            src_host = np.asarray(src_rows) if not isinstance(src_rows, torch.Tensor) else src_t.cpu().numpy()
            dst_host = np.asarray(dst_rows) if not isinstance(dst_rows, torch.Tensor) else dst_t.cpu().numpy()
            overlap = bool(np.intersect1d(src_host, dst_host).size)
            triton_copy_rows(self, src_t, dst_t, overlap, scratch)
        else:
            self.copy_rows_reference(src_t, dst_t)

    # -- torch reference (oracle and CPU path) ------------------------------------------------
    def pack_reference(self, rows: torch.Tensor, packed: torch.Tensor) -> None:
        table = packed.view(rows.numel(), self.expert_bytes)
        for view, offset, nbytes in zip(self._byte_views, self.segment_offsets, self.row_bytes):
            if nbytes:
                table[:, offset : offset + nbytes].copy_(view.index_select(0, rows))

    def unpack_reference(self, packed: torch.Tensor, rows: torch.Tensor) -> None:
        table = packed.view(rows.numel(), self.expert_bytes)
        for view, offset, nbytes in zip(self._byte_views, self.segment_offsets, self.row_bytes):
            if nbytes:
                view.index_copy_(0, rows, table[:, offset : offset + nbytes])

    def copy_rows_reference(self, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
        for view, nbytes in zip(self._byte_views, self.row_bytes):
            if nbytes:
                view.index_copy_(0, dst_rows, view.index_select(0, src_rows))

"""Per-expert checksums of packed experts, for ``verify=True`` transfers.

A packed expert (``expert_bytes`` bytes, a multiple of 16) is read as ``W`` little-endian
32-bit words ``u_j`` (unsigned). Its checksum is two position-weighted sums modulo two
distinct primes just below ``2**31``, packed into one non-negative int64::

    a = sum_j (u_j mod P1) * (j + 1)   mod P1        P1 = 2**31 - 1
    b = sum_j (u_j mod P2) * (W - j)   mod P2        P2 = 2**31 - 19
    checksum = a * 2**31 + b

Why this shape: every weight is in ``[1, W]``, non-zero and below both primes, so changing
one word by ``d != 0`` (``|d| < 2**32 < P1 * P2``) always changes ``a`` or ``b``; swapping two
different words changes both sums (their weights differ); random corruption goes unnoticed
with probability about ``2**-62``. All arithmetic stays below ``2**63`` (every product is
reduced before it is summed), so the torch reference, a Triton kernel and any other
implementation get the same bits, with no reliance on signed overflow.

Backends: ``"torch"`` (any device; the reference), ``"triton"`` (one program per
(expert, block of words) writes reduced partial sums, torch adds the partials: same bits as
the reference) and ``"auto"`` (Triton for CUDA tensors, torch otherwise). The Triton kernel is
``kernels/checksum.py`` (installed as ``eplb_triton.kernels.checksum``); this module launches it
and holds the torch reference.
"""

from __future__ import annotations

import torch

__all__ = ["CHECKSUM_BYTES", "CHECKSUM_BACKENDS", "P1", "P2", "expert_checksums", "trailer_bytes"]

P1 = 2_147_483_647  # 2**31 - 1, prime
P2 = 2_147_483_629  # 2**31 - 19, prime
CHECKSUM_BYTES = 8  # one int64 per expert
CHECKSUM_BACKENDS = ("auto", "torch", "triton")
_BLOCK_WORDS = 1024  # words per Triton program
_CHUNK_WORDS = 1 << 21  # bounds the int64 temporaries to a few tens of MiB


def trailer_bytes(count: int) -> int:
    """Bytes of the checksum trailer for ``count`` experts, padded to 16 (keeps segments aligned)."""
    return (count * CHECKSUM_BYTES + 15) // 16 * 16


def expert_checksums(
    packed: torch.Tensor, expert_bytes: int, out: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """Checksums of the ``len(packed) // expert_bytes`` packed experts in ``packed``.

    Args:
        packed: contiguous 1-D ``torch.uint8`` tensor, ``k * expert_bytes`` bytes.
        expert_bytes: bytes per packed expert, a positive multiple of 4.
        out: optional ``(k,)`` int64 tensor on ``packed``'s device to write into.
        backend: ``"auto"``/``None`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.

    Returns:
        ``(k,)`` int64 checksums (``out`` when given).
    """
    if backend not in (None, *CHECKSUM_BACKENDS):
        raise ValueError(f"checksum backend must be one of {CHECKSUM_BACKENDS}, got {backend!r}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1 or not packed.is_contiguous():
        raise TypeError("packed must be a contiguous 1-D torch.uint8 tensor")
    if expert_bytes <= 0 or expert_bytes % 4:
        raise ValueError(f"expert_bytes must be a positive multiple of 4, got {expert_bytes}")
    if packed.numel() % expert_bytes:
        raise ValueError(f"packed holds {packed.numel()} bytes, not a multiple of expert_bytes={expert_bytes}")
    count = packed.numel() // expert_bytes
    if out is None:
        out = torch.empty(count, dtype=torch.int64, device=packed.device)
    elif out.shape != (count,) or out.dtype != torch.int64:
        raise ValueError(f"out must be an int64 tensor of shape ({count},)")
    if count:
        use_triton = backend == "triton" or (backend in (None, "auto") and packed.device.type == "cuda")
        table = packed.view(count, expert_bytes)
        out.copy_(_checksums_triton(table) if use_triton else _checksums_torch(table))
    return out


def _checksums_triton(table: torch.Tensor) -> torch.Tensor:
    count, nbytes = table.shape
    words = nbytes // 4
    num_blocks = (words + _BLOCK_WORDS - 1) // _BLOCK_WORDS
    part_a = torch.empty((count, num_blocks), dtype=torch.int64, device=table.device)
    part_b = torch.empty_like(part_a)
    from .kernels.checksum import checksum_partials_kernel  # importing triton is slow: only when used

    checksum_partials_kernel[(count, num_blocks)](
        table.view(torch.int32), part_a, part_b, words, num_blocks, P1=P1, P2=P2, BLOCK=_BLOCK_WORDS
    )
    # partials < 2**31 each: their sum fits int64 for any realistic expert size
    return (part_a.sum(dim=1) % P1) * (1 << 31) + part_b.sum(dim=1) % P2


def _checksums_torch(table: torch.Tensor) -> torch.Tensor:
    count, nbytes = table.shape
    words = nbytes // 4
    device = table.device
    word_table = table.view(torch.int32)  # (count, words)
    a = torch.zeros(count, dtype=torch.int64, device=device)
    b = torch.zeros(count, dtype=torch.int64, device=device)
    cols = max(1, min(words, _CHUNK_WORDS))
    rows = max(1, _CHUNK_WORDS // cols)
    for c0 in range(0, words, cols):
        c1 = min(words, c0 + cols)
        j = torch.arange(c0, c1, dtype=torch.int64, device=device)
        w1, w2 = j + 1, words - j
        for r0 in range(0, count, rows):
            r1 = min(count, r0 + rows)
            u = word_table[r0:r1, c0:c1].to(torch.int64) & 0xFFFFFFFF
            # products < 2**62, reduced before summing: a chunk's sum stays < 2**53
            a[r0:r1] += ((u % P1) * w1 % P1).sum(dim=1)
            b[r0:r1] += ((u % P2) * w2 % P2).sum(dim=1)
        a %= P1
        b %= P2
    return a * (1 << 31) + b

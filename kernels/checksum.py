"""Triton kernel of the per-expert checksum (``verify=True``); launcher and torch reference in
:mod:`eplb_triton.checksum`. This file holds only ``@triton.jit`` code.

Each expert's bytes are read as uint32 words ``u_j`` (``j`` from 0); the checksum is two
position-weighted sums, ``a = sum(u_j * (j + 1)) mod P1`` and ``b = sum(u_j * (W - j)) mod P2``.
Program ``(expert, block)`` reduces ``BLOCK`` words into one partial of each sum; the launcher
adds the partials and passes the primes (both below 2**31).
"""

import triton
import triton.language as tl


@triton.jit
def checksum_partials_kernel(
    words_ptr, part_a_ptr, part_b_ptr, num_words, num_blocks, P1: tl.constexpr, P2: tl.constexpr, BLOCK: tl.constexpr
):
    expert = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    j = block * BLOCK + tl.arange(0, BLOCK)
    mask = j < num_words
    u = tl.load(words_ptr + expert * num_words + j, mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    jj = j.to(tl.int64)
    # each term < 2**31 after reduction, so BLOCK of them sum far below 2**63
    ta = tl.where(mask, ((u % P1) * (jj + 1)) % P1, 0)
    tb = tl.where(mask, ((u % P2) * (num_words - jj)) % P2, 0)
    tl.store(part_a_ptr + expert * num_blocks + block, tl.sum(ta, axis=0) % P1)
    tl.store(part_b_ptr + expert * num_blocks + block, tl.sum(tb, axis=0) % P2)

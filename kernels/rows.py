"""Triton kernel that moves expert rows of several tensors in one launch.

Launchers, block-size choices, shapes and the torch reference live in
:mod:`eplb_triton.layout`; this file holds only ``@triton.jit`` code.

Every tensor of a layer is described by one column of an int64 descriptor table
``desc[FIELD, t]`` (see the ``F_*`` constants): its base address, row stride in bytes, row
bytes, segment offset inside a packed expert, and whether base, stride and row bytes are all
multiples of 16. Tensors are addressed through their integer base address cast to a pointer,
so one launch reaches every tensor of a layer (this also works under ``TRITON_INTERPRET=1``
on CPU tensors).

Work unit: a *chunk* of at most ``CHUNK`` bytes of one row of one tensor. A packed expert has
``chunks_per_expert`` chunks (tensor by tensor, each row split into ``cdiv(row_bytes, CHUNK)``
chunks), and a launch moves ``num_rows * chunks_per_expert`` chunks. The grid is persistent:
program ``pid`` takes chunks ``pid, pid + nprog, ...``, so large rows are split across
programs and small rows are batched inside one program.
"""

import triton
import triton.language as tl

# Descriptor table rows (fields); constexpr globals so jit code may read them (`.value` on the host).
F_BASE = tl.constexpr(0)  # int64 base address of the tensor (data_ptr of its first row)
F_STRIDE = tl.constexpr(1)  # bytes between consecutive rows
F_ROW_BYTES = tl.constexpr(2)  # bytes of one row
F_SEGMENT = tl.constexpr(3)  # byte offset of this tensor's segment inside a packed expert
F_ALIGNED = tl.constexpr(4)  # 1 if base, stride and row bytes are multiples of 16
NUM_FIELDS = tl.constexpr(5)

# MODE values.
MODE_PACK = tl.constexpr(0)  # tensor rows src_rows[k] -> packed expert k
MODE_UNPACK = tl.constexpr(1)  # packed expert k -> tensor rows dst_rows[k]
MODE_COPY = tl.constexpr(2)  # tensor rows src_rows[k] -> tensor rows dst_rows[k]


@triton.jit
def _copy_span_words(src_addr, dst_addr, begin, end, BLOCK: tl.constexpr, STREAMING: tl.constexpr):
    """Copy bytes [begin, end) of a 16-byte aligned span as int32 words, 4 per thread access."""
    # The hint goes on the pointer (after the cast): on the integer it does not reach the loads.
    src = tl.multiple_of(src_addr.to(tl.pointer_type(tl.int32)), 16)
    dst = tl.multiple_of(dst_addr.to(tl.pointer_type(tl.int32)), 16)
    w_begin = tl.multiple_of(begin // 4, 4)
    w_end = tl.multiple_of(end // 4, 4)
    lane = tl.arange(0, BLOCK)
    for w in range(w_begin, w_end, BLOCK):
        offs = tl.multiple_of(w, 4) + lane
        mask = offs < w_end
        if STREAMING:
            vals = tl.load(src + offs, mask=mask, eviction_policy="evict_first")
            tl.store(dst + offs, vals, mask=mask, cache_modifier=".cs")
        else:
            vals = tl.load(src + offs, mask=mask)
            tl.store(dst + offs, vals, mask=mask)


@triton.jit
def _copy_span_bytes(src_addr, dst_addr, begin, end, BYTE_BLOCK: tl.constexpr):
    """Copy bytes [begin, end) one byte per lane: any size, any alignment."""
    src = src_addr.to(tl.pointer_type(tl.uint8))
    dst = dst_addr.to(tl.pointer_type(tl.uint8))
    lane = tl.arange(0, BYTE_BLOCK)
    for b in range(begin, end, BYTE_BLOCK):
        offs = b + lane
        mask = offs < end
        vals = tl.load(src + offs, mask=mask)
        tl.store(dst + offs, vals, mask=mask)


@triton.jit
def move_rows_kernel(
    desc_ptr,  # int64 [NUM_FIELDS, T_PAD] descriptor table
    src_rows_ptr,  # int64 [num_rows]: source rows (PACK, COPY)
    dst_rows_ptr,  # int64 [num_rows]: destination rows (UNPACK, COPY)
    buf_addr,  # int64 address of the packed buffer (PACK, UNPACK)
    buf_aligned,  # 1 if the packed buffer's address is a multiple of 16
    num_rows,
    expert_bytes,
    MODE: tl.constexpr,
    T_PAD: tl.constexpr,  # power of two >= number of tensors
    CHUNK: tl.constexpr,  # bytes per work unit (multiple of 16)
    BLOCK: tl.constexpr,  # int32 words per tile on the 16-byte path
    BYTE_BLOCK: tl.constexpr,  # bytes per tile on the byte path
    HAS_UNALIGNED: tl.constexpr,  # False compiles the byte path out
    STREAMING: tl.constexpr,  # evict-first loads / streaming stores
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)

    # Per-tensor chunk counts and their inclusive prefix sums, once per program.
    t_idx = tl.arange(0, T_PAD)
    row_bytes_v = tl.load(desc_ptr + F_ROW_BYTES * T_PAD + t_idx)
    n_chunks_v = (row_bytes_v + (CHUNK - 1)) // CHUNK
    cum_v = tl.cumsum(n_chunks_v, axis=0)
    chunks_per_expert = tl.sum(n_chunks_v, axis=0)
    total = chunks_per_expert * num_rows  # int64: chunks_per_expert is a sum of int64

    for j in range(pid, total, nprog):
        k = j // chunks_per_expert
        r = j - k * chunks_per_expert
        # Tensor of chunk r: the first whose inclusive prefix exceeds r.
        t = tl.sum((cum_v <= r).to(tl.int32), axis=0)
        first_chunk = tl.sum(tl.where(t_idx == t, cum_v - n_chunks_v, 0), axis=0)
        begin = (r - first_chunk) * CHUNK
        base = tl.load(desc_ptr + F_BASE * T_PAD + t)
        stride = tl.load(desc_ptr + F_STRIDE * T_PAD + t)
        nbytes = tl.load(desc_ptr + F_ROW_BYTES * T_PAD + t)
        end = tl.minimum(begin + CHUNK, nbytes)
        packed = buf_addr + k * expert_bytes + tl.load(desc_ptr + F_SEGMENT * T_PAD + t)
        if MODE == MODE_PACK:
            src = base + tl.load(src_rows_ptr + k) * stride
            dst = packed
        elif MODE == MODE_UNPACK:
            src = packed
            dst = base + tl.load(dst_rows_ptr + k) * stride
        else:
            src = base + tl.load(src_rows_ptr + k) * stride
            dst = base + tl.load(dst_rows_ptr + k) * stride
        if HAS_UNALIGNED:
            aligned = tl.load(desc_ptr + F_ALIGNED * T_PAD + t)
            if MODE != MODE_COPY:
                aligned = aligned * buf_aligned
            if aligned != 0:
                _copy_span_words(src, dst, begin, end, BLOCK, STREAMING)
            else:
                _copy_span_bytes(src, dst, begin, end, BYTE_BLOCK)
        else:
            _copy_span_words(src, dst, begin, end, BLOCK, STREAMING)

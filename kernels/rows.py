"""Triton kernel that moves expert rows of several tensors in one launch.

Launchers, block-size choices, shapes and the torch reference live in
:mod:`eplb_triton.layout`; this file holds only ``@triton.jit`` code.

Work unit: a *chunk*, at most ``CHUNK`` bytes of one row of one tensor. One packed expert is
``chunks_per_expert`` chunks (tensor by tensor, each row cut into ``cdiv(row_bytes, CHUNK)``
pieces), described by an int64 table ``chunk_desc[c, FIELD]`` (``C_*`` fields below) that the
launcher builds once per layout and chunk size:

* ``C_BASE``: address of the chunk in row 0 of its tensor (tensor base + byte offset in the row),
* ``C_STRIDE``: the tensor's row stride in bytes,
* ``C_PACKED``: byte offset of the chunk inside a packed expert (segment offset + offset in row),
* ``C_SIZE_FLAG``: the chunk's size and a flag in one field, ``(chunk bytes << 1) | aligned``;
  aligned = 1 when base, stride and row bytes are multiples of 16 (the 16-byte path), else 0
  (the byte path).

Tensors are reached through integer addresses cast to pointers, so one launch covers every
tensor of a layer; this also works under ``TRITON_INTERPRET=1`` on CPU tensors.

With ``LAYERED``, one launch covers several layers of the same row shapes (a stacked layout):
the table holds each layer's ``chunks_per_expert`` descriptors one layer after the other, and a
row number ``r`` means row ``r % layer_rows`` of layer ``r // layer_rows``. A ``COPY`` stays
inside one layer (its destination row is read in the source row's layer).

A launch moves ``num_rows * chunks_per_expert`` chunks on a persistent grid: program ``pid``
takes chunks ``pid, pid + nprog, ...`` (or, with ``BLOCKED``, one contiguous run of chunks),
so large rows are split across programs and small rows batched in one; with ``PREFETCH`` it
loads the next chunk's descriptor before copying the current one.

``move_rows_pair_kernel`` runs two such moves of two layers (say one layer's unpack and the
next layer's pack) as one launch: one launch less of host time, and the two share the SMs.
"""

import inspect

import triton
import triton.language as tl

# The row lists are views at any 8-byte offset of one uploaded tensor. A variant compiled per
# 16-byte alignment of them would load a new module at a worker's first launch of such a view,
# on its thread, which can deadlock beside a kernel waiting for a peer (CUDA lazy loading: see
# eplb_triton/worker/staging.py, _load_kernels). Older Triton: do_not_specialize covers pointers.
_ANY_ROW_ALIGNMENT = {
    ("do_not_specialize_on_alignment" if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters
     else "do_not_specialize"): ["src_rows_ptr", "dst_rows_ptr"]
}

_ANY_PAIR_ROW_ALIGNMENT = {key: ["rows_a_ptr", "rows_b_ptr"] for key in _ANY_ROW_ALIGNMENT}

# Fields of a chunk descriptor; constexpr globals so jit code may read them (`.value` on the host).
C_BASE = tl.constexpr(0)
C_STRIDE = tl.constexpr(1)
C_PACKED = tl.constexpr(2)
C_SIZE_FLAG = tl.constexpr(3)  # (bytes << 1) | aligned
NUM_FIELDS = tl.constexpr(4)

# MODE values.
MODE_PACK = tl.constexpr(0)  # tensor rows src_rows[k] -> packed expert k
MODE_UNPACK = tl.constexpr(1)  # packed expert k -> tensor rows dst_rows[k]
MODE_COPY = tl.constexpr(2)  # tensor rows src_rows[k] -> tensor rows dst_rows[k]


@triton.jit
def _copy_span_words(src_addr, dst_addr, nbytes, BLOCK: tl.constexpr, STREAMING: tl.constexpr):
    """Copy ``nbytes`` (a multiple of 16) between 16-byte aligned addresses, 16 bytes per access."""
    # The hint goes on the pointer (after the cast): on the integer it does not reach the loads.
    src = tl.multiple_of(src_addr.to(tl.pointer_type(tl.int32)), 16)
    dst = tl.multiple_of(dst_addr.to(tl.pointer_type(tl.int32)), 16)
    n_words = tl.multiple_of(nbytes // 4, 4)
    lane = tl.arange(0, BLOCK)
    for w in range(0, n_words, BLOCK):
        offs = tl.multiple_of(w, 4) + lane
        mask = offs < n_words
        if STREAMING:
            vals = tl.load(src + offs, mask=mask, eviction_policy="evict_first")
            tl.store(dst + offs, vals, mask=mask, cache_modifier=".cs")
        else:
            vals = tl.load(src + offs, mask=mask)
            tl.store(dst + offs, vals, mask=mask)


@triton.jit
def _copy_span_bytes(src_addr, dst_addr, nbytes, BYTE_BLOCK: tl.constexpr):
    """Copy ``nbytes`` one byte per lane: any size, any alignment."""
    src = src_addr.to(tl.pointer_type(tl.uint8))
    dst = dst_addr.to(tl.pointer_type(tl.uint8))
    lane = tl.arange(0, BYTE_BLOCK)
    for b in range(0, nbytes, BYTE_BLOCK):
        offs = b + lane
        mask = offs < nbytes
        vals = tl.load(src + offs, mask=mask)
        tl.store(dst + offs, vals, mask=mask)


@triton.jit
def _chunk_ends(
    j, chunk_desc_ptr, src_rows_ptr, dst_rows_ptr, buf_addr, chunks_per_expert, expert_bytes, layer_rows,
    MODE: tl.constexpr, LAYERED: tl.constexpr,
):
    """Source address, destination address and size flag ``(bytes << 1) | aligned`` of chunk ``j``."""
    k = j // chunks_per_expert
    c = (j - k * chunks_per_expert).to(tl.int64)
    if MODE == MODE_UNPACK:
        row = tl.load(dst_rows_ptr + k)
    else:
        row = tl.load(src_rows_ptr + k)
    if LAYERED:  # row r of the stack: row r % layer_rows of layer r // layer_rows
        layer = row // layer_rows
        row = row - layer * layer_rows
        c = c + layer * chunks_per_expert
    d = chunk_desc_ptr + c * NUM_FIELDS
    base = tl.load(d + C_BASE)
    stride = tl.load(d + C_STRIDE)
    size_flag = tl.load(d + C_SIZE_FLAG)
    packed = buf_addr + k.to(tl.int64) * expert_bytes + tl.load(d + C_PACKED)
    if MODE == MODE_PACK:
        src = base + row * stride
        dst = packed
    elif MODE == MODE_UNPACK:
        src = packed
        dst = base + row * stride
    else:
        dst_row = tl.load(dst_rows_ptr + k)
        if LAYERED:
            dst_row = dst_row - layer * layer_rows
        src = base + row * stride
        dst = base + dst_row * stride
    return src, dst, size_flag


@triton.jit(**_ANY_ROW_ALIGNMENT)
def move_rows_kernel(
    chunk_desc_ptr,  # int64 [chunks_per_expert, NUM_FIELDS]
    src_rows_ptr,  # int64 [num_rows]: source rows (PACK, COPY)
    dst_rows_ptr,  # int64 [num_rows]: destination rows (UNPACK, COPY)
    buf_addr,  # int64 address of the packed buffer (PACK, UNPACK; 0 for COPY)
    buf_aligned,  # 1 if the packed buffer's address is a multiple of 16
    num_rows,
    chunks_per_expert,  # descriptors per expert of one layer
    expert_bytes,
    layer_rows,  # LAYERED: rows per layer (num_local)
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,  # int32 words per tile on the 16-byte path
    BYTE_BLOCK: tl.constexpr,  # bytes per tile on the byte path
    HAS_UNALIGNED: tl.constexpr,  # False compiles the byte path out
    STREAMING: tl.constexpr,  # evict-first loads / streaming stores
    PREFETCH: tl.constexpr,  # load the next chunk's descriptor before copying the current one
    BLOCKED: tl.constexpr,  # program pid takes a contiguous run of chunks instead of every nprog-th
    LAYERED: tl.constexpr,  # rows number the rows of several layers (see the module docstring)
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    total = num_rows * chunks_per_expert  # int32: < 2**31 chunks of >= 16 bytes
    last = total - 1
    if BLOCKED:
        # Consecutive chunks of one row: descriptors share cache lines, addresses stay close.
        share = (total + nprog - 1) // nprog
        j_begin = pid * share
        j_end = tl.minimum(j_begin + share, total)
        step = 1
    else:
        j_begin = pid
        j_end = total
        step = nprog
    src, dst, size_flag = _chunk_ends(
        tl.minimum(j_begin, last), chunk_desc_ptr, src_rows_ptr, dst_rows_ptr, buf_addr, chunks_per_expert, expert_bytes,
        layer_rows, MODE, LAYERED,
    )
    for j in range(j_begin, j_end, step):
        if not PREFETCH:
            src, dst, size_flag = _chunk_ends(
                j, chunk_desc_ptr, src_rows_ptr, dst_rows_ptr, buf_addr, chunks_per_expert, expert_bytes, layer_rows,
                MODE, LAYERED,
            )
        cur_src, cur_dst, cur_size_flag = src, dst, size_flag
        if PREFETCH:
            # Issued now, used next iteration: the loads overlap this chunk's copy.
            src, dst, size_flag = _chunk_ends(
                tl.minimum(j + step, last), chunk_desc_ptr, src_rows_ptr, dst_rows_ptr, buf_addr, chunks_per_expert,
                expert_bytes, layer_rows, MODE, LAYERED,
            )
        nbytes = cur_size_flag // 2
        if HAS_UNALIGNED:
            aligned = cur_size_flag & 1
            if MODE != MODE_COPY:
                aligned = aligned & buf_aligned
            if aligned != 0:
                _copy_span_words(cur_src, cur_dst, nbytes, BLOCK, STREAMING)
            else:
                _copy_span_bytes(cur_src, cur_dst, nbytes, BYTE_BLOCK)
        else:
            _copy_span_words(cur_src, cur_dst, nbytes, BLOCK, STREAMING)


@triton.jit
def _pair_chunk_ends(
    j, total_a,
    desc_a_ptr, rows_a_ptr, buf_a_addr, buf_a_aligned, cpe_a, expert_bytes_a,
    desc_b_ptr, rows_b_ptr, buf_b_addr, buf_b_aligned, cpe_b, expert_bytes_b,
    MODE_A: tl.constexpr, MODE_B: tl.constexpr,
):
    """:func:`_chunk_ends` of chunk ``j`` of a pair launch (part A's chunks, then part B's), and
    whether that part's packed buffer is 16-byte aligned."""
    if j < total_a:
        src, dst, size_flag = _chunk_ends(
            j, desc_a_ptr, rows_a_ptr, rows_a_ptr, buf_a_addr, cpe_a, expert_bytes_a, 1, MODE_A, False
        )
        buf_aligned = buf_a_aligned
    else:
        src, dst, size_flag = _chunk_ends(
            j - total_a, desc_b_ptr, rows_b_ptr, rows_b_ptr, buf_b_addr, cpe_b, expert_bytes_b, 1, MODE_B, False
        )
        buf_aligned = buf_b_aligned
    return src, dst, size_flag, buf_aligned


@triton.jit(**_ANY_PAIR_ROW_ALIGNMENT)
def move_rows_pair_kernel(
    desc_a_ptr,  # int64 [cpe_a, NUM_FIELDS]: part A's layout (one layer)
    rows_a_ptr,  # int64 [rows_a]: part A's rows (UNPACK: destinations, PACK: sources)
    buf_a_addr,  # int64 address of part A's packed buffer
    buf_a_aligned,
    rows_a,
    cpe_a,
    expert_bytes_a,
    desc_b_ptr,  # part B: the same fields, of another layer
    rows_b_ptr,
    buf_b_addr,
    buf_b_aligned,
    rows_b,
    cpe_b,
    expert_bytes_b,
    MODE_A: tl.constexpr,  # MODE_PACK or MODE_UNPACK (no COPY)
    MODE_B: tl.constexpr,
    BLOCK: tl.constexpr,
    BYTE_BLOCK: tl.constexpr,
    HAS_UNALIGNED: tl.constexpr,
    STREAMING: tl.constexpr,
):
    """Two moves in one launch, on one persistent grid: part A (``rows_a`` experts of one
    layer) and part B (``rows_b`` of another), e.g. one layer's unpack beside the next layer's
    pack. The parts must not overlap in memory (nothing orders them). Chunks are taken as in
    :func:`move_rows_kernel` (every nprog-th, no prefetch), part A's first."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    total_a = rows_a * cpe_a
    total = total_a + rows_b * cpe_b
    for j in range(pid, total, nprog):
        src, dst, size_flag, buf_aligned = _pair_chunk_ends(
            j, total_a,
            desc_a_ptr, rows_a_ptr, buf_a_addr, buf_a_aligned, cpe_a, expert_bytes_a,
            desc_b_ptr, rows_b_ptr, buf_b_addr, buf_b_aligned, cpe_b, expert_bytes_b,
            MODE_A, MODE_B,
        )
        nbytes = size_flag // 2
        if HAS_UNALIGNED:
            if (size_flag & 1 & buf_aligned) != 0:
                _copy_span_words(src, dst, nbytes, BLOCK, STREAMING)
            else:
                _copy_span_bytes(src, dst, nbytes, BYTE_BLOCK)
        else:
            _copy_span_words(src, dst, nbytes, BLOCK, STREAMING)

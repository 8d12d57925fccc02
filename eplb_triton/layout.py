"""Packed byte layout of one layer's expert rows, and the pack / unpack / copy ops on it.

(Over 400 lines: the layout, its argument checks, the Triton launcher and its caches, and the torch
reference all read the same segment offsets; splitting them would spread one byte layout over files.)

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
The environment variable ``EPLB_TRITON_BACKEND`` overrides the default of ``None``. The
``"triton"`` backend also runs on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton
was imported (that is how CI tests the kernels).

Triton launcher (:meth:`ExpertLayout.launch`, kernel in ``eplb_triton.kernels.rows``): one
launch moves ``len(rows)`` experts of every tensor of the layer.

* Inputs: ``rows`` int64 ``(n,)`` on the weights' device; ``buf`` uint8 ``(>= n *
  expert_bytes,)`` contiguous; the tensors as given to the layout (any dtype, contiguous rows,
  any base address).
* Descriptors: a chunk table ``(chunks_per_expert, 4)`` int64 (chunk address in row 0 =
  ``data_ptr`` + offset, row stride in bytes, offset in the packed expert, size flag
  ``(bytes << 1) | aligned``), built on the host once per layout and chunk size and cached on
  the device.
* Copies: 16 bytes per thread access (int32 x 4) where base, stride and row bytes are
  multiples of 16 and the buffer is 16-byte aligned, else one byte per lane; 64-bit addresses
  throughout; a persistent grid of at most ``SMs * programs_per_sm`` programs over chunks of
  16-256 KB, so large rows spread over many programs and small rows share one.
* No host sync: the launcher only reads host-side metadata. The public ops validate rows on
  the host: numpy / list / CPU-tensor rows cost no device sync; rows given as a CUDA tensor
  are copied to the host once for the checks (that waits for the stream).
* ``copy_rows`` is one launch when no source is also a destination; otherwise it packs the
  sources into ``scratch`` and unpacks them (two launches), so every source is read first.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .settings import int_setting

__all__ = ["ALIGN_BYTES", "BACKENDS", "ExpertLayout", "KernelTuning", "resolve_backend"]

log = logging.getLogger(__name__)

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
    if 0 in tensor.shape[1:]:  # rows of zero bytes: nothing to lay out, any strides will do
        return True
    expected = 1
    for size, stride in zip(reversed(tensor.shape[1:]), reversed(tensor.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def check_layer_tensors(tensors: Sequence[torch.Tensor], where: str = "layer") -> None:
    """Raise TypeError/ValueError if ``tensors`` cannot form one layer's expert layout.

    Each tensor must be a dense (strided) tensor with data (not ``meta``) of shape
    ``(num_local, ...)``, the same ``num_local`` and device for all, each row one contiguous
    block, and distinct rows that do not overlap (an ``expand``-ed tensor, stride 0 on the
    row dimension, would make one write land in several rows).
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{where}: expected a list or tuple of tensors, got {type(tensors).__name__}")
    if not tensors:
        raise ValueError(f"{where}: has no tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}, tensor {i}: expected a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"{where}, tensor {i}: must be a dense strided tensor, got layout {t.layout}, dtype {t.dtype}")
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
        if t.device.type == "meta":
            raise ValueError(f"{where}, tensor {i}: is on the meta device (no data to move)")
        if not _rows_contiguous(t):
            raise ValueError(
                f"{where}, tensor {i}: rows are not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                "each t[row] must be one contiguous block"
            )
        row_elems = math.prod(t.shape[1:]) if num_local else 0
        if num_local > 1 and row_elems and t.stride(0) < row_elems:
            raise ValueError(
                f"{where}, tensor {i}: rows overlap (shape {tuple(t.shape)}, stride {t.stride()}: row stride "
                f"{t.stride(0)} < {row_elems} elements per row, e.g. an expand()-ed tensor); pass a tensor whose "
                "rows are distinct memory (.contiguous())"
            )


def _host_rows(rows) -> np.ndarray | None:
    """``rows`` as a host int64 array when that costs no device sync, else None."""
    if isinstance(rows, torch.Tensor):
        return rows.detach().numpy().astype(np.int64, copy=False) if rows.device.type == "cpu" else None
    return np.asarray(rows, dtype=np.int64)


def index_tensor(values, device: torch.device) -> torch.Tensor:
    """Host integers (numpy, list, CPU tensor) as an int64 tensor on ``device``, without
    waiting for the device.

    They go through pinned memory: a copy from *pageable* memory makes the host wait for the
    work already queued on the stream before it starts (CUDA's documented behaviour), so a
    swap launched behind a forward pass stalled the serving thread for that pass (seen on an
    H100: ~450 us of host time per step() behind 1 ms of queued GPU work). PyTorch's caching
    host allocator keeps the pinned block until the copy is done.
    """
    if isinstance(values, torch.Tensor):
        values = values.numpy()
    cpu = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    return cpu.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else cpu


def index_flat(lists, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Several host integer lists to ``device`` in one :func:`index_tensor` copy (each copy costs
    ~40 us of host time on the H200 hosts): the flat tensor and where each list starts in it
    (``len(lists) + 1`` offsets, the last one its end)."""
    arrays = [np.asarray(values, dtype=np.int64) for values in lists]
    flat = index_tensor(np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64), device)
    return flat, np.concatenate(([0], np.cumsum([a.size for a in arrays], dtype=np.int64))).tolist()


def index_lists(lists, device: torch.device) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """:func:`index_flat`, with one view of the flat tensor per list, cut by one ``split`` (a
    Python slice per list cost ~3 us each, hundreds per call on many layers)."""
    flat, starts = index_flat(lists, device)
    return flat, flat.split([b - a for a, b in zip(starts, starts[1:])])


def index_tensors(named: dict, device: torch.device) -> dict:
    """:func:`index_lists` of ``named``'s values, each view under its key."""
    return dict(zip(named, index_lists(named.values(), device)[1]))


def _as_index_tensor(rows, host: np.ndarray | None, device: torch.device) -> torch.Tensor:
    """Rows as an int64 tensor on ``device``; device tensors stay on the device (no sync)."""
    if isinstance(rows, torch.Tensor) and rows.device.type != "cpu":
        return rows.to(device=device, dtype=torch.int64, non_blocking=True)
    return index_tensor(host, device)


@dataclass(frozen=True)
class KernelTuning:
    """Block sizes of the Triton launch; :meth:`ExpertLayout.launch_shape` turns them into a grid.

    The defaults won a sweep of 14 variants on an H100 (bench/KERNEL_NOTES.md, run 3): worst
    median over the four issue configs 95.7% of a same-size ``copy_``, mean 96.7%. The chunk
    of a launch is the power of two at or below ``total_bytes / (programs * waves)``, clamped
    to ``[min_chunk, max_chunk]``.
    """

    # Comments: % of a same-size copy_ vs the neighbouring variant, H100, bench/KERNEL_NOTES.md.
    block_words: int = 4096  # int32 words per tile (16 KB); 2048 mixed (+1.5% deepseek, -2% small)
    byte_block: int = 2048  # bytes per tile on the byte path (odd sizes, unaligned bases); not tuned
    num_warps: int = 4  # 8 warps: +2% on deepseek, -1-2% on small/tiny
    programs_per_sm: int = 16  # persistent grid cap; 16 beat 8 by 0.3-1.2%; 24: better mean, worse minimum
    waves: int = 4  # chunks per program aimed for; 2 was within noise
    min_chunk: int = 16 << 10  # 8 KB: -1-2% on deepseek/small; 32 KB: -1% on qwen/small
    max_chunk: int = 256 << 10  # 1 MB chunks starve the grid (58-78% on qwen/small/tiny)
    streaming: bool = False  # evict-first loads / .cs stores: -3% on qwen/deepseek/small
    prefetch: bool = False  # next-chunk descriptor prefetch: -1.4-2.3% on the large configs at 8/SM, a tie at 16
    balance: bool = False  # equal chunk counts per program: mixed, +-2%
    blocked: bool = False  # contiguous chunk runs per program: -1-4% vs every nprog-th chunk


DEFAULT_TUNING = KernelTuning()
PROGRAMS_PER_SM_ENV = "EPLB_TRITON_PROGRAMS_PER_SM"  # measuring only: the grid cap per SM (read once per set of tensors)


def default_tuning() -> KernelTuning:
    """:data:`DEFAULT_TUNING`, with ``programs_per_sm`` from ``EPLB_TRITON_PROGRAMS_PER_SM`` when set
    (for benchmarks: how much of each SM the kernels leave to a NCCL kernel running beside them)."""
    programs = int_setting(PROGRAMS_PER_SM_ENV, 0, minimum=1)
    return dataclasses.replace(DEFAULT_TUNING, programs_per_sm=programs) if programs else DEFAULT_TUNING
# Under the interpreter every program and tile is a Python step: few programs, big chunks.
INTERPRETER_TUNING = KernelTuning(programs_per_sm=2, waves=1, min_chunk=64 << 10, max_chunk=1 << 20)


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


@dataclass(frozen=True)
class LaunchShape:
    """One launch's grid and block sizes (constexprs)."""

    programs: int
    chunk: int
    block_words: int
    byte_block: int
    num_warps: int
    streaming: bool
    prefetch: bool
    blocked: bool


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(kernel, InterpretedFunction)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


class _TritonState:
    """Per-layout state of the Triton backend: chunk descriptor tables on the weights' device.

    Built from the tensors' ``data_ptr`` once per layout, and a table once per chunk size
    (powers of two, so a few per layout); a tensor whose storage is later replaced
    (``set_``, ``resize_``) needs a new layout.
    """

    @classmethod
    def of(cls, layout: "ExpertLayout") -> "_TritonState":
        """The state of ``layout``'s tensors, shared by every layout over the same memory (a
        rearrangement builds new layouts on each call; its launch cache must outlive them)."""
        key = (str(layout.device), _tensor_key(layout), os.environ.get(FAST_LAUNCH_ENV, "1"))
        return _cached(_STATES, key, lambda: cls(layout))

    def __init__(self, layout: "ExpertLayout"):
        from .kernels import rows as kr

        self.kernel = kr.move_rows_kernel
        self.pair_kernel = kr.move_rows_pair_kernel  # eplb_triton.layout.move_pair
        self.fields = {name: getattr(kr, name).value for name in ("C_BASE", "C_STRIDE", "C_PACKED", "C_SIZE_FLAG", "NUM_FIELDS")}
        self.modes = {"pack": kr.MODE_PACK.value, "unpack": kr.MODE_UNPACK.value, "copy": kr.MODE_COPY.value}
        self.interpreted = _interpreted(self.kernel)
        if layout.device.type == "cuda" and self.interpreted:
            raise ValueError("backend='triton' with TRITON_INTERPRET=1 runs on CPU tensors only; these are on CUDA")
        if layout.device.type != "cuda" and not self.interpreted:
            raise ValueError(
                f"backend='triton' on {layout.device} tensors needs TRITON_INTERPRET=1 (set before triton is "
                "imported); use backend='torch' or 'auto' there"
            )
        self.device = layout.device
        self.layers = 1  # layers whose tables stack in chunk_table (eplb_triton.stacked sets more)
        self.tensors = list(_tensor_key(layout))  # (base address, row stride, row bytes, segment offset, aligned)
        self.table_tensors = self.tensors  # what chunk_table describes (a stack: every layer's, in order)
        self.all_aligned = all(t[4] for t in self.tensors)
        self.row_bytes_total = sum(layout.row_bytes)
        self.sm_count = _sm_count(layout.device)
        self.tuning = INTERPRETER_TUNING if self.interpreted else default_tuning()
        # what the descriptor tables depend on: the same tensors give the same key on every call
        self.key = (str(layout.device), tuple(self.tensors))
        self.shapes: dict[tuple, LaunchShape] = {}
        self.launches: dict[tuple, tuple | None] = {}  # fast path: (mode, rows, alignments) -> runner and args
        # The compiled kernel takes every parameter positionally: check our order against Triton's.
        names = getattr(self.kernel, "arg_names", None)
        self.fast_launch = (
            not self.interpreted
            and os.environ.get(FAST_LAUNCH_ENV, "1") != "0"
            and names is not None
            and list(names[-len(_CONSTEXPRS):]) == list(_CONSTEXPRS)
        )
        log.debug(
            "triton state: %d tensors, all 16-byte aligned: %s, %s, interpreted: %s",
            len(self.tensors), self.all_aligned, layout.device, self.interpreted,
        )

    def compiled_runner(self, shape: LaunchShape, args: tuple, consts: dict, kernel=None):
        """A launcher of the compiled kernel for ``args``' specialisation, skipping Triton's binder.

        ``kernel[grid](...)`` re-binds and re-specialises every argument on each call: 80-90 us
        of host time per launch on the H200 machines (torch 2.11, triton 3.6; bench/host_costs.py),
        the largest host cost of a layer after NCCL's. The compiled kernel is looked up here by
        the same properties Triton specialises on (16-byte divisibility of pointers and ints,
        ints equal to 1, 32- vs 64-bit ints), so each variant is compiled by Triton itself.
        """
        kernel = self.kernel if kernel is None else kernel
        key = (kernel.__name__, tuple(consts.values()), shape.num_warps, shape.programs, *[_spec(a) for a in args])
        runner = _COMPILED.get(key)
        if runner is None:
            compiled = kernel.warmup(*args, grid=(shape.programs,), num_warps=shape.num_warps, **consts)
            runner = _COMPILED[key] = compiled[(shape.programs, 1, 1)]
        return runner

    def chunks_per_expert(self, chunk: int) -> int:
        return sum(-(-nbytes // chunk) for _, _, nbytes, _, _ in self.tensors)

    def chunk_table(self, chunk: int) -> torch.Tensor:
        """``(chunks_per_expert, NUM_FIELDS)`` int64 chunk descriptors for ``chunk``-byte chunks
        (of :attr:`table_tensors`: a stack's state describes each of its layers in turn).

        Cached across layouts by the tensors' addresses, strides and sizes (:data:`_TABLES`):
        a rearrangement builds new layouts over the same weights on every call, and building a
        table (plus its host-to-device copy) cost about 1 ms per layer (issue 12's profile).
        """
        return _cached(_TABLES, (self.key, chunk), lambda: _build_chunk_table(self.table_tensors, chunk, self.fields, self.device))


FAST_LAUNCH_ENV = "EPLB_TRITON_FAST_LAUNCH"  # "0": launch through kernel[grid](...) as Triton documents
_COMPILED: dict[tuple, object] = {}  # launchers of compiled move_rows_kernel variants, by specialisation
_CONSTEXPRS = ("MODE", "BLOCK", "BYTE_BLOCK", "HAS_UNALIGNED", "STREAMING", "PREFETCH", "BLOCKED", "LAYERED")


def _spec(arg) -> tuple:
    """What Triton specialises an argument on (pointers: 16-byte alignment; ints: == 1,
    divisible by 16, fits in 32 bits)."""
    if isinstance(arg, torch.Tensor):
        return ("t", arg.data_ptr() % 16 == 0, arg.device.index)
    return ("i", arg == 1, arg % 16 == 0, -(1 << 31) <= arg < (1 << 31))


def _tensor_key(layout: "ExpertLayout") -> tuple:
    """Per tensor ``(base address, row stride, row bytes, segment offset, 16-byte aligned)``:
    all the Triton path knows of the tensors (plain integers: caches keyed by it keep no tensor
    alive, and a tensor that moves gets a new key)."""
    key = []
    for tensor, nbytes, seg in zip(layout.tensors, layout.row_bytes, layout.segment_offsets):
        base, stride = tensor.data_ptr(), tensor.stride(0) * tensor.element_size() if tensor.dim() else 0
        aligned = base % ALIGN_BYTES == 0 and stride % ALIGN_BYTES == 0 and nbytes % ALIGN_BYTES == 0
        key.append((base, stride, nbytes, seg, int(aligned)))
    return tuple(key)


# Triton states by (device, _tensor_key, fast-launch setting): descriptor tables and the launch
# cache survive the per-call layouts (a fresh state per call cost a launch_shape, a runner lookup
# and a table lookup on every launch: 80 of 80 launches missed in a 10-call qwen3 profile).
_STATES: dict[tuple, "_TritonState"] = {}
# Descriptor tables by (device, tensors' (base, stride, row bytes, segment, aligned), chunk).
_TABLES: dict[tuple, torch.Tensor] = {}
_TABLES_MAX = 4096  # ~2 tables per layer (pack and unpack chunk sizes) of a 1000-layer model


def _cached(cache: dict, key, build):
    """``cache[key]``, made by ``build()`` on a miss; past :data:`_TABLES_MAX` entries the
    oldest goes first."""
    value = cache.get(key)
    if value is None:
        value = build()
        if len(cache) >= _TABLES_MAX:
            cache.pop(next(iter(cache)))  # oldest first
        cache[key] = value
    return value


def _build_chunk_table(tensors: list[tuple], chunk: int, fields: dict, device: torch.device) -> torch.Tensor:
    parts = []
    for base, stride, nbytes, seg, aligned in tensors:
        begin = np.arange(0, nbytes, chunk, dtype=np.int64)
        part = np.zeros((begin.size, fields["NUM_FIELDS"]), dtype=np.int64)
        part[:, fields["C_BASE"]] = base + begin
        part[:, fields["C_STRIDE"]] = stride
        part[:, fields["C_PACKED"]] = seg + begin
        part[:, fields["C_SIZE_FLAG"]] = 2 * np.minimum(chunk, nbytes - begin) + aligned  # (bytes << 1) | aligned
        parts.append(part)
    host = torch.from_numpy(np.concatenate(parts) if parts else np.zeros((0, fields["NUM_FIELDS"]), dtype=np.int64))
    if device.type != "cuda":
        return host
    # A cached table may be used later from any thread and stream: upload it on a stream of its
    # own and wait for that copy alone (not for work queued on the caller's stream).
    upload = torch.cuda.Stream(device=device)
    with torch.cuda.stream(upload):
        table = host.pin_memory().to(device, non_blocking=True)
    upload.synchronize()
    return table


def _launch_shape(state: "_TritonState", tuning: KernelTuning, total_bytes: int, chunks_of) -> LaunchShape:
    """Grid and block sizes of a launch moving ``total_bytes`` on ``state``'s device;
    ``chunks_of(chunk)``: how many chunks of at most ``chunk`` bytes that is."""
    programs_cap = state.sm_count * tuning.programs_per_sm
    chunk = _pow2_floor(max(total_bytes // max(programs_cap * tuning.waves, 1), 1))
    chunk = max(ALIGN_BYTES, min(max(chunk, tuning.min_chunk), tuning.max_chunk))
    chunks = chunks_of(chunk)
    programs = max(1, min(chunks, programs_cap))
    if tuning.balance:  # the fewest programs that keep the same number of rounds: equal shares
        programs = -(-chunks // -(-chunks // programs))
    return LaunchShape(
        programs=programs,
        chunk=chunk,
        block_words=min(tuning.block_words, chunk // 4),  # no tile wider than a chunk
        byte_block=tuning.byte_block,
        num_warps=tuning.num_warps,
        streaming=tuning.streaming,
        prefetch=tuning.prefetch,
        blocked=tuning.blocked,
    )


class ExpertLayout:
    """The packed layout of one layer's expert rows across all its tensors.

    Args:
        tensors: the layer's weight tensors on this rank, each ``(num_local, ...)`` with
            contiguous rows, all on one device, any dtypes.
        checked: the caller already ran :func:`check_layer_tensors` on ``tensors``.

    Attributes:
        num_local: rows per tensor.
        row_bytes: bytes of one row of each tensor.
        segment_offsets: byte offset of each tensor's segment inside a packed expert.
        expert_bytes: bytes of one packed expert (multiple of 16).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], *, checked: bool = False):
        if not checked:  # ``checked``: the caller just ran check_layer_tensors on them
            check_layer_tensors(tensors)
        self.tensors = list(tensors)
        self.device = self.tensors[0].device
        self.num_local = int(self.tensors[0].shape[0])
        self.row_bytes = [math.prod(t.shape[1:]) * t.element_size() if self.num_local else 0 for t in self.tensors]
        offsets, offset = [], 0
        for nbytes in self.row_bytes:
            offsets.append(offset)
            offset += _align(nbytes)
        self.segment_offsets = offsets
        self.expert_bytes = max(offset, ALIGN_BYTES)
        self._views: list[torch.Tensor] | None = None
        self._triton_state = None  # descriptor tables, built on first Triton use

    @property
    def geometry(self) -> tuple:
        """What the layout computed from its tensors' shapes (plain values: keeps no tensor)."""
        return (self.device, self.num_local, self.row_bytes, self.segment_offsets, self.expert_bytes)

    @classmethod
    def with_geometry(cls, tensors: Sequence[torch.Tensor], geometry: tuple) -> "ExpertLayout":
        """A layout of ``tensors`` with the :attr:`geometry` of an earlier layout of the very same
        tensors (same shapes, strides, dtypes; the caller knows): nothing recomputed."""
        layout = cls.__new__(cls)
        layout._adopt(tensors, geometry)
        return layout

    def _adopt(self, tensors: Sequence[torch.Tensor], geometry: tuple) -> None:
        """Take ``tensors`` and a known :attr:`geometry`, with no views or Triton state yet."""
        self.tensors = list(tensors)
        self.device, self.num_local, self.row_bytes, self.segment_offsets, self.expert_bytes = geometry
        self._views = None
        self._triton_state = None

    @property
    def _byte_views(self) -> list[torch.Tensor]:
        """``(num_local, row_bytes)`` uint8 views of the tensors (the torch path's; made on first
        use: four torch ops per tensor are a large part of a layer's host time on the GPU path)."""
        if self._views is None:
            self._views = [_byte_rows(t) for t in self.tensors]
        return self._views

    @property
    def dense_rows(self) -> bool:
        """Whether every tensor's rows follow one another in memory (row stride = row bytes), so
        any run of consecutive rows is one contiguous block (what a message can send as it is)."""
        return all(t.shape[0] <= 1 or not nbytes or t.stride(0) * t.element_size() == nbytes for t, nbytes in zip(self.tensors, self.row_bytes))

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
    @property
    def num_rows(self) -> int:
        """Rows ``pack``/``unpack`` may name: ``num_local`` (a stack of layers has more)."""
        return self.num_local

    def _check_rows(self, rows, what: str, distinct: bool) -> tuple[torch.Tensor, np.ndarray]:
        """Validate ``rows``; returns them as a device int64 tensor and as a host array.

        Host inputs (numpy, lists, CPU tensors) are checked on the host and reach the device
        through a non-blocking copy (no device sync). Rows given as a CUDA tensor are copied to the host
        once for the checks, which waits for the stream (pass host rows to avoid that).
        """
        host = _host_rows(rows)
        if host is None:
            host = rows.detach().to("cpu", torch.int64).numpy()  # one device->host sync, see above
        if host.ndim != 1:
            raise ValueError(f"{what}: rows must be 1-D, got shape {tuple(host.shape)}")
        if host.size:
            lo, hi = host.min(), host.max()
            if lo < 0 or hi >= self.num_rows:
                raise ValueError(f"{what}: rows must lie in [0, {self.num_rows}), got min {lo} max {hi}")
            if distinct and np.unique(host).size != host.size:
                raise ValueError(f"{what}: destination rows repeat; each row may be written once")
        return _as_index_tensor(rows, host, self.device), host

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
        """Gather expert ``rows[k]`` into ``out[k*expert_bytes:]``; returns the used prefix of ``out``.

        ``rows``: 1-D ints in ``[0, num_local)``, may repeat (numpy, list or int tensor).
        ``out``: contiguous 1-D uint8 of at least ``len(rows) * expert_bytes`` bytes on the
        weights' device; bytes past that prefix and the padding between segments are not written.
        """
        rows_t, _ = self._check_rows(rows, "pack", distinct=False)
        packed = self._check_buffer(out, rows_t.numel(), "pack")
        self.move("pack", packed, src_rows=rows_t, backend=backend)
        return packed

    def unpack(self, buf: torch.Tensor, rows, backend: str | None = None) -> None:
        """Scatter packed experts ``buf[k*expert_bytes:]`` into rows ``rows[k]`` (distinct)."""
        rows_t, _ = self._check_rows(rows, "unpack", distinct=True)
        packed = self._check_buffer(buf, rows_t.numel(), "unpack")
        self.move("unpack", packed, dst_rows=rows_t, backend=backend)

    def rows_by_tensor(self, first: int, count: int) -> list[torch.Tensor]:
        """Rows ``first, ..., first + count - 1`` of each tensor whose rows have bytes, as 1-D
        uint8 views of the weights (dense rows: :attr:`dense_rows`): the parts of a message sent
        straight from the weights, in the order :meth:`unpack_by_tensor` reads them."""
        return [view[first : first + count].reshape(-1) for view, nbytes in zip(self._byte_views, self.row_bytes) if nbytes]

    def unpack_by_tensor(self, buf: torch.Tensor, rows: torch.Tensor, first: int = -1) -> None:
        """Write ``n = rows.numel()`` rows laid out tensor by tensor in ``buf`` (``n`` rows of
        tensor 0, then ``n`` rows of tensor 1..., tensors whose rows have no bytes left out: a
        message sent straight from the weights) into rows ``rows`` (int64 on the weights'
        device, distinct): with ``first >= 0`` they are ``first, first + 1, ...`` and each tensor
        takes one ``copy_`` (dense rows), else one ``index_copy_``. Unchecked, no host sync."""
        count = rows.numel()
        sized = [(view, nbytes) for view, nbytes in zip(self._byte_views, self.row_bytes) if nbytes]
        for (view, nbytes), part in zip(sized, self.parts_by_tensor(buf, count)):
            if first >= 0:
                view[first : first + count].copy_(part.view(count, nbytes))
            else:
                view.index_copy_(0, rows, part.view(count, nbytes))

    def parts_by_tensor(self, buf: torch.Tensor, count: int) -> list[torch.Tensor]:
        """``buf`` cut as a message of ``count`` rows sent straight from the weights: the rows of
        each tensor whose rows have bytes, one tensor after the other (one op each)."""
        parts, at = [], 0
        for nbytes in self.row_bytes:
            if nbytes:
                parts.append(buf[at : at + count * nbytes])
                at += count * nbytes
        return parts

    def copy_rows(self, src_rows, dst_rows, backend: str | None = None, scratch: torch.Tensor | None = None) -> None:
        """Copy old row ``src_rows[i]`` to row ``dst_rows[i]`` in every tensor.

        Sources are read as they were before the call, also when a source is another pair's
        destination. Without overlap the Triton backend does this in one launch; with overlap
        it packs the sources into ``scratch`` (uint8, ``len(rows) * expert_bytes``; allocated
        when None) and unpacks them (two launches).
        """
        src_t, src_host = self._check_rows(src_rows, "copy_rows", distinct=False)
        dst_t, dst_host = self._check_rows(dst_rows, "copy_rows", distinct=True)
        if src_t.numel() != dst_t.numel():
            raise ValueError(f"copy_rows: {src_t.numel()} sources but {dst_t.numel()} destinations")
        if src_t.numel() == 0:
            return
        if resolve_backend(backend, self.device) == "triton":
            if np.intersect1d(src_host, dst_host).size:
                if scratch is None:
                    scratch = torch.empty(src_t.numel() * self.expert_bytes, dtype=torch.uint8, device=self.device)
                staged = self._check_buffer(scratch, src_t.numel(), "copy_rows scratch")
                self.launch("pack", staged, src_rows=src_t)
                self.launch("unpack", staged, dst_rows=dst_t)
            else:
                self.launch("copy", None, src_rows=src_t, dst_rows=dst_t)
        else:
            self.copy_rows_reference(src_t, dst_t)

    def move(
        self,
        mode: str,
        buf: torch.Tensor | None,
        *,
        src_rows: torch.Tensor | None = None,
        dst_rows: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> None:
        """``pack``/``unpack``/``copy`` with rows already checked and on the weights' device.

        For callers whose rows come from a plan (the transfer executor): no host checks, no
        host-to-device copy, so a launch costs only the launcher's own host time. ``copy``
        needs sources and destinations that do not overlap (the caller checks once).
        """
        rows = src_rows if src_rows is not None else dst_rows
        if rows is None or rows.numel() == 0:
            return
        if resolve_backend(backend, self.device) == "triton":
            self.launch(mode, buf, src_rows=src_rows, dst_rows=dst_rows)
        elif mode == "pack":
            self.pack_reference(src_rows, buf[: rows.numel() * self.expert_bytes])
        elif mode == "unpack":
            self.unpack_reference(buf[: rows.numel() * self.expert_bytes], dst_rows)
        else:
            self.copy_rows_reference(src_rows, dst_rows)

    # -- Triton launcher --------------------------------------------------------------------
    def _triton(self) -> _TritonState:
        if self._triton_state is None:
            self._triton_state = _TritonState.of(self)
        return self._triton_state

    def launch_shape(self, num_rows: int, tuning: KernelTuning | None = None) -> LaunchShape:
        """Grid and block sizes of a launch moving ``num_rows`` experts."""
        state = self._triton()
        return _launch_shape(state, tuning or state.tuning, num_rows * state.row_bytes_total,
                             lambda chunk: num_rows * state.chunks_per_expert(chunk))

    def launch(
        self,
        mode: str,
        buf: torch.Tensor | None,
        src_rows: torch.Tensor | None = None,
        dst_rows: torch.Tensor | None = None,
        tuning: KernelTuning | None = None,
        compile_only: bool = False,
    ) -> None:
        """One Triton launch of ``mode`` ``"pack"``, ``"unpack"`` or ``"copy"``, unchecked.

        ``src_rows``/``dst_rows``: int64 tensors on the weights' device, already validated
        (in range; distinct destinations). ``buf``: the packed bytes (``pack``/``unpack``).
        No host sync. The public :meth:`pack`/:meth:`unpack`/:meth:`copy_rows` check and call this.
        ``compile_only``: compile the kernel these exact arguments select, launch nothing (lets
        another thread pay the compilation, e.g. the worker before the serving thread swaps).
        """
        state = self._triton()
        rows = src_rows if src_rows is not None else dst_rows
        num_rows = rows.numel()
        if num_rows == 0:
            return
        src = src_rows if src_rows is not None else rows
        dst = dst_rows if dst_rows is not None else rows
        buf_addr = buf.data_ptr() if buf is not None else 0
        if state.fast_launch and tuning is None:
            # the steady path: everything but the addresses looked up once per kind of launch
            # (``compile_only`` makes that entry, so a later launch of this shape only runs)
            entry = self._fast_entry(state, mode, num_rows, buf_addr, src, dst)
            if entry is not None and not compile_only:
                run, table, extra = entry
                run(table, src, dst, buf_addr, *extra)
            return
        shape = state.shapes.get((num_rows, tuning))
        if shape is None:  # cached: launches sit on the host's critical path
            if len(state.shapes) > 256:
                state.shapes.clear()
            shape = state.shapes[(num_rows, tuning)] = self.launch_shape(num_rows, tuning)
        table = state.chunk_table(shape.chunk)
        if table.shape[0] == 0:  # every tensor has zero-byte rows: nothing to move
            return
        args, consts = self._launch_args(state, shape, mode, table, num_rows, buf_addr, src, dst)
        if compile_only:
            state.kernel.warmup(*args, grid=(shape.programs,), num_warps=shape.num_warps, **consts)
        elif state.fast_launch:
            state.compiled_runner(shape, args, consts)(*args, *consts.values())
        else:
            state.kernel[(shape.programs,)](*args, num_warps=shape.num_warps, **consts)

    def launcher(
        self,
        mode: str,
        buf: torch.Tensor | None,
        src_rows: torch.Tensor | None = None,
        dst_rows: torch.Tensor | None = None,
    ) -> Callable[[], None] | None:
        """:meth:`launch` of these exact arguments as a callable taking none, or None where the
        launch is not compiled yet or does not take the steady path (then call :meth:`launch`).

        The callable launches on the stream current when it is called; it keeps ``src_rows``
        and ``dst_rows`` alive but not ``buf`` (its address only: the caller keeps it). Finding
        no compiled launch compiles nothing: a thread that must not load kernels (the worker's,
        see ``TransferWorker._load_kernels``) can bind launches compiled elsewhere. Saves the
        launch's lookups (key, addresses) on the host's critical path: ``step()``'s swap.
        """
        state = self._triton()
        rows = src_rows if src_rows is not None else dst_rows
        if not state.fast_launch or rows is None:
            return None
        if rows.numel() == 0:
            return _nothing
        src = src_rows if src_rows is not None else rows
        dst = dst_rows if dst_rows is not None else rows
        buf_addr = buf.data_ptr() if buf is not None else 0
        key = _fast_key(mode, rows.numel(), buf_addr, src, dst)
        if key not in state.launches:
            return None
        entry = state.launches[key]
        if entry is None:  # every tensor has zero-byte rows: nothing moves
            return _nothing
        run, table, extra = entry
        return functools.partial(run, table, src, dst, buf_addr, *extra)

    def _fast_entry(self, state: _TritonState, mode: str, num_rows: int, buf_addr: int, src, dst):
        """The cached ``(runner, table, trailing args)`` of this kind of launch (made now if new)."""
        key = _fast_key(mode, num_rows, buf_addr, src, dst)
        entry = state.launches.get(key)
        if entry is None and key not in state.launches:
            entry = state.launches[key] = self._launch_entry(state, mode, num_rows, buf_addr, src, dst)
        return entry

    def _launch_args(self, state: _TritonState, shape: LaunchShape, mode: str, table, num_rows, buf_addr, src, dst):
        buf_aligned = int(buf_addr % ALIGN_BYTES == 0)
        layers = state.layers  # > 1: a stacked layout (eplb_triton.stacked), rows numbered across its layers
        args = (table, src, dst, buf_addr, buf_aligned, num_rows, table.shape[0] // layers, self.expert_bytes, self.num_local)
        consts = dict(
            MODE=state.modes[mode],
            BLOCK=shape.block_words,
            BYTE_BLOCK=shape.byte_block,
            HAS_UNALIGNED=not (state.all_aligned and (buf_aligned or mode == "copy")),
            STREAMING=shape.streaming,
            PREFETCH=shape.prefetch,
            BLOCKED=shape.blocked,
            LAYERED=layers > 1,
        )
        return args, consts

    def _launch_entry(self, state: _TritonState, mode: str, num_rows: int, buf_addr: int, src, dst):
        """``(runner, table, trailing args)`` of one kind of launch, or None when nothing moves."""
        shape = self.launch_shape(num_rows)
        table = state.chunk_table(shape.chunk)
        if table.shape[0] == 0:
            return None
        args, consts = self._launch_args(state, shape, mode, table, num_rows, buf_addr, src, dst)
        runner = state.compiled_runner(shape, args, consts)
        return runner, table, (*args[4:], *consts.values())

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


def _fast_key(mode: str, num_rows: int, buf_addr: int, src: torch.Tensor, dst: torch.Tensor) -> tuple:
    """What a steady-path launch is cached by: the mode, the rows and the addresses' alignment."""
    return (mode, num_rows, buf_addr % ALIGN_BYTES, src.data_ptr() % ALIGN_BYTES, dst.data_ptr() % ALIGN_BYTES)


def _nothing() -> None:
    """A bound launch that moves nothing (:meth:`ExpertLayout.launcher`)."""


# Pair launches by (both states' keys, modes, row counts, alignments, tuning).
_PAIRS: dict[tuple, tuple | None] = {}


def move_pair(
    first: ExpertLayout,
    first_mode: str,
    first_buf: torch.Tensor,
    first_rows: torch.Tensor,
    second: ExpertLayout,
    second_mode: str,
    second_buf: torch.Tensor,
    second_rows: torch.Tensor,
    backend: str | None = None,
    tuning: KernelTuning | None = None,
) -> None:
    """``first.move(first_mode, first_buf, rows)`` and the same of ``second``, as one Triton
    launch (``move_rows_pair_kernel``) where both are plain layers on one device; else two moves.

    Modes ``"pack"`` (rows: sources) or ``"unpack"`` (rows: destinations); rows checked and on
    the weights' device, as for :meth:`ExpertLayout.move`. Nothing orders the two parts: they
    must not touch the same memory (one layer's unpack beside another layer's pack). Saves one
    launch's host time (11-17 us warm, ~52 us inside the loop on the H200 hosts: host_costs.py
    run 66, layer_timeline.py run 63) and lets the two share the SMs. ``tuning``: block sizes
    (tests; default the layouts')."""
    if first_mode not in ("pack", "unpack") or second_mode not in ("pack", "unpack"):
        raise ValueError(f"move_pair moves 'pack' or 'unpack' parts, not {first_mode!r}/{second_mode!r}")
    parts = ((first, first_mode, first_buf, first_rows), (second, second_mode, second_buf, second_rows))
    entry = None
    if first_rows.numel() and second_rows.numel() and first.device == second.device:
        if resolve_backend(backend, first.device) == "triton" and first._triton().layers == second._triton().layers == 1:
            entry = _pair_entry(parts, tuning)
    if entry is None:
        for layout, mode, buf, rows in parts:
            layout.move(mode, buf, **{"src_rows" if mode == "pack" else "dst_rows": rows}, backend=backend)
        return
    run, tables, programs, consts = entry
    args = _pair_args(parts, tables)
    if run is not None:
        run(*args, *consts.values())
    else:
        first._triton().pair_kernel[(programs,)](*args, **consts)


def _pair_args(parts, tables) -> tuple:
    """``move_rows_pair_kernel``'s arguments before its constexprs: per part, its table, rows,
    buffer address and alignment, row count, chunks per expert and expert bytes."""
    args = ()
    for (layout, _, buf, rows), table in zip(parts, tables):
        address = buf.data_ptr()
        args += (table, rows, address, int(address % ALIGN_BYTES == 0), rows.numel(), table.shape[0], layout.expert_bytes)
    return args


def _pair_entry(parts, tuning):
    """``(runner or None, (table A, table B), programs, constexprs)`` of a pair launch, cached
    (a runner on the fast path; else the constexprs include ``num_warps``); None when a layout
    has zero-byte rows (two moves handle that)."""
    (first, first_mode, _, first_rows), (second, second_mode, _, second_rows) = parts
    a, b = first._triton(), second._triton()
    na, nb = first_rows.numel(), second_rows.numel()
    aligned = tuple(t.data_ptr() % ALIGN_BYTES for part in parts for t in (part[2], part[3]))
    key = (a.key, b.key, a.fast_launch, first_mode, second_mode, na, nb, aligned, tuning)
    if key not in _PAIRS:
        shape = _launch_shape(a, tuning or a.tuning, na * a.row_bytes_total + nb * b.row_bytes_total,
                              lambda chunk: na * a.chunks_per_expert(chunk) + nb * b.chunks_per_expert(chunk))
        tables = a.chunk_table(shape.chunk), b.chunk_table(shape.chunk)
        entry = None
        if tables[0].shape[0] and tables[1].shape[0]:
            consts = dict(
                MODE_A=a.modes[first_mode],
                MODE_B=a.modes[second_mode],
                BLOCK=shape.block_words,
                BYTE_BLOCK=shape.byte_block,
                HAS_UNALIGNED=not (a.all_aligned and b.all_aligned and aligned[0] == aligned[2] == 0),
                STREAMING=shape.streaming,
            )
            if a.fast_launch:
                run = a.compiled_runner(shape, _pair_args(parts, tables), consts, kernel=a.pair_kernel)
            else:
                run, consts = None, {**consts, "num_warps": shape.num_warps}
            entry = (run, tables, shape.programs, consts)
        if len(_PAIRS) >= _TABLES_MAX:
            _PAIRS.pop(next(iter(_PAIRS)))
        _PAIRS[key] = entry
    return _PAIRS[key]

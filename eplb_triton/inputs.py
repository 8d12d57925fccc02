"""Input checking: one stage that turns a rank's inputs into a verdict every rank agrees on.

(Over 400 lines: the one input stage of both APIs, maps, weights, options and their agreement,
each check with the message it gives.)

The promise of the public APIs is that bad input raises the same ``ValueError``/``TypeError``
on every rank before any weight is touched. That needs two things, both here:

* :func:`check_inputs` never raises. Everything it finds wrong, including an unexpected
  exception while checking (a ``MemoryError``, an ``IndexError`` from odd input...), becomes
  this rank's *verdict*: a ``TypeError`` or ``ValueError`` naming the problem. A rank that
  raised here instead would leave its peers waiting in the agreement.
* :func:`agree_inputs` is the collective: every rank brings its verdict and fingerprints of
  what must match across ranks (the maps; the weight layouts: dtype, shape and bytes of every
  tensor; the options), and every rank raises the same error when any rank's verdict is bad
  or a fingerprint differs, naming the ranks and what differs
  (:meth:`eplb_triton.comm.Communicator.agree`).

The checks use memory linear in the input size, never in the largest id (ids are arbitrary
int64 >= -1, see :mod:`eplb_triton.maps`), and touch no weight.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .comm import Communicator
from .layout import ExpertLayout, check_layer_tensors
from .maps import ExpertMaps, normalize_maps
from .plan import ROUND_KINDS, normalize_elastic_maps

__all__ = [
    "CheckedInputs",
    "WeightsSignature",
    "agree_inputs",
    "check_inputs",
    "check_timeout",
    "check_weights",
    "check_worker_inputs",
    "verdict_of",
    "weights_signature",
]

#: names of the fingerprints ranks must agree on (also the words the error message uses)
MAPS, LAYOUTS, OPTIONS = "maps", "weight layouts", "options"

#: per tensor, what identifies it: (data_ptr, dtype, shape, stride, device)
WeightsSignature = list[list[tuple]]


@dataclass
class CheckedInputs:
    """One rank's checked inputs: the verdict and, when it is ``None``, everything validated.

    ``timeout_s`` is the agreement's deadline: the caller's, or ``None`` when that was itself
    invalid (the agreement must still run, under the process group's own timeout).
    """

    error: TypeError | ValueError | None
    maps: ExpertMaps | None = None
    layouts: list[ExpertLayout] = field(default_factory=list)
    round_kind: str | None = None
    max_buffer_bytes: int | None = None
    verify: bool = False
    timeout_s: float | None = None
    extra_options: dict[str, object] = field(default_factory=dict)
    fingerprints: dict[str, int] = field(default_factory=lambda: {MAPS: 0, LAYOUTS: 0, OPTIONS: 0})

    def describe(self, part: str) -> list[str]:
        """Labelled items of ``part`` (one of the fingerprint names), for the error message
        that names what differs between ranks; computed only when fingerprints differ."""
        if part == MAPS and self.maps is not None:
            maps = self.maps
            items = [f"maps of shape {tuple(maps.old.shape)} over ep_size {maps.ep_size}"]
            for layer in range(maps.num_layers):
                for which, array in (("old", maps.old), ("new", maps.new)):
                    row = array[layer]
                    head = " ".join(str(v) for v in row[:8]) + (" ..." if row.size > 8 else "")
                    items.append(f"layer {layer} {which} map [{head}] (crc32 {zlib.crc32(row.tobytes()):08x})")
            return items
        if part == LAYOUTS:
            return [f"{len(self.layouts)} layers"] + [
                f"layer {index}, tensor {i}: {_tensor_text(t)}"
                for index, layout in enumerate(self.layouts)
                for i, t in enumerate(layout.tensors)
            ]
        if part == OPTIONS:
            return [
                f"max_buffer_bytes={self.max_buffer_bytes}",
                f"verify={self.verify}",
                f"rounds={self.round_kind}",
            ] + [f"{name}={value!r}" for name, value in sorted(self.extra_options.items())]
        return []


def _tensor_text(tensor: torch.Tensor) -> str:
    dtype = str(tensor.dtype).removeprefix("torch.")
    return f"{dtype} {tuple(tensor.shape)}"


def verdict_of(exc: BaseException, where: str = "input check") -> TypeError | ValueError:
    """``exc`` as a rank's verdict: ``TypeError``/``ValueError`` as they are, anything else
    (``MemoryError``, ``IndexError``, ``RuntimeError``...) as a ``ValueError`` naming it."""
    if isinstance(exc, (TypeError, ValueError)):
        return exc
    text = str(exc).splitlines()[0] if str(exc) else ""
    error = ValueError(f"{where} failed with {type(exc).__name__}: {text}".rstrip(": "))
    error.__cause__ = exc
    return error


def check_timeout(timeout_s) -> float | None:
    """``timeout_s`` as a float, or ``None``; ``TypeError``/``ValueError`` when invalid."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float, np.integer, np.floating)):
        raise TypeError(f"timeout_s must be a number of seconds or None, got {type(timeout_s).__name__}")
    if not (timeout_s > 0 and np.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s}")
    return float(timeout_s)


def _agreement_timeout(timeout_s) -> float | None:
    try:
        return check_timeout(timeout_s)
    except (TypeError, ValueError):
        return None


def check_verify(verify) -> bool:
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
    return verify


def round_kind(rounds) -> str | None:
    """``rounds=`` as a planner round kind, or ``None`` for one exchange with every peer."""
    if rounds is None or rounds is False:
        return None
    if rounds is True:
        return "pair"
    if not isinstance(rounds, str):
        raise TypeError(f"rounds must be None, a bool or one of {ROUND_KINDS}, got {type(rounds).__name__}")
    if rounds not in ROUND_KINDS:
        raise ValueError(f"rounds must be None, a bool or one of {ROUND_KINDS}, got {rounds!r}")
    return rounds


def row_cost(layout: ExpertLayout, verify: bool) -> int:
    """Staging bytes one row costs a round: with ``verify`` at most 16 more per row (the
    per-peer checksum trailer is ``align16(8 * count) <= 16 * count``)."""
    return layout.expert_bytes + (16 if verify else 0)


def default_budget_bytes(layouts: Sequence[ExpertLayout], verify: bool) -> int:
    """The staging budget when ``max_buffer_bytes`` is None: the largest layer's local rows,
    packed (``num_local`` rows: :func:`~eplb_triton.schedule.capacity_rows`' default)."""
    return max((lay.num_local * row_cost(lay, verify) for lay in layouts), default=0)


def check_weights(expert_weights, num_local: int | None = None) -> list[ExpertLayout]:
    """Validate ``expert_weights[layer][i]`` and return one :class:`ExpertLayout` per layer.

    Every layer must have the same ``num_local`` rows (``num_local`` when given: the maps'),
    every tensor must pass :func:`~eplb_triton.layout.check_layer_tensors`, all on one device,
    and no two tensors may share memory (a write to one would change the other). An empty
    list (zero layers) is valid.
    """
    return _checked_weights(expert_weights, num_local)[0]


def _checked_weights(expert_weights, num_local: int | None = None) -> tuple[list[ExpertLayout], int]:
    """:func:`check_weights` and the layouts' fingerprint (:func:`_layout_fingerprint`), both
    remembered for the same tensors."""
    if isinstance(expert_weights, torch.Tensor) or not isinstance(expert_weights, (list, tuple)):
        raise TypeError(
            f"expert_weights must be a list (one entry per layer) of lists of tensors, got {type(expert_weights).__name__}"
        )
    key = _weights_key(expert_weights, num_local)
    known = None if key is None else _CHECKED_WEIGHTS.get(key)
    if known is not None:  # the same tensors as an earlier call: checked then, geometry known
        fingerprint, geometries = known
        return [ExpertLayout.with_geometry(t, g) for t, g in zip(expert_weights, geometries)], fingerprint
    layouts = _check_weights(expert_weights, num_local)
    fingerprint = _layout_fingerprint(layouts)
    if key is not None:
        if len(_CHECKED_WEIGHTS) >= _CHECKED_WEIGHTS_MAX:
            _CHECKED_WEIGHTS.pop(next(iter(_CHECKED_WEIGHTS)))  # oldest first
        _CHECKED_WEIGHTS[key] = (fingerprint, [layout.geometry for layout in layouts])
    return layouts, fingerprint


# Weights that passed check_weights, by everything its checks read (plain values: no tensor is kept
# alive), with their layouts' fingerprint and geometry. A runtime passes the same tensors on every
# rebalance; checking them again cost ~16 us per tensor (260 us for 8 qwen3 layers on the H200
# hosts), the fingerprint ~2 us per tensor locally, the key ~2 us, a layout's geometry ~7 us per
# layer of 4 tensors locally.
_CHECKED_WEIGHTS: dict[tuple, tuple[int, list]] = {}
_CHECKED_WEIGHTS_MAX = 64


def _weights_key(expert_weights, num_local: int | None) -> tuple | None:
    """What :func:`check_weights` depends on, per tensor: address, dtype, shape, strides, storage
    offset and device; ``None`` unless the input is lists of plain strided tensors with data."""
    key: list = [num_local]
    for tensors in expert_weights:
        if not isinstance(tensors, (list, tuple)):
            return None
        for t in tensors:
            # subclasses may override what the checks read; sparse/meta tensors: let the checks speak
            if type(t) is not torch.Tensor or t.layout != torch.strided or t.is_meta:
                return None
            key.append((t.data_ptr(), t.dtype, t.shape, t.stride(), t.storage_offset(), t.device))
        key.append(len(tensors))  # layer boundary
    return tuple(key)


def _check_weights(expert_weights, num_local: int | None) -> list[ExpertLayout]:
    device = None
    layouts = []
    for index, tensors in enumerate(expert_weights):
        check_layer_tensors(tensors, where=f"layer {index}")  # names the layer; the layout's own check would not
        rows = tensors[0].shape[0]
        if num_local is not None and rows != num_local:
            raise ValueError(f"layer {index}: tensors have {rows} rows but the maps give num_local = {num_local}")
        if num_local is None and layouts and rows != layouts[0].num_local:
            raise ValueError(
                f"layer {index}: tensors have {rows} rows but layer 0's have {layouts[0].num_local} "
                "(every layer has num_physical / ep_size rows)"
            )
        if device is None:
            device = tensors[0].device
        elif tensors[0].device != device:
            raise ValueError(f"tensors on different devices: layer 0 on {device}, layer {index} on {tensors[0].device}")
        layouts.append(ExpertLayout(tensors, checked=True))
    _check_no_shared_rows(layouts)
    return layouts


def _check_no_shared_rows(layouts: Sequence[ExpertLayout]) -> None:
    """Refuse rows of two tensors that overlap in memory (cost: one dict lookup per tensor;
    intervals are compared only for tensors that share a storage)."""
    by_storage: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}
    for index, layout in enumerate(layouts):
        for i, t in enumerate(layout.tensors):
            if t.numel() == 0:
                continue
            key = (t.device, t.data_ptr() - t.storage_offset() * t.element_size())  # the storage's base, no storage object
            by_storage.setdefault(key, []).append((index, i, t))
    for members in by_storage.values():
        if len(members) < 2:
            continue
        starts, ends, owners = [], [], []
        for index, i, t in members:
            elem = t.element_size()
            row_bytes = t[0].numel() * elem
            first = t.storage_offset() * elem + np.arange(t.shape[0], dtype=np.int64) * t.stride(0) * elem
            starts.append(first)
            ends.append(first + row_bytes)
            owners.extend([(index, i)] * t.shape[0])
        start, end = np.concatenate(starts), np.concatenate(ends)
        order = np.argsort(start, kind="stable")
        clash = np.flatnonzero(start[order][1:] < end[order][:-1])
        if clash.size:
            a, b = owners[order[clash[0]]], owners[order[clash[0] + 1]]
            raise ValueError(
                f"layer {a[0]}, tensor {a[1]} and layer {b[0]}, tensor {b[1]} share memory (overlapping rows): "
                "every tensor's rows must be distinct memory"
            )


def weights_signature(expert_weights) -> WeightsSignature:
    """What identifies each tensor of ``expert_weights`` (which memory, dtype, shape, strides)."""
    return [
        [(t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device) for t in layer] for layer in expert_weights
    ]


def check_same_tensors(expert_weights, expected: WeightsSignature) -> None:
    """Refuse tensors of ``expert_weights`` replaced since ``expected`` was taken."""
    now = weights_signature(expert_weights)
    if len(now) != len(expected):
        raise ValueError(
            f"expert_weights now has {len(now)} layers, but {len(expected)} when the TransferWorker was built; "
            "a worker moves the tensors it was built with: create a new TransferWorker after replacing weights"
        )
    for index, (layer_now, layer_then) in enumerate(zip(now, expected)):
        for i in range(max(len(layer_now), len(layer_then))):
            if i >= len(layer_now) or i >= len(layer_then) or layer_now[i] != layer_then[i]:
                raise ValueError(
                    f"layer {index}, tensor {i} of expert_weights was replaced (or resized) after the TransferWorker "
                    "was built; a worker moves the tensors it was built with: create a new TransferWorker after "
                    "replacing weights"
                )


def _layout_fingerprint(layouts: Sequence[ExpertLayout]) -> int:
    # dtype and shape per tensor, not only bytes: bf16 (4, 12) and float32 (4, 6) have the same
    # row bytes, but moving raw bytes between them would reinterpret the numbers.
    text = ";".join(
        ",".join(f"{t.dtype}{tuple(t.shape)}:{nbytes}" for t, nbytes in zip(layout.tensors, layout.row_bytes))
        for layout in layouts
    )
    return zlib.crc32(f"{len(layouts)}|{text}".encode())


def _maps_fingerprint(maps: ExpertMaps) -> int:
    crc = zlib.crc32(np.array([maps.ep_size, *maps.old.shape], dtype=np.int64).tobytes())
    crc = zlib.crc32(maps.old.tobytes(), crc)
    return zlib.crc32(maps.new.tobytes(), crc)


def _options_fingerprint(max_buffer_bytes: int | None, verify: bool, kind: str | None, extra: dict | None = None) -> int:
    text = f"{max_buffer_bytes}|{verify}|{kind}|" + "|".join(f"{k}={v!r}" for k, v in sorted((extra or {}).items()))
    return zlib.crc32(text.encode())


def check_inputs(
    old_global_expert_indices,
    new_global_expert_indices,
    expert_weights,
    comm: Communicator,
    max_buffer_bytes: int | None = None,
    rank_mapping=None,
    *,
    verify: bool = False,
    timeout_s: float | None = None,
    rounds: bool | str | None = None,
    expected_weights: WeightsSignature | None = None,
    more_checks: Callable[[CheckedInputs], dict[str, object]] | None = None,
) -> CheckedInputs:
    """Check one rank's inputs; never raises (every problem is the returned verdict).

    ``expected_weights`` (a :func:`weights_signature`): refuse tensors replaced since it was
    taken (the background worker's construction). ``more_checks(checked)``: the caller's
    own checks, run inside this stage once maps and weights are valid (so their errors become
    the verdict too); it may lower ``checked.max_buffer_bytes`` (checked afterwards) and
    returns more settings every rank must agree on (``checked.extra_options``, part of the
    options fingerprint).
    """
    checked = CheckedInputs(error=None, timeout_s=_agreement_timeout(timeout_s))
    try:
        check_timeout(timeout_s)
        checked.round_kind = kind = round_kind(rounds)
        checked.verify = check_verify(verify)
        if max_buffer_bytes is not None:
            if isinstance(max_buffer_bytes, bool) or not isinstance(max_buffer_bytes, (int, np.integer)):
                raise TypeError(f"max_buffer_bytes must be an int, got {type(max_buffer_bytes).__name__}")
            max_buffer_bytes = int(max_buffer_bytes)
        checked.max_buffer_bytes = max_buffer_bytes
        # planner (issue 5): elastic EP maps are expanded to the transfer group's ranks
        if rank_mapping is None:
            maps = normalize_maps(old_global_expert_indices, new_global_expert_indices, comm.world_size)
        else:
            maps = normalize_elastic_maps(old_global_expert_indices, new_global_expert_indices, comm.world_size, rank_mapping)
        checked.maps = maps
        if isinstance(expert_weights, (list, tuple)) and len(expert_weights) != maps.num_layers:
            raise ValueError(f"expert_weights has {len(expert_weights)} layers but the maps have {maps.num_layers}")
        layouts, layouts_fingerprint = _checked_weights(expert_weights)
        if expected_weights is not None:
            check_same_tensors(expert_weights, expected_weights)
        for index, layout in enumerate(layouts):
            if layout.num_local != maps.num_local:
                raise ValueError(
                    f"layer {index}: tensors have {layout.num_local} rows but num_physical / ep_size = "
                    f"{maps.num_physical} / {maps.ep_size} = {maps.num_local} "
                    "(num_physical must equal ep_size * num_local)"
                )
        checked.layouts = layouts
        if layouts:
            check_backend_device(comm, layouts[0].device)
        if more_checks is not None:
            checked.extra_options = dict(more_checks(checked))
            max_buffer_bytes = checked.max_buffer_bytes
        # a budget below one packed expert is refused after the agreement, with the smallest
        # budget that works (it needs the plan; every rank has the same plan and budget then)
        checked.fingerprints = {
            MAPS: _maps_fingerprint(maps),
            LAYOUTS: layouts_fingerprint,
            OPTIONS: _options_fingerprint(max_buffer_bytes, verify, kind, checked.extra_options),
        }
    except Exception as exc:  # noqa: BLE001 - every failure must reach the agreement as a verdict
        checked.error = verdict_of(exc)
    return checked


def check_worker_inputs(
    expert_weights,
    comm: Communicator,
    *,
    max_buffer_bytes: int | None = None,
    verify: bool = False,
    timeout_s: float | None = None,
    more_checks: Callable[[CheckedInputs], dict[str, object]] | None = None,
) -> CheckedInputs:
    """:func:`check_inputs` for :class:`~eplb_triton.TransferWorker`'s constructor (no maps
    yet): the weights, their device against ``comm``'s backend, and the options; never raises.
    ``more_checks(checked)``: the worker's own option checks (their errors become the
    verdict), returning settings every rank must agree on (part of the options fingerprint)."""
    checked = CheckedInputs(error=None, timeout_s=_agreement_timeout(timeout_s))
    try:
        check_timeout(timeout_s)
        checked.verify = check_verify(verify)
        if max_buffer_bytes is not None and (
            isinstance(max_buffer_bytes, bool) or not isinstance(max_buffer_bytes, (int, np.integer))
        ):
            raise TypeError(f"max_buffer_bytes must be an int, got {type(max_buffer_bytes).__name__}")
        checked.max_buffer_bytes = None if max_buffer_bytes is None else int(max_buffer_bytes)
        layouts, layouts_fingerprint = _checked_weights(expert_weights)
        checked.layouts = layouts
        if layouts:
            check_backend_device(comm, layouts[0].device)
        if more_checks is not None:
            checked.extra_options = dict(more_checks(checked))
        checked.fingerprints = {
            LAYOUTS: layouts_fingerprint,
            OPTIONS: _options_fingerprint(checked.max_buffer_bytes, verify, None, checked.extra_options),
        }
    except Exception as exc:  # noqa: BLE001 - every failure must reach the agreement as a verdict
        checked.error = verdict_of(exc)
        checked.fingerprints = {LAYOUTS: 0, OPTIONS: 0}
    return checked


def check_backend_device(comm: Communicator, device: torch.device) -> None:
    if comm.world_size > 1 and comm.dist_backend == "gloo" and device.type != "cpu":
        raise ValueError(f"the gloo backend moves CPU tensors; weights are on {device} (use NCCL for GPUs)")
    if comm.world_size > 1 and comm.dist_backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the NCCL backend moves CUDA tensors; weights are on {device} (use gloo for CPU)")


def agree_inputs(comm: Communicator, checked: CheckedInputs) -> None:
    """The collective half: every rank raises the same error when any rank's verdict is bad
    or the ranks' maps, weight layouts or options differ (message names ranks and what)."""
    agree_inputs_start(comm, checked)()


def agree_inputs_start(comm: Communicator, checked: CheckedInputs) -> Callable[[], None]:
    """:func:`agree_inputs` posted now; call the result to finish it (it raises then). Between
    the two, touch no weight: another rank's verdict is not known yet."""
    return comm.agree_start(checked.error, checked.fingerprints, timeout_s=checked.timeout_s, describe=checked.describe)

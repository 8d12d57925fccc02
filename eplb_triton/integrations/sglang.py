"""SGLang drop-in: the per-layer expert weight update of SGLang's expert location updater,
with SGLang's signature, moving the data with this library.

Signature read (for understanding only; no SGLang code is copied) on 2026-11-30 from the
stored sources of sgl-project/sglang, ``python/sglang/srt/eplb/expert_location_updater.py``
(2025-26; earlier at ``python/sglang/srt/model_executor/expert_location_updater.py``)::

    update_expert_weights_single_layer(routed_experts_weights: List[Tensor],
        temp_buffers: List[Tensor], old_physical_to_logical_map: List[int],
        new_physical_to_logical_map: List[int], num_local_physical_experts: int,
        num_gpu_per_node: int, rank: int, world_size: Optional[int] = None,
        missing_logical_experts_info: Optional[List[int]] = None, debug: bool = False,
        log_metrics: bool = False)

(an earlier version ends ``..., rank, debug=False``). SGLang calls it by keyword from
``_update_expert_weights_raw`` once per updated layer, with ``temp_buffers =
create_temp_buffers(...)``: one ``empty_like`` per weight tensor of a layer, shared by all
layers of the update; ``rank`` and ``world_size`` are the default (world) group's, and the
EP group is that world group. SGLang sends one message per expert per tensor, prefers a
sender on the receiver's node and fills duplicates locally.

What this changes: the data movement of one layer (one packed message per peer, senders on
the receiver's node first via the plan's ``ranks_per_node=num_gpu_per_node``, duplicates
filled on-device), staged in SGLang's own ``temp_buffers`` (their largest tensor), so no
staging memory is allocated. What it does not: SGLang's metadata update, its async (host
mirror) path and its canary mode are untouched; ``missing_logical_experts_info`` (elastic EP
with failed ranks) is left empty: every rank of the world group must take part.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..transfer import TransferStats
from ._patches import restore
from ._staging import rearrange_in_buffer

__all__ = ["install", "uninstall", "update_expert_weights_single_layer"]

log = logging.getLogger(__name__)


def update_expert_weights_single_layer(
    routed_experts_weights: Sequence[torch.Tensor],
    temp_buffers: Sequence[torch.Tensor],
    old_physical_to_logical_map,
    new_physical_to_logical_map,
    num_local_physical_experts: int,
    num_gpu_per_node: int,
    rank: int,
    world_size: int | None = None,
    missing_logical_experts_info: list[int] | None = None,
    debug: bool = False,
    log_metrics: bool = False,
) -> list[str] | None:
    """SGLang's ``update_expert_weights_single_layer``: rearrange one layer in place.

    Collective over the default process group (SGLang's EP group). The maps are SGLang's
    per-layer ``physical_to_logical_map`` rows (lists, tensors or arrays, global slots);
    ``temp_buffers`` serve as the staging (their largest contiguous tensor; its bytes are
    the budget, a layer that needs more runs in rounds; one that cannot be scheduled in it
    at all falls back to the library's own staging). ``rank``, ``world_size`` and
    ``num_local_physical_experts`` are those of the default group and the maps (bad input
    raises the same ValueError on every rank). ``num_gpu_per_node`` becomes the
    plan's ``ranks_per_node`` when it divides the world size. An older positional
    ``debug`` in ``world_size``'s place is recognised. With ``debug`` a one-line traffic
    summary is returned in a list; ``log_metrics`` logs it.
    """
    if isinstance(world_size, bool):  # the older signature: (..., rank, debug)
        world_size, debug = None, world_size
    tensors = list(routed_experts_weights)
    old = np.asarray(torch.as_tensor(old_physical_to_logical_map).cpu(), dtype=np.int64).reshape(1, -1)
    new = np.asarray(torch.as_tensor(new_physical_to_logical_map).cpu(), dtype=np.int64).reshape(1, -1)
    # rank, world_size and num_local_physical_experts are implied by the default group and the
    # maps; the library checks them (rows = slots / ranks) with the same error on every rank.
    group_size = dist.get_world_size() if dist.is_initialized() else 1
    per_node = num_gpu_per_node if num_gpu_per_node and group_size % num_gpu_per_node == 0 else None
    stats = rearrange_in_buffer(old, new, [tensors], None, list(temp_buffers), ranks_per_node=per_node)
    return _report(stats, debug, log_metrics)


def _report(stats: TransferStats, debug: bool, log_metrics: bool) -> list[str] | None:
    summary = stats.traffic_summary()
    if log_metrics:
        log.info("eplb_triton expert location update: %s", summary)
    return [summary] if debug else None


# ------------------------------------------------------------------------------------------
# install / uninstall
# ------------------------------------------------------------------------------------------

_MODULES = ("sglang.srt.eplb.expert_location_updater", "sglang.srt.model_executor.expert_location_updater")
_ATTR = "update_expert_weights_single_layer"
_installed: list[tuple[Any, str, Any]] = []


def install() -> dict[str, Any]:
    """Point SGLang's expert location updater at :func:`update_expert_weights_single_layer`
    (SGLang looks it up in its module at each call, so replacing the module attribute is
    enough). Returns ``{"module.attribute": what it replaced}``. Raises
    ``ModuleNotFoundError`` without SGLang, ``RuntimeError`` when already installed or when
    this SGLang version has no such function. :func:`uninstall` restores it."""
    if _installed:
        raise RuntimeError("eplb_triton.integrations.sglang is already installed; call uninstall() first")
    importlib.import_module("sglang")  # ModuleNotFoundError names sglang when it is missing
    replaced = {}
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, _ATTR):
            replaced[f"{name}.{_ATTR}"] = getattr(module, _ATTR)
            _installed.append((module, _ATTR, getattr(module, _ATTR)))
            setattr(module, _ATTR, update_expert_weights_single_layer)
    if not replaced:
        raise RuntimeError(f"found no SGLang expert location updater with {_ATTR}() to replace")
    log.info("eplb_triton: installed into SGLang: %s", ", ".join(replaced))
    return replaced


def uninstall() -> list[str]:
    """Restore what :func:`install` replaced; returns the restored names (empty if none)."""
    return restore(_installed)

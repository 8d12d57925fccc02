"""Expert maps: the input of every rearrangement.

A map says, for each *physical slot*, which *logical expert* it holds:

* shape ``(num_layers, num_physical)`` or ``(num_physical,)`` for a single layer;
* values are logical expert ids, ``-1`` marks an empty slot; an expert may appear in
  several slots (replicas);
* slot ``p`` lives on EP rank ``p // num_local``, row ``p % num_local``, with
  ``num_local = num_physical // ep_size``.

This module turns torch tensors or numpy arrays into validated int64 numpy arrays. Every
check here depends only on the global maps, so every rank reaches the same verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

try:
    from torch.distributed import ProcessGroup
except ImportError:  # a torch built without distributed support
    ProcessGroup = Any

__all__ = ["EPGroup", "ExpertMap", "ExpertMaps", "RankMapping", "as_map_array", "normalize_maps"]

#: A placement ``(num_layers, num_physical)`` or ``(num_physical,)`` of logical expert ids:
#: a torch tensor (any device) or a numpy array.
ExpertMap = Union[torch.Tensor, np.ndarray]
#: Elastic EP, old rank -> new rank (``-1`` = removed): a dict or a sequence indexed by old rank.
RankMapping = Union[Mapping[int, int], Sequence[int], np.ndarray, torch.Tensor]
#: The expert-parallel process group (``None``: the default group, or one rank without one).
EPGroup = Optional[ProcessGroup]


@dataclass(frozen=True)
class ExpertMaps:
    """Validated old/new maps of all layers, as int64 arrays ``(num_layers, num_physical)``."""

    old: np.ndarray
    new: np.ndarray
    ep_size: int
    squeezed: bool  # the caller passed 1-D maps (one layer)

    @property
    def num_layers(self) -> int:
        return self.old.shape[0]

    @property
    def num_physical(self) -> int:
        return self.old.shape[1]

    @property
    def num_local(self) -> int:
        return self.num_physical // self.ep_size


def as_map_array(expert_map: ExpertMap, name: str) -> np.ndarray:
    """Convert one map (torch tensor or numpy array of integers) to an int64 numpy array."""
    if isinstance(expert_map, torch.Tensor):
        if expert_map.dtype.is_floating_point or expert_map.dtype.is_complex or expert_map.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer expert ids, got dtype {expert_map.dtype}")
        array = expert_map.detach().to("cpu", torch.int64).numpy()
    elif isinstance(expert_map, np.ndarray):
        if not np.issubdtype(expert_map.dtype, np.integer):
            raise TypeError(f"{name} must hold integer expert ids, got dtype {expert_map.dtype}")
        array = expert_map.astype(np.int64, copy=False)
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(expert_map).__name__}")
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (num_layers, num_physical) or (num_physical,), got {tuple(array.shape)}")
    return array


def normalize_maps(old_global_expert_indices: ExpertMap, new_global_expert_indices: ExpertMap, ep_size: int) -> ExpertMaps:
    """Validate the two maps and return them as ``(num_layers, num_physical)`` int64 arrays.

    Raises ``TypeError`` for wrong types and ``ValueError`` naming the problem for shapes that
    differ, a slot count not divisible by ``ep_size``, ids below -1, and a new map naming an
    expert that no old slot of that layer holds.
    """
    if isinstance(ep_size, bool) or not isinstance(ep_size, (int, np.integer)):
        raise TypeError(f"ep_size must be an int, got {type(ep_size).__name__}")
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    old = as_map_array(old_global_expert_indices, "old_global_expert_indices")
    new = as_map_array(new_global_expert_indices, "new_global_expert_indices")
    if old.shape != new.shape:
        raise ValueError(f"old and new maps differ in shape: {tuple(old.shape)} vs {tuple(new.shape)}")
    squeezed = old.ndim == 1
    if squeezed:
        old, new = old[None, :], new[None, :]
    num_physical = old.shape[1]
    if num_physical == 0 or num_physical % ep_size != 0:
        raise ValueError(
            f"num_physical={num_physical} must be a positive multiple of ep_size={ep_size} "
            "(num_physical == ep_size * num_local)"
        )
    for name, array in (("old", old), ("new", new)):
        if array.size and array.min() < -1:
            layer, slot = np.argwhere(array < -1)[0]
            raise ValueError(
                f"{name} map has expert id {array[layer, slot]} < -1 at layer {layer}, slot {slot} (-1 marks an empty slot)"
            )
    missing = _missing_experts(old, new)
    if missing is not None:
        layer, slot, expert = missing
        raise ValueError(
            f"new map names expert {expert} at layer {layer}, slot {slot}, but no old slot of layer {layer} holds it"
        )
    return ExpertMaps(old=np.ascontiguousarray(old), new=np.ascontiguousarray(new), ep_size=int(ep_size), squeezed=squeezed)


def _missing_experts(old: np.ndarray, new: np.ndarray):
    """First (layer, slot, expert) whose expert the old map of that layer lacks, or None."""
    num_layers = old.shape[0]
    num_ids = int(max(old.max(initial=-1), new.max(initial=-1))) + 1
    if num_ids == 0:
        return None
    held = np.zeros((num_layers, num_ids), dtype=bool)
    layer_of_old = np.broadcast_to(np.arange(num_layers)[:, None], old.shape)
    valid = old >= 0
    held[layer_of_old[valid], old[valid]] = True
    layer_of_new = np.broadcast_to(np.arange(num_layers)[:, None], new.shape)
    wanted = new >= 0
    bad = np.zeros_like(wanted)
    bad[wanted] = ~held[layer_of_new[wanted], new[wanted]]
    if not bad.any():
        return None
    layer, slot = np.argwhere(bad)[0]
    return int(layer), int(slot), int(new[layer, slot])

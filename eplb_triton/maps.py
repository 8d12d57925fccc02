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


_INT64_MAX = np.iinfo(np.int64).max


def as_map_array(expert_map: ExpertMap, name: str) -> np.ndarray:
    """Convert one map (torch tensor or numpy array of integers) to an int64 numpy array.

    Unsigned ids above the int64 range are refused (converting them would wrap them to
    negative numbers); nothing is allocated per id.
    """
    if isinstance(expert_map, torch.Tensor):
        if expert_map.dtype.is_floating_point or expert_map.dtype.is_complex or expert_map.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer expert ids, got dtype {expert_map.dtype}")
        # through numpy as is: a cast to int64 here would wrap uint64 ids above 2**63 - 1
        array = expert_map.detach().to("cpu").numpy()
    elif isinstance(expert_map, np.ndarray):
        if not np.issubdtype(expert_map.dtype, np.integer):
            raise TypeError(f"{name} must hold integer expert ids, got dtype {expert_map.dtype}")
        array = expert_map
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(expert_map).__name__}")
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (num_layers, num_physical) or (num_physical,), got {tuple(array.shape)}")
    if array.dtype.kind == "u" and array.dtype.itemsize >= 8 and array.size and array.max() > _INT64_MAX:
        where = np.argwhere(array > _INT64_MAX)[0]
        raise ValueError(
            f"{name} has expert id {int(array[tuple(where)])} at {_position(where, array.ndim)}, "
            f"outside the int64 range (ids are int64 >= -1)"
        )
    return np.ascontiguousarray(array, dtype=np.int64)


def _position(index, ndim: int) -> str:
    return f"layer {int(index[0])}, slot {int(index[1])}" if ndim == 2 else f"slot {int(index[0])}"


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
    num_layers, num_physical = old.shape
    # zero layers is a valid no-op (any multiple of ep_size); otherwise every rank needs rows
    if (num_physical == 0 and num_layers > 0) or num_physical % ep_size != 0:
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
    """First (layer, slot, expert) whose expert the old map of that layer lacks, or None.

    Memory is linear in the map size whatever the ids are (ids near 2**62 are fine): sparse
    ids are renumbered densely with ``np.unique`` and (layer, id) pairs compared as sorted keys.
    """
    num_layers, num_physical = old.shape
    wanted = new >= 0
    if not wanted.any():
        return None
    held = old >= 0
    layer_of = np.broadcast_to(np.arange(num_layers, dtype=np.int64)[:, None], old.shape)
    top = int(max(old.max(initial=-1), new.max(initial=-1)))
    if top < 4 * num_physical + 64:  # the usual dense ids: a (layer, id) table is small and fast
        table = np.zeros((num_layers, top + 1), dtype=bool)
        table[layer_of[held], old[held]] = True
        found = table[layer_of[wanted], new[wanted]]
    else:  # sparse ids: renumber them densely, compare (layer, id) keys by sorting
        ids = np.unique(np.concatenate([old[held], new[wanted]]))
        # (layer, dense id) as one int64: at most num_layers * 2 * num_layers * num_physical
        held_keys = np.unique(layer_of[held] * ids.size + np.searchsorted(ids, old[held]))
        wanted_keys = layer_of[wanted] * ids.size + np.searchsorted(ids, new[wanted])
        at = np.minimum(np.searchsorted(held_keys, wanted_keys), max(held_keys.size - 1, 0))
        found = held_keys[at] == wanted_keys if held_keys.size else np.zeros(wanted_keys.size, dtype=bool)
    if found.all():
        return None
    first_missing = np.flatnonzero(~found)[0]
    layer, slot = np.argwhere(wanted)[first_missing]
    return int(layer), int(slot), int(new[layer, slot])

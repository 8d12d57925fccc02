"""Several layers moved as one: a stacked layout and a stacked pass.

The blocking loop's host time is paid per exchange, not per byte: each NCCL group post, each
Triton launch and the Python around them cost the same for one layer as for several (about
0.3 ms per layer on the H200 hosts, more than a qwen3 layer's wire time). When the staging
budget holds several layers, :func:`stack_groups` picks runs of consecutive one-pass layers of the
same row shapes, and :func:`~eplb_triton.prepare.prepare_layers` makes each run one
:class:`~eplb_triton.executor.LayerWork`: one pack launch, one ``batch_isend_irecv`` per peer
and one unpack launch for all of them.

Rows of a :class:`StackedLayout` are numbered across its layers: row ``s * num_local + r`` is
row ``r`` of the ``s``-th layer of the stack. Every layer must have the same ``num_local``, the
same row bytes per tensor (so the same packed expert) and the same device; their tensors are
separate memory. The Triton kernel reads one descriptor table per layer, stacked
(``LAYERED``, :mod:`eplb_triton.kernels.rows`); the torch reference splits the rows by layer.

A stacked pass is the layers' passes side by side: each peer's message is the layers' messages
to that peer, one after the other, in layer order (the same order on both sides, since every
rank stacks the same layers: the plan and the budget are agreed). It is written only after all
of its receives are in, so each layer is still entirely old or entirely new.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .layout import ExpertLayout, _STATES, FAST_LAUNCH_ENV, _cached, _TritonState
from .plan import RankPlan, grouped_rank_views
from .settings import int_setting

__all__ = [
    "LAYERS_ENV", "LAYERS_PER_EXCHANGE", "StackedLayout", "layers_per_exchange", "stack_groups", "stack_key",
    "stacked_rank_views", "stack_views",
]

#: At most this many layers share one exchange. On two H200 over NVLink (48 layers per call,
#: bench/results/link_speed-48layers-stacked-h200x2-run20.json), ms per layer at 2 / 4 / 8 layers
#: per exchange: qwen3-30b-a3b-bf16 0.418 / 0.362 / 0.361, deepseek-v3-fp8 0.706 / 0.691 / 0.703,
#: tiny-bf16 0.215 / 0.203 / 0.194 (floor 0.287 / 0.601 / 0.113): 4 gets nearly all of it with half
#: the memory of 8 (a stack takes half the budget: two slots).
LAYERS_PER_EXCHANGE = 4
LAYERS_ENV = "EPLB_TRITON_LAYERS_PER_EXCHANGE"  # overrides it (1 = a layer per exchange); must match on every rank


def layers_per_exchange() -> int:
    """The most layers one exchange may carry (:data:`LAYERS_PER_EXCHANGE`, or ``EPLB_TRITON_LAYERS_PER_EXCHANGE``)."""
    return int_setting(LAYERS_ENV, LAYERS_PER_EXCHANGE, minimum=1)


def stack_key(layout: ExpertLayout) -> tuple:
    """Layouts with equal keys can be stacked: same rows per tensor and bytes per row (the same
    on every rank: the weight layouts are agreed; a rank's layers share one device)."""
    return (layout.num_local, tuple(layout.row_bytes))


class StackedLayout(ExpertLayout):
    """The layouts of several layers of equal :func:`stack_key`, rows numbered across them
    (row ``s * num_local + r`` = row ``r`` of ``layouts[s]``); ``move`` as :class:`ExpertLayout`'s."""

    def __init__(self, layouts: Sequence[ExpertLayout]):
        first = layouts[0]
        if any(stack_key(layout) != stack_key(first) or layout.device != first.device for layout in layouts):
            raise ValueError("stacked layers need the same device, num_local and row bytes per tensor")
        self.layouts = list(layouts)
        self._adopt(first.tensors, first.geometry)  # one packed expert: the first layer's

    @property
    def num_rows(self) -> int:
        return self.num_local * len(self.layouts)

    def __repr__(self) -> str:
        return f"StackedLayout({len(self.layouts)} layers, num_local={self.num_local}, expert_bytes={self.expert_bytes})"

    def _triton(self) -> _TritonState:
        if self._triton_state is None:
            self._triton_state = _StackedTritonState.of(self)
        return self._triton_state

    def _by_layer(self, rows: torch.Tensor):
        """``(layout, positions in rows, their local rows, the layer's first stacked row)`` of each
        layer that ``rows`` reach."""
        layer = rows // self.num_local  # rows are >= 0
        for s, layout in enumerate(self.layouts):
            at = (layer == s).nonzero().flatten()
            if at.numel():
                first = s * self.num_local
                yield layout, at, rows[at] - first, first

    def pack_reference(self, rows: torch.Tensor, packed: torch.Tensor) -> None:
        table = packed.view(rows.numel(), self.expert_bytes)
        for layout, at, local, _ in self._by_layer(rows):
            for view, offset, nbytes in zip(layout._byte_views, self.segment_offsets, self.row_bytes):
                if nbytes:
                    table[at, offset : offset + nbytes] = view.index_select(0, local)

    def unpack_reference(self, packed: torch.Tensor, rows: torch.Tensor) -> None:
        table = packed.view(rows.numel(), self.expert_bytes)
        for layout, at, local, _ in self._by_layer(rows):
            layout.unpack_reference(table.index_select(0, at).reshape(-1), local)

    def copy_rows_reference(self, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
        for layout, at, local, first in self._by_layer(src_rows):  # a copy stays inside its layer
            layout.copy_rows_reference(local, dst_rows[at] - first)


class _StackedTritonState(_TritonState):
    """Triton state of a stacked layout: the layers' descriptor tables one after the other."""

    @classmethod
    def of(cls, layout: StackedLayout) -> "_StackedTritonState":
        members = tuple(_TritonState.of(member) for member in layout.layouts)
        key = ("stacked", tuple(member.key for member in members), os.environ.get(FAST_LAUNCH_ENV, "1"))
        return _cached(_STATES, key, lambda: cls(layout, members))

    def __init__(self, layout: StackedLayout, members: tuple[_TritonState, ...]):
        super().__init__(layout.layouts[0])
        self.layers = len(members)
        self.members = members
        self.all_aligned = all(member.all_aligned for member in members)
        self.key = ("stacked", tuple(member.key for member in members))
        # chunk_table: (layers * chunks_per_expert, NUM_FIELDS), each layer's descriptors in stack order
        self.table_tensors = [t for member in members for t in member.tensors]


def stack_groups(
    stackable: Sequence[bool], keys: Sequence[tuple], staging: np.ndarray, slot_bytes: int, most: int
) -> list[list[int]]:
    """Layer indices of each stack: runs of consecutive ``stackable`` layers of equal ``keys``
    (:func:`stack_key`), at most ``most`` long, whose summed ``staging`` (``(layers, ep_size)``
    bytes: every rank's) fits ``slot_bytes`` on every rank. Layers that stack with no other are
    left out. Decided from what every rank knows alike (the plan, the agreed budget and row
    shapes), so every rank stacks the same layers and the per-peer messages match."""
    groups: list[list[int]] = []
    run: list[int] = []
    total = None
    for index, ok in enumerate(stackable):
        need = staging[index]
        if run and (not ok or len(run) >= most or keys[index] != keys[run[0]] or int((total + need).max()) > slot_bytes):
            groups.append(run)
            run = []
        if ok:
            total = need if not run else total + need
            run.append(index)
    groups.append(run)
    return [group for group in groups if len(group) > 1]


#: This rank's view of each stack (:func:`eplb_triton.plan.grouped_rank_views`).
stacked_rank_views = grouped_rank_views


def stack_views(views: Sequence[RankPlan], num_local: int) -> RankPlan:
    """One rank's plans of several layers as one plan over the stacked rows (the plain
    definition :func:`stacked_rank_views` computes for many stacks at once; tests compare them)."""
    sends: dict[int, list[np.ndarray]] = {}
    recvs: dict[int, list[np.ndarray]] = {}
    for s, view in enumerate(views):
        offset = s * num_local
        for peer, rows in view.send_rows.items():
            sends.setdefault(peer, []).append(np.asarray(rows, dtype=np.int64) + offset)
        for peer, rows in view.recv_rows.items():
            recvs.setdefault(peer, []).append(np.asarray(rows, dtype=np.int64) + offset)

    def joined(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(v, name), dtype=np.int64) + s * num_local for s, v in enumerate(views)])

    return RankPlan(
        rank=views[0].rank,
        send_rows={p: np.concatenate(sends[p]) for p in sorted(sends)},
        recv_rows={p: np.concatenate(recvs[p]) for p in sorted(recvs)},
        local_src_rows=joined("local_src_rows"),
        local_dst_rows=joined("local_dst_rows"),
        dup_src_rows=joined("dup_src_rows"),
        dup_dst_rows=joined("dup_dst_rows"),
    )

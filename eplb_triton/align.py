"""Placement alignment: relabel a new placement so that as few experts as possible move.

A balancer such as DeepSeek's EPLB decides *which experts go together* on a rank; which rank
a group lands on, and which row an expert takes within its rank, are arbitrary. Consecutive
placements therefore reshuffle nearly every rank even when the groups barely change.
:func:`align_placement` undoes that arbitrariness, load-neutrally:

* whole ranks' contents are permuted (within a node, and whole nodes among nodes, when
  ``ranks_per_node`` is given), choosing the permutation that minimises the network copies
  the plan will need: an assignment problem per layer (per node pair, then over nodes),
  solved exactly by a batched Hungarian algorithm (:func:`linear_assignment`);
* within each rank, experts that the old map already has on that rank keep their rows.

Every rank of the result holds exactly the multiset of experts of some rank of ``new`` (so
per-rank load is unchanged), and with nodes every node holds the ranks of one node of ``new``.

Objective (default ``"copies_then_bottleneck"``): the fewest network copies (``(rank, expert)``
pairs the rank needs but does not hold); among the assignments with that many, the smallest
largest estimated per-rank network load; then rows that change, then keeping rank ``q``'s
content on rank ``q``.

Why copies cannot drop further: every candidate keeps each rank's multiset of ``new``, and a
rank's network copies depend only on its old and new multisets, so the per-layer assignment
problem is the whole search space (swapping replicas of one expert between ranks leaves every
multiset unchanged), and the Hungarian algorithm solves it exactly. Over a sequence the greedy
step-by-step choice is optimal too: the next step's candidates are the same multisets whatever
ranks they landed on. What remains is set by the balancer's choice of groups.
"""

from __future__ import annotations

import numpy as np
import torch

from .maps import normalize_maps
from .plan import compact_ids

__all__ = ["OBJECTIVES", "align_placement", "linear_assignment", "rank_costs"]

OBJECTIVES = ("copies_then_bottleneck", "copies", "bottleneck")

_INF = np.iinfo(np.int64).max // 4


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect assignment of a batch of square integer cost matrices.

    ``cost`` has shape ``(batch, n, n)`` (or ``(n, n)``); returns ``col[batch, n]`` with
    ``col[b, i]`` the column given to row ``i``. Hungarian algorithm with potentials
    (shortest augmenting paths, O(n^3) per problem), run over the whole batch at once; exact
    for integer costs. Ties are broken deterministically.
    """
    cost = np.asarray(cost)
    squeeze = cost.ndim == 2
    if squeeze:
        cost = cost[None]
    if cost.ndim != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(f"cost must be (batch, n, n), got {cost.shape}")
    batch, n, _ = cost.shape
    if n == 0 or batch == 0:
        out = np.zeros((batch, n), dtype=np.int64)
        return out[0] if squeeze else out
    # 1-based rows/columns; column 0 is the virtual start of every augmenting path.
    a = np.zeros((batch, n + 1, n + 1), dtype=np.int64)
    a[:, 1:, 1:] = cost
    u = np.zeros((batch, n + 1), dtype=np.int64)
    v = np.zeros((batch, n + 1), dtype=np.int64)
    p = np.zeros((batch, n + 1), dtype=np.int64)  # p[j]: row matched to column j (0 = none)
    way = np.zeros((batch, n + 1), dtype=np.int64)
    every = np.arange(batch)
    for i in range(1, n + 1):
        p[:, 0] = i
        j0 = np.zeros(batch, dtype=np.int64)
        minv = np.full((batch, n + 1), _INF, dtype=np.int64)
        used = np.zeros((batch, n + 1), dtype=bool)
        act = every
        while act.size:
            used[act, j0[act]] = True
            i0 = p[act, j0[act]]
            cur = a[act, i0, :] - u[act, i0][:, None] - v[act]
            free = ~used[act]
            m = minv[act]
            upd = free & (cur < m)
            minv[act] = np.where(upd, cur, m)
            way[act] = np.where(upd, j0[act][:, None], way[act])
            masked = np.where(free, minv[act], _INF)
            masked[:, 0] = _INF
            j1 = np.argmin(masked, axis=1)
            delta = masked[np.arange(act.size), j1]
            b_used, j_used = np.nonzero(used[act])
            u[act[b_used], p[act[b_used], j_used]] += delta[b_used]
            v[act] -= np.where(used[act], delta[:, None], 0)
            minv[act] -= np.where(free, delta[:, None], 0)
            j0[act] = j1
            act = act[p[act, j1] != 0]
        # Augment along `way` back to the virtual column 0.
        act = every
        while act.size:
            j1 = way[act, j0[act]]
            p[act, j0[act]] = p[act, j1]
            j0[act] = j1
            act = act[j1 != 0]
    col = np.zeros((batch, n), dtype=np.int64)
    rows = p[:, 1:] - 1
    col[np.repeat(every, n), rows.reshape(-1)] = np.tile(np.arange(n), batch)
    return col[0] if squeeze else col


def rank_costs(old: np.ndarray, new: np.ndarray, ep_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cost, moved, load)``, each ``[l, r, q]`` for giving old rank ``r`` the content of new rank
    ``q``: the lexicographic cost :func:`align_placement` minimises, the experts copied onto ``r``,
    and the estimated busiest-link load (copies in or sends out)."""
    num_layers, num_physical = old.shape
    num_local = num_physical // ep_size
    num_ids = int(max(old.max(initial=-1), new.max(initial=-1))) + 1
    width = max(num_ids, 1)

    def counts(m: np.ndarray) -> np.ndarray:
        layer, slot = np.nonzero(m >= 0)
        key = (layer * ep_size + slot // num_local) * width + m[layer, slot]
        return np.bincount(key, minlength=num_layers * ep_size * width).reshape(num_layers, ep_size, width)

    c_old, c_new = counts(old), counts(new)
    p_old, p_new = (c_old > 0).astype(np.float32), (c_new > 0).astype(np.float32)
    need = p_new.sum(axis=2)  # distinct experts of new rank q
    copies = need[:, None, :] - np.matmul(p_old, p_new.transpose(0, 2, 1))  # (l, r, q)
    # Rows kept when q's multiset sits on r: sum_e min(count_old_r(e), count_new_q(e)).
    kept = np.zeros((num_layers, ep_size, ep_size), dtype=np.int64)
    small_old = c_old.astype(np.int16)
    small_new = c_new.astype(np.int16)
    for r in range(ep_size):  # loop over ranks (<= a few dozen), vectorised over layers/experts
        kept[:, r, :] = np.minimum(small_old[:, r, None, :], small_new).sum(axis=2)
    filled = (new >= 0).reshape(num_layers, ep_size, num_local).sum(axis=2)
    changed_rows = filled[:, None, :] - kept
    moved = np.rint(copies).astype(np.int64)
    off = 1 - np.eye(ep_size, dtype=np.int64)
    # Estimated network sends of old rank r if it takes q's content: the demand for r's
    # experts from every new rank (shared among an expert's holders), less what stays on r.
    holders = np.maximum(p_old.sum(axis=1, keepdims=True), 1.0)  # (l, 1, e)
    overlap_w = np.matmul(p_old / holders, p_new.transpose(0, 2, 1))  # (l, r, q)
    sends = np.ceil(overlap_w.sum(axis=2, keepdims=True) - overlap_w - 1e-6).astype(np.int64)
    load = np.maximum(moved, sends)
    return (moved * (num_local + 1) + changed_rows) * 2 + off[None], moved, load


def align_placement(
    old: np.ndarray | torch.Tensor,
    new: np.ndarray | torch.Tensor,
    ep_size: int,
    *,
    ranks_per_node: int | None = None,
    objective: str = "copies_then_bottleneck",
) -> np.ndarray | torch.Tensor:
    """Relabel ``new`` (load-neutrally) so that it moves as few experts as possible from ``old``.

    Args:
        old: current map, ``(num_layers, num_physical)`` or ``(num_physical,)``, torch
            tensor or numpy array of expert ids (``-1`` = empty).
        new: target map from a balancer, same shape; every expert it names must be held by
            ``old`` in the same layer.
        ep_size: number of EP ranks.
        ranks_per_node: if given (a divisor of ``ep_size``), ranks are only permuted within
            their node and nodes as wholes, so every node of the result holds the ranks of
            one node of ``new``.
        objective: ``"copies_then_bottleneck"`` (default): the fewest network copies, and
            among the relabellings with that many, the smallest largest estimated network
            load of any rank (its receives, or its sends: the demand for its experts that
            leaves it); never more copies than ``"copies"``. ``"copies"``: fewest copies
            only. ``"bottleneck"``: first the smallest estimated load, then copies under
            that cap; kept only where it needs no more copies than ``new`` itself, so it may
            trade copies for bottleneck.

    Returns:
        ``new_aligned``, same shape and type (torch tensor on the same device and dtype, or
        numpy array of the same dtype) as ``new``: each rank holds exactly the multiset of
        experts of one rank of ``new``, and never more network copies are needed from
        ``old`` than for ``new`` itself (the identity relabelling is one of the candidates).

    Raises:
        TypeError, ValueError: malformed maps or ``ranks_per_node``.
    """
    maps = normalize_maps(old, new, ep_size)
    if ranks_per_node is not None:
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, (int, np.integer)):
            raise TypeError(f"ranks_per_node must be an int or None, got {type(ranks_per_node).__name__}")
        if ranks_per_node < 1 or ep_size % ranks_per_node:
            raise ValueError(f"ranks_per_node={ranks_per_node} must be a positive divisor of ep_size={ep_size}")
    o, n = compact_ids(maps.old, maps.new)  # relabelling never looks at id values
    num_layers = maps.num_layers
    num_local = maps.num_local
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    cost, moved, load = rank_costs(o, n, ep_size)
    perm = _assign(cost, ranks_per_node)
    if objective != "copies":
        perm = _cap_load(cost, moved, load, perm, ranks_per_node, keep_copies=objective == "copies_then_bottleneck")
    aligned = _place_rows(o, n, perm, ep_size, num_local)
    if n is not maps.new:  # ids were renumbered densely (order kept): map them back
        ids = np.unique(np.concatenate([maps.old.reshape(-1), maps.new.reshape(-1)]))
        ids = ids[ids >= 0]
        aligned = np.where(aligned >= 0, ids[np.maximum(aligned, 0)], -1)
    if maps.squeezed:
        aligned = aligned[0]
    if isinstance(new, torch.Tensor):
        return torch.as_tensor(aligned, dtype=new.dtype).to(new.device)
    return aligned.astype(np.asarray(new).dtype, copy=False)


def _pick(matrix: np.ndarray, perm: np.ndarray) -> np.ndarray:
    return np.take_along_axis(matrix, perm[:, :, None], axis=2)[..., 0]


def _cap_load(cost, moved, load, perm, ranks_per_node: int | None, *, keep_copies: bool = False) -> np.ndarray:
    """Per layer, the smallest cap on ``load`` that an assignment can meet (bisection over
    Hungarian runs with a prohibitive penalty above the cap), then the cheapest such one.
    Falls back to ``perm`` where the capped one needs more copies than no relabelling.

    ``keep_copies``: ``perm`` is copies-optimal; a cap counts as met only by an assignment
    with no more copies than ``perm`` (the penalised Hungarian returns the fewest copies
    among the assignments under the cap, and those sets grow with the cap, so bisection
    still finds the smallest such cap)."""
    num_layers, ep_size, _ = cost.shape
    big = int(cost.max()) * ep_size + 1
    hi = _pick(load, perm).max(axis=1)
    lo = np.maximum(load.min(axis=1).max(axis=1), load.min(axis=2).max(axis=1))
    best = perm.copy()
    allowed = _pick(moved, perm).sum(axis=1) if keep_copies else None
    while (lo < hi).any():
        act = np.flatnonzero(lo < hi)  # only layers still bisecting
        mid = (lo[act] + hi[act]) // 2
        trial = _assign(cost[act] + big * (load[act] > mid[:, None, None]), ranks_per_node)
        ok = _pick(load[act], trial).max(axis=1) <= mid
        if keep_copies:
            ok &= _pick(moved[act], trial).sum(axis=1) <= allowed[act]
        best[act[ok]] = trial[ok]
        hi[act[ok]] = mid[ok]
        lo[act[~ok]] = mid[~ok] + 1
    identity = np.broadcast_to(np.arange(ep_size), (num_layers, ep_size))
    worse = _pick(moved, best).sum(axis=1) > _pick(moved, identity).sum(axis=1)
    return np.where(worse[:, None], perm, best)


def _assign(cost: np.ndarray, ranks_per_node: int | None) -> np.ndarray:
    """``perm[l, r]``: the new rank whose content old rank ``r`` takes, minimising ``cost``."""
    num_layers, ep_size, _ = cost.shape
    if ranks_per_node is None or ranks_per_node == ep_size:
        return linear_assignment(cost)
    rpn = ranks_per_node
    nodes = ep_size // rpn
    # (l, A, B, i, j): old rank A*rpn+i takes new rank B*rpn+j
    blocks = cost.reshape(num_layers, nodes, rpn, nodes, rpn).transpose(0, 1, 3, 2, 4)
    inner = linear_assignment(blocks.reshape(-1, rpn, rpn)).reshape(num_layers, nodes, nodes, rpn)
    inner_cost = np.take_along_axis(blocks, inner[..., None], axis=4)[..., 0].sum(axis=3)
    outer = linear_assignment(inner_cost)  # (l, A) -> B
    chosen = np.take_along_axis(inner, outer[:, :, None, None], axis=2)[:, :, 0, :]  # (l, A, i) -> j
    return (outer[:, :, None] * rpn + chosen).reshape(num_layers, ep_size)


def _place_rows(old: np.ndarray, new: np.ndarray, perm: np.ndarray, ep_size: int, num_local: int) -> np.ndarray:
    """Put new rank ``perm[l, r]``'s experts on rank ``r``, keeping rows that already hold them."""
    num_layers = old.shape[0]
    groups = num_layers * ep_size
    items = np.take_along_axis(new.reshape(num_layers, ep_size, num_local), perm[:, :, None], axis=1).reshape(groups, num_local)
    rows = old.reshape(groups, num_local)
    width = int(max(old.max(initial=-1), new.max(initial=-1))) + 2
    lr = np.repeat(np.arange(groups), num_local)

    def occurrence_keys(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sort (group, value, position) and key each entry by (group, value, occurrence)."""
        flat = values.reshape(-1) + 1
        order = np.lexsort((np.tile(np.arange(num_local), groups), flat, lr))
        gv = lr[order] * width + flat[order]
        start = np.r_[True, gv[1:] != gv[:-1]]
        first_of = np.maximum.accumulate(np.where(start, np.arange(gv.size), 0))
        occurrence = np.arange(gv.size) - first_of
        return order, gv * num_local + occurrence

    item_order, item_key = occurrence_keys(items)
    row_order, row_key = occurrence_keys(rows)
    # Matched: the k-th copy of value x among the items meets the k-th old row holding x.
    at = np.searchsorted(row_key, item_key)  # row_key is sorted (lexsort by group, value, pos)
    at_c = np.minimum(at, row_key.size - 1)
    match = row_key[at_c] == item_key
    out = np.empty(groups * num_local, dtype=np.int64)
    flat_items = items.reshape(-1)
    out[row_order[at_c[match]]] = flat_items[item_order[match]]
    row_taken = np.zeros(groups * num_local, dtype=bool)
    row_taken[row_order[at_c[match]]] = True
    # The rest, in order: k-th unmatched item of a group into its k-th free row.
    free_rows = np.flatnonzero(~row_taken)  # ascending = by group, then row
    out[free_rows] = flat_items[item_order[~match]]  # item_order is grouped by group
    return out.reshape(num_layers, ep_size * num_local)

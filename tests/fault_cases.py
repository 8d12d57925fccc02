"""Fault injection shared by the blocking-path and the worker reliability tests.

A hook is bound with ``functools.partial`` and installed as ``eplb_triton.transfer.fault_hook``,
the one hook that both the blocking path and the worker thread call as ``hook(point, **info)`` with
``info["rank"]`` and, where the point has them, ``info["layer"]`` and ``info["pass_index"]``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from eplb_triton.plan import plan_rearrangement
from eplb_triton.schedule import schedule_layer


def all_to_all_maps(world: int, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank sends to and receives from every other rank in every layer (plus a local move).

    Layer ``l``: row ``i`` of rank ``r`` gets the expert of row ``r`` of rank ``(i + l) % world``.
    """
    old = np.tile(np.arange(world * world), (layers, 1))
    new = np.empty_like(old)
    for l in range(layers):
        for r in range(world):
            for i in range(world):
                new[l, r * world + i] = old[l, ((i + l) % world) * world + r]
    return old, new


class Injected(Exception):
    """The worker tests' injected failure (a type the library never raises)."""


def _injected(where: str, layer) -> Exception:
    return RuntimeError(f"injected at {where}")


def injected_naming_the_layer(where: str, layer) -> Injected:
    """``error=`` for :func:`raise_at`: an :class:`Injected` whose text names the point and the layer."""
    return Injected(f"injected at {where}, layer {layer}")


def raise_at(point, at_layer, at_pass, victim, where, *, error=_injected, **info) -> None:
    """Rank ``victim`` raises ``error(where, at_layer)`` at ``point`` of layer ``at_layer``, staging
    pass ``at_pass`` (a point without a pass index counts as pass 0)."""
    if info["rank"] == victim and where == point and info.get("layer") == at_layer and info.get("pass_index", 0) == at_pass:
        raise error(where, at_layer)


def exit_at(point, at_layer, victim, where, *, lock=None, **info) -> None:
    """Rank ``victim`` ends its whole process at ``point`` of layer ``at_layer`` (``None``: a point
    without a layer), after taking ``lock`` if one is given (never released)."""
    if info["rank"] == victim and where == point and info.get("layer") == at_layer:
        if lock is not None:
            lock.acquire()
        os._exit(7)


def stall_at(point, at_layer, victim, seconds, where, **info) -> None:
    """Rank ``victim`` stays alive but sends nothing for ``seconds``, then gives up."""
    if info["rank"] == victim and where == point and info.get("layer") == at_layer:
        time.sleep(seconds)
        raise RuntimeError("stalled rank gives up")


def corrupt_in_flight(at_layer, at_pass, where, **info) -> None:
    """Rank 1 flips one bit of the first expert it received from its last peer in that pass."""
    if info["rank"] == 1 and where == "in_flight" and info["layer"] == at_layer and info["pass_index"] == at_pass:
        peer, data = sorted(info["received"].items())[-1]
        data[7] ^= 0x40


def corrupted_peer_and_expert(old, new, world: int, layer: int, pass_index: int, cost: int, budget: int | None):
    """``(peer, expert)`` whose bytes :func:`corrupt_in_flight` flips on rank 1: the first expert of
    the last peer's message in that pass, with ``cost`` bytes per expert on the wire and the
    staging ``budget`` of the run (``None``: one pass of ``world`` experts)."""
    plan = plan_rearrangement(old, new, world).layers[layer]
    passes = schedule_layer(plan, cost, budget if budget is not None else world * cost).passes
    assert len(passes) > pass_index
    view = plan.restrict(passes[pass_index]).rank(1)
    peer = max(view.recv_rows)
    return peer, int(new[layer, world + view.recv_rows[peer][0]])

"""Pacing of the background worker: how many layers may start between two ``step()`` calls.

A background rearrangement competes with serving for the link, the copy engines, memory
bandwidth and the host. :class:`~eplb_triton.TransferWorker` moves layers as fast as it can by
default; with a pace, its thread starts at most a given amount of work per *serving step*
(one :meth:`~eplb_triton.TransferWorker.step` call), so the runtime chooses where it sits
between "done soon" and "serving does not feel it". The knobs, keyword-only on the worker:

* ``layers_per_step``: at most this many layers' transfers start between two ``step()``
  calls (vLLM's async EPLB moves one layer per forward step: ``layers_per_step=1``);
* ``bytes_per_step``: the same in bytes, a layer counting the bytes of its busiest rank
  (:func:`layer_gate_bytes`); a layer larger than the budget still moves, alone, one per step;
* ``steps_per_layer``: slower than one layer per step: at most one layer's transfer starts
  every this many ``step()`` calls (for serving steps shorter than one layer's transfer).

``None`` (the default) for all three = as fast as possible. ``layers_per_step`` and
``bytes_per_step`` combine (a step's layers satisfy both); ``steps_per_layer`` cannot be
combined with either (it already allows one layer per window).

**Across ranks, without a collective.** The ranks' worker threads exchange every layer with
each other, so they must start the same layers after the same step, or one rank would wait in
an exchange for a peer that is waiting for credit (and a slow step cadence would look like a
stalled peer to ``timeout_s``). So the gate depends only on what every rank has identically:
the number of ``step()`` calls since ``submit`` (``step()`` is collective) and a schedule
computed at ``submit`` from the global plan (:meth:`Pacing.schedule`: layer ``i`` may start
once ``step()`` was called ``start[i]`` times). Credits are never "lost" when a worker is
slower than the pace: a worker that fell behind catches up at its own speed, which is the
unpaced speed. ``wait()`` lifts the gate: its request travels in the step agreement that
``wait()`` runs anyway (one more integer), so every rank lifts it at the same step.

Layers that move nothing on any rank are free: they consume no credit.

:class:`TransferProgress` is what ``TransferWorker.progress`` returns.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["PaceGate", "Pacing", "TransferProgress", "check_pacing", "layer_gate_bytes"]

#: the knobs, in the order they are named in messages and options
KNOBS = ("layers_per_step", "bytes_per_step", "steps_per_layer")


def _positive_int(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be a positive int or None (as fast as possible), got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None (as fast as possible), got {value}")
    return int(value)


@dataclass(frozen=True)
class Pacing:
    """Validated pace knobs (see the module docstring); all ``None`` = unpaced."""

    layers_per_step: int | None = None
    bytes_per_step: int | None = None
    steps_per_layer: int | None = None

    @property
    def paced(self) -> bool:
        return any(getattr(self, name) is not None for name in KNOBS)

    def options(self) -> dict[str, int | None]:
        """The knobs by name: the settings every rank must agree on."""
        return {name: getattr(self, name) for name in KNOBS}

    def schedule(self, layer_bytes: Sequence[int]) -> list[int]:
        """``start[i]``: how many ``step()`` calls after ``submit`` layer ``i`` may start.

        ``layer_bytes[i]``: the layer's gate bytes, the same on every rank
        (:func:`layer_gate_bytes`). Layers are grouped, in order, into per-step windows of
        at most ``layers_per_step`` layers and ``bytes_per_step`` bytes (a window holds at
        least one layer); window ``w`` opens after ``w`` steps (``w * steps_per_layer`` with
        that knob, one layer per window). Layers of 0 bytes are free: they join the window
        of the layer before them.
        """
        per_window = 1 if self.steps_per_layer is not None else self.layers_per_step
        gap = self.steps_per_layer or 1
        start, window, count, used = [], 0, 0, 0
        for nbytes in layer_bytes:
            nbytes = int(nbytes)
            if nbytes <= 0:
                start.append(window)
                continue
            full = per_window is not None and count >= per_window
            over = self.bytes_per_step is not None and used + nbytes > self.bytes_per_step
            if count and (full or over):
                window, count, used = window + gap, 0, 0
            start.append(window)
            count, used = count + 1, used + nbytes
        return start


def check_pacing(
    layers_per_step=None, bytes_per_step=None, steps_per_layer=None
) -> Pacing:
    """The knobs as a :class:`Pacing`; ``TypeError``/``ValueError`` naming the bad one.

    Each is ``None`` or an int >= 1 (not a bool, not a float); ``steps_per_layer`` cannot be
    combined with the other two.
    """
    pacing = Pacing(
        layers_per_step=_positive_int("layers_per_step", layers_per_step),
        bytes_per_step=_positive_int("bytes_per_step", bytes_per_step),
        steps_per_layer=_positive_int("steps_per_layer", steps_per_layer),
    )
    if pacing.steps_per_layer is not None and (pacing.layers_per_step is not None or pacing.bytes_per_step is not None):
        raise ValueError(
            "steps_per_layer (one layer every N steps) cannot be combined with layers_per_step or bytes_per_step "
            "(at most so much per step): give one or the other"
        )
    return pacing


def layer_gate_bytes(traffic: np.ndarray, expert_bytes: int) -> int:
    """Bytes a layer counts against ``bytes_per_step``: its busiest rank's, from the global plan.

    ``traffic`` is the layer plan's ``(ep_size, ep_size)`` matrix (off-diagonal: experts sent
    from row rank to column rank; diagonal: rows written locally). A rank writes (and stages)
    every row it receives or fills locally, and packs every row it sends; the layer counts
    ``expert_bytes`` times the largest of these counts over ranks. Every rank has the same
    plan, so every rank computes the same number (a rank's own bytes would not do: the gates
    must open on the same layers everywhere).
    """
    traffic = np.asarray(traffic, dtype=np.int64)
    if traffic.size == 0:
        return 0
    written = traffic.sum(axis=0)  # received + local writes, per destination rank
    sent = traffic.sum(axis=1) - np.diag(traffic)
    return int(max(written.max(), sent.max())) * int(expert_bytes)


class PaceGate:
    """The worker thread's gate over one job's layers (guarded by the worker's lock).

    ``start``: :meth:`Pacing.schedule` of the job (``None`` = unpaced). The serving thread
    calls :meth:`on_step` after each ``step()`` agreement and :meth:`lift` when the ranks
    agreed to lift the pace (``wait()``); the worker thread asks :meth:`allows` before it
    starts a layer.
    """

    def __init__(self, start: Sequence[int] | None):
        self.start = None if start is None else [int(s) for s in start]
        self.steps = 0  # step() calls since submit (collective: the same count on every rank)
        self.lifted = start is None or not any(self.start)

    def allows(self, index: int) -> bool:
        """May layer ``index`` (position in the job) start now?"""
        return self.lifted or self.steps >= self.start[index]

    def on_step(self) -> None:
        self.steps += 1

    def lift(self) -> None:
        self.lifted = True


@dataclass(frozen=True)
class TransferProgress:
    """Where a :class:`~eplb_triton.TransferWorker`'s rearrangement stands, on this rank.

    ``layers_done``: swapped (applied; the same on every rank after each ``step()``);
    ``layers_moved``: transferred by this rank's worker thread (ready to swap or swapped);
    ``bytes_sent``/``bytes_received``: what this rank exchanged so far (its
    :class:`~eplb_triton.TransferStats` totals, checksum trailers included with ``verify``);
    ``elapsed_s``: since ``submit`` (until the last swap, once done); ``eta_s``: the time
    left at the rate so far (``elapsed_s / layers_done`` per layer left), ``None`` before
    the first layer is done, 0 when all are.
    """

    layers_total: int = 0
    layers_done: int = 0
    layers_moved: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None

    @property
    def bytes_moved(self) -> int:
        return self.bytes_sent + self.bytes_received

    @property
    def finished(self) -> bool:
        return self.layers_done == self.layers_total

    @classmethod
    def of(
        cls, total: int, done: int, moved: int, bytes_sent: int, bytes_received: int, elapsed_s: float
    ) -> "TransferProgress":
        if done >= total:
            eta = 0.0
        elif done == 0:
            eta = None
        else:
            eta = elapsed_s / done * (total - done)
        return cls(total, done, moved, int(bytes_sent), int(bytes_received), float(elapsed_s), eta)

    def __str__(self) -> str:
        left = "-" if self.eta_s is None else f"{self.eta_s:.3f} s"
        return (
            f"layers {self.layers_done}/{self.layers_total} swapped ({self.layers_moved} moved), "
            f"{self.bytes_moved / 1e6:.3f} MB exchanged, {self.elapsed_s:.3f} s elapsed, {left} left"
        )

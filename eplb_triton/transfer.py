"""Transfer: run a layer's plan on this rank, and the blocking whole-model API.

Per layer and round, on one rank::

    staging = [ packed sends, peer by peer | receive buffers, peer by peer | local scratch ]
    pack(send rows), stage(local sources)  ->  one irecv + one isend per peer (batch_isend_irecv)
    ->  wait (deadline: timeout_s)  ->  verify checksums  ->  write: local moves, received, duplicates

Every row a round reads is read before that round writes anything, so a row may be both a
source and a destination. When a layer does not fit in ``max_buffer_bytes`` it runs in
rounds; rounds are ordered so that a row is never overwritten before the last round that
reads its old contents; a cycle of moves too big for one round is broken by stashing one row
(see :mod:`eplb_triton.schedule`).

Reliability (see :func:`rearrange_expert_weights_inplace`):

* no row is written before the receives of its round completed; a layer that needs several
  rounds saves the old contents of what it overwrites (undo buffer) and is rolled back on
  failure, so after any failure each layer on each rank is entirely old or entirely new;
* ``timeout_s`` bounds every wait on peers (:meth:`Communicator.wait`), and a final tiny
  all-to-all (:meth:`Communicator.confirm`) makes every rank learn about a failure anywhere;
* ``verify=True`` sends a checksum per expert (:mod:`eplb_triton.checksum`) and checks it
  before anything is written.

The building blocks (:func:`prepare_layers`, :class:`LayerWork`, :class:`RoundWork`,
:func:`finish_transfer`) are what the background worker drives;
:func:`rearrange_expert_weights_inplace` is the blocking API.

Network rounds (``rounds=True|"pair"|"expert"``, see :func:`eplb_triton.plan.network_rounds`):
each round's exchange is split into planner rounds in which a rank sends to at most one peer
and receives from at most one (one isend + one irecv at most), waited on one after the other.
Everything is still packed once per round before the first exchange and written after the
last, so atomicity and ``verify`` are unchanged; a planner round moves a slice of a per-peer
message (``"pair"``: the whole message; ``"expert"``: one expert, the last one with the
checksum trailer).

Testing hook: :data:`fault_hook`, when set, is called as ``fault_hook(point, **info)`` at the
named points ``layer_start``, ``before_send``, ``posted`` (after each batch of p2p ops is
issued; ``info["ops"]``: its ``(peer, "send"|"recv")`` labels, ``info["step"]``: the planner
round, 0 without rounds), ``in_flight`` (``info["received"]``: the received messages, by
peer, before they are checked), ``round_applied`` and ``before_confirm``. It may raise,
sleep, exit or corrupt ``received`` to simulate failures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .checksum import CHECKSUM_BYTES, expert_checksums, trailer_bytes
from .comm import ChecksumMismatchError, Communicator, PeerError, TransferError
from .inputs import CheckedInputs, WeightsSignature, agree_inputs, check_inputs, row_cost
from .layout import ExpertLayout, index_tensor
from .maps import EPGroup, ExpertMap, RankMapping
from .p2p import acquire as acquire_p2p, resolve_transport
from .plan import LayerPlan, RankPlan, RearrangementPlan, _check_options, plan_from_maps, with_rounds
from .schedule import schedule_layer, smallest_budget_bytes

__all__ = [
    "ChecksumMismatchError",
    "LayerWork",
    "PeerError",
    "RoundWork",
    "TransferError",
    "TransferStats",
    "finish_transfer",
    "prepare_layers",
    "rearrange_expert_weights_inplace",
    "reserve",
]

logger = logging.getLogger(__name__)

#: Test-only fault injection: ``fault_hook(point, **info)`` at named points (module docstring).
fault_hook: Callable[..., None] | None = None


def _fault(point: str, **info) -> None:
    if fault_hook is not None:
        fault_hook(point, **info)


@dataclass
class TransferStats:
    """What one rank did during a rearrangement.

    ``bytes_sent[p]`` / ``bytes_received[p]``: packed bytes exchanged with EP peer ``p``
    (with ``verify``, the checksum trailers included: what went over the wire).
    ``p2p_ops``: isend + irecv ops issued. ``layer_times_s[l]``: wall time of layer ``l``.
    ``peak_staging_bytes``: the largest staging buffer used at once. ``rounds``: exchange
    rounds over all layers. ``local_copies``: rows written by local moves and duplicate fills.
    ``peak_undo_bytes``: the rollback buffer (layers that run in several rounds).
    ``verified_experts``: received experts whose checksum was checked. ``rollbacks``: layers
    rolled back after a failure. ``failed_layers``: layers left old on this rank.
    ``control_ops``: ops of the final confirmation (not counted in ``p2p_ops``).
    ``exchanges``: batches of p2p ops issued (one per round with network traffic, or one per
    planner round with ``rounds=``); ``max_ops_per_exchange``: the largest batch (at most
    ``2 * (ep_size - 1)``; at most 2 with ``rounds=``).
    """

    rank: int
    ep_size: int
    bytes_sent: np.ndarray
    bytes_received: np.ndarray
    p2p_ops: int = 0
    layer_times_s: list[float] = field(default_factory=list)
    peak_staging_bytes: int = 0
    rounds: int = 0
    local_copies: int = 0
    peak_undo_bytes: int = 0
    verified_experts: int = 0
    rollbacks: int = 0
    failed_layers: list[int] = field(default_factory=list)
    control_ops: int = 0
    exchanges: int = 0
    max_ops_per_exchange: int = 0

    @classmethod
    def empty(cls, rank: int, ep_size: int) -> "TransferStats":
        zeros = np.zeros(ep_size, dtype=np.int64)
        return cls(rank=rank, ep_size=ep_size, bytes_sent=zeros.copy(), bytes_received=zeros.copy())

    @property
    def total_bytes_sent(self) -> int:
        return int(self.bytes_sent.sum())

    @property
    def total_bytes_received(self) -> int:
        return int(self.bytes_received.sum())

    @property
    def total_time_s(self) -> float:
        return float(sum(self.layer_times_s))

    def traffic_summary(self) -> str:
        """One line: bytes sent / received per peer (peers with traffic only)."""
        sent = {p: int(b) for p, b in enumerate(self.bytes_sent) if b}
        received = {p: int(b) for p, b in enumerate(self.bytes_received) if b}
        return (
            f"rank {self.rank}: sent {self.total_bytes_sent} B {sent}, received {self.total_bytes_received} B "
            f"{received}, {len(self.layer_times_s)} layers in {self.total_time_s:.4f} s, {self.rounds} rounds, "
            f"{self.p2p_ops} p2p ops"
        )


def upload_rows(works: Sequence["RoundWork"], device: torch.device) -> None:
    """Every row list of ``works`` to ``device`` in one pinned copy (one per call rather than
    one per round), cut into views by two ``split`` calls (a slice per list cost ~3 us of host
    time each: ~0.4 ms for an 8-layer call on the H200 hosts)."""
    lists = [work._row_lists() for work in works]
    parts = [a for row_lists in lists for a in row_lists]
    flat = index_tensor(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64), device)
    pieces = flat.split([a.size for a in parts])
    # the same memory in pairs (send + local sources, local destinations + receives, fills): one launch each
    pairs = flat.split([a.size + b.size for row_lists in lists for a, b in zip(row_lists[::2], row_lists[1::2])])
    width, half = len(_ROW_LISTS), len(_ROW_LISTS) // 2
    for i, work in enumerate(works):
        rows = dict(zip(_ROW_LISTS, pieces[i * width : (i + 1) * width]))
        rows["send+local_src"], rows["local_dst+recv"] = pairs[i * half], pairs[i * half + 1]
        work._device_rows = rows


_ROW_LISTS = ("send", "local_src", "local_dst", "recv", "dup_src", "dup_dst")  # in this order in memory


def _wire_order(rows_by_peer: dict[int, np.ndarray], peers: list[int], chunk: int | None) -> np.ndarray:
    """Rows of every peer's message in wire order: peer by peer, or piece by piece (``chunk``
    experts of each peer per piece) when messages are split."""
    if not peers:
        return np.zeros(0, dtype=np.int64)
    if chunk is None:
        return np.concatenate([np.asarray(rows_by_peer[p], dtype=np.int64) for p in peers])
    longest = max(len(rows_by_peer[p]) for p in peers)
    parts = [rows_by_peer[p][i : i + chunk] for i in range(0, longest, chunk) for p in peers]
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in parts])


def _batch_spans(peers: list[int], counts: list[int], chunk: int | None) -> list[list[tuple[int, int, int]]]:
    """``(peer, first expert, count)`` per batch, in the order of :func:`_wire_order`."""
    if chunk is None:  # plain ints: numpy's per-call overhead was ~28 us of host time per layer
        batch, first = [], 0
        for peer, count in zip(peers, counts):
            batch.append((peer, first, count))
            first += count
        return [batch]
    spans, first = [], 0
    for start in range(0, max(counts, default=0), chunk):
        batch = []
        for peer, count in zip(peers, counts):
            n = min(chunk, count - start)
            if n > 0:
                batch.append((peer, first, n))
                first += n
        spans.append(batch)
    return spans or [[]]


@dataclass
class RoundWork:
    """One exchange round of one layer on one rank, with its staging slices.

    Staging layout of a round (bytes)::

        | sends, peer by peer | local scratch | receives, peer by peer |

    (sends and local sources are packed by one launch, local moves and receives unpacked by one)

    Each peer's message is its packed experts (``count * expert_bytes``); with ``verify`` it
    is followed by a trailer of one int64 checksum per expert padded to 16 bytes
    (:func:`~eplb_triton.checksum.trailer_bytes`), so a peer still gets one isend and one
    irecv per round. Without ``verify`` every send row is packed by one launch; with it,
    one launch per peer (the trailers split the buffer).

    Sync-path order (see :meth:`LayerWork.run`): :meth:`pack_sends` and :meth:`stage_local`
    only *read* rows; :meth:`post` starts the exchange; after the wait, :meth:`verify_received`
    and :meth:`apply` write rows. So nothing is written before the round's receives are in.

    Rows listed in the layer's stash are read from the stash, not from the live weights:
    ``stashed_sends`` are positions in ``send_rows`` whose packed expert is copied from stash
    entry ``stashed_send_entries``; local moves from the stash write ``stash_local_dst_rows``
    from entries ``stash_local_entries``. ``local_src_rows``/``local_dst_rows`` are the other
    local moves.

    ``steps`` (``rounds=``; ``None`` = one exchange with every peer): per planner round,
    ``(send_peer, send_start, send_stop, recv_peer, recv_start, recv_stop)``: the positions
    ``[start, stop)`` of the per-peer messages' experts exchanged in it (peer -1 = none);
    see :meth:`exchanges`.
    """

    view: RankPlan
    expert_bytes: int
    send_peers: list[int]
    send_counts: list[int]
    recv_peers: list[int]
    recv_counts: list[int]
    send_rows: np.ndarray
    recv_rows: np.ndarray
    local_src_rows: np.ndarray
    local_dst_rows: np.ndarray
    stashed_sends: np.ndarray
    stashed_send_entries: np.ndarray
    stash_local_entries: np.ndarray
    stash_local_dst_rows: np.ndarray
    verify: bool = False
    steps: list[tuple[int, int, int, int, int, int]] | None = None
    chunk_experts: int | None = None
    _device_rows: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _batches: list | None = field(default=None, repr=False)
    _totals: tuple[int, int] | None = field(default=None, repr=False)  # bytes of all sends, of all receives
    _views: tuple | None = field(default=None, repr=False)  # (staging key, its three regions)
    #: the round's (ep, ep) expert counts, every rank's sends (set by prepare_layers): where
    #: the p2p transport finds each peer's message (:func:`eplb_triton.p2p.message_spans`)
    round_traffic: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_view(
        cls,
        view: RankPlan,
        expert_bytes: int,
        stash_rows: np.ndarray | None = None,
        *,
        verify: bool = False,
        steps: list[tuple[int, int, int, int, int, int]] | None = None,
        chunk_experts: int | None = None,
    ) -> "RoundWork":
        """``chunk_experts``: split every per-peer message into pieces of that many experts,
        exchanged as separate batches (the wire order becomes piece-major, see :meth:`batches`);
        ``None`` = whole messages. Only without ``verify`` and ``steps``."""
        if chunk_experts is not None and (verify or steps is not None or chunk_experts < 1):
            raise ValueError("chunk_experts needs verify=False, no planner rounds and a value >= 1")
        send_peers = sorted(view.send_rows)
        recv_peers = sorted(view.recv_rows)
        send_rows = _wire_order(view.send_rows, send_peers, chunk_experts)
        stash_rows = np.zeros(0, dtype=np.int64) if stash_rows is None else stash_rows
        if stash_rows.size:
            send_stashed = np.isin(send_rows, stash_rows)
            local_stashed = np.isin(view.local_src_rows, stash_rows)
        else:  # the usual case: no stash, nothing to look up
            send_stashed = np.zeros(send_rows.size, dtype=bool)
            local_stashed = np.zeros(view.local_src_rows.size, dtype=bool)
        if view.dup_dst_rows.size and np.intersect1d(view.dup_src_rows, view.dup_dst_rows).size:
            raise AssertionError("a duplicate fill writes a row another duplicate fill reads")  # the copy launch relies on it
        return cls(
            view=view,
            expert_bytes=expert_bytes,
            send_peers=send_peers,
            send_counts=[len(view.send_rows[p]) for p in send_peers],
            recv_peers=recv_peers,
            recv_counts=[len(view.recv_rows[p]) for p in recv_peers],
            send_rows=send_rows,
            recv_rows=_wire_order(view.recv_rows, recv_peers, chunk_experts),
            local_src_rows=view.local_src_rows[~local_stashed],
            local_dst_rows=view.local_dst_rows[~local_stashed],
            stashed_sends=np.flatnonzero(send_stashed),
            stashed_send_entries=np.searchsorted(stash_rows, send_rows[send_stashed]),
            stash_local_entries=np.searchsorted(stash_rows, view.local_src_rows[local_stashed]),
            stash_local_dst_rows=view.local_dst_rows[local_stashed],
            verify=verify,
            steps=steps,
            chunk_experts=chunk_experts,
        )

    # -- wire order -------------------------------------------------------------------------
    def batches(self) -> list[tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]]:
        """The exchanges of this round without ``verify``/``steps``, in order: per batch,
        ``(sends, recvs)``, each a list of ``(peer, first, count)`` in experts of the send /
        receive region (wire order). Whole messages: one batch. With ``chunk_experts = k``:
        batch ``i`` carries experts ``[i*k, (i+1)*k)`` of every peer's message, so batch ``i``'s
        sends are one contiguous run of the send region, packed by one launch while batch
        ``i - 1`` is on the wire."""
        if self._batches is None:
            sends = _batch_spans(self.send_peers, self.send_counts, self.chunk_experts)
            recvs = _batch_spans(self.recv_peers, self.recv_counts, self.chunk_experts)
            count = max(len(sends), len(recvs))
            self._batches = list(zip(sends + [[]] * (count - len(sends)), recvs + [[]] * (count - len(recvs))))
        return self._batches

    def release(self) -> None:
        """Drop the device row lists once the round's launches are queued (the caching
        allocator reuses their memory only behind those launches on the same stream)."""
        self._device_rows = None
        self._views = None

    def _row_lists(self) -> tuple[np.ndarray, ...]:
        """The lists :data:`_ROW_LISTS` names, in its order (so sends and local sources are one
        run of memory, packed by one launch; local destinations and receives too, unpacked by one)."""
        view = self.view
        return (
            self.send_rows, self.local_src_rows, self.local_dst_rows, self.recv_rows, view.dup_src_rows, view.dup_dst_rows,
        )

    def device_rows(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every row list this round launches with, on ``device`` (uploaded by :func:`upload_rows`
        for a whole call, or here for this round alone)."""
        if self._device_rows is None:
            upload_rows([self], device)
        return self._device_rows

    def _message_bytes(self, count: int) -> int:
        return count * self.expert_bytes + (trailer_bytes(count) if self.verify else 0)

    @property
    def _sends_bytes(self) -> int:
        if self._totals is None:
            self._totals = (sum(map(self._message_bytes, self.send_counts)), sum(map(self._message_bytes, self.recv_counts)))
        return self._totals[0]

    @property
    def _recvs_bytes(self) -> int:
        self._sends_bytes  # noqa: B018 - fills _totals
        return self._totals[1]

    @property
    def staging_bytes(self) -> int:
        return self._sends_bytes + self._recvs_bytes + self.local_dst_rows.size * self.expert_bytes

    @property
    def written_rows(self) -> np.ndarray:
        """Rows this round writes on this rank (distinct): received, local moves, duplicate fills."""
        view = self.view
        return np.concatenate([self.recv_rows, view.local_dst_rows, view.dup_dst_rows]).astype(np.int64)

    def _slices(self, staging: torch.Tensor):
        """``(sends, receives, local scratch)`` regions of ``staging`` (laid out sends, scratch, receives).
        The last staging's views are kept: a layer asks for them several times (~8 us each)."""
        key = (staging.data_ptr(), staging.numel())
        if self._views is None or self._views[0] != key:
            sends_end = self._sends_bytes
            scratch_end = sends_end + self.local_dst_rows.size * self.expert_bytes
            views = staging[:sends_end], staging[scratch_end : self.staging_bytes], staging[sends_end:scratch_end]
            self._views = (key, views)
        return self._views[1]

    def _per_peer(self, buf: torch.Tensor, peers: list[int], counts: list[int]) -> dict[int, torch.Tensor]:
        """Each peer's whole message (data, then the checksum trailer when verifying)."""
        out, offset = {}, 0
        for peer, count in zip(peers, counts):
            size = self._message_bytes(count)
            out[peer] = buf[offset : offset + size]
            offset += size
        return out

    def _split(self, message: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(packed experts, int64 checksums or None) of one peer's message."""
        data_end = count * self.expert_bytes
        if not self.verify:
            return message[:data_end], None
        return message[:data_end], message[data_end : data_end + count * CHECKSUM_BYTES].view(torch.int64)

    @property
    def framed(self) -> bool:
        """Whole per-peer messages moved by :meth:`exchanges` (``verify``: data then checksum
        trailer; ``steps``: planner rounds), rather than the batches of :meth:`post_batches`."""
        return self.verify or self.steps is not None

    def send_messages(self, staging: torch.Tensor) -> dict[int, torch.Tensor]:
        return self._per_peer(self._slices(staging)[0], self.send_peers, self.send_counts)

    def recv_messages(self, staging: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each peer's received bytes; with split messages, its first batch's piece."""
        return self.recv_messages_in(self._slices(staging)[1])

    def recv_messages_in(self, recv_buf: torch.Tensor) -> dict[int, torch.Tensor]:
        """:meth:`recv_messages` of a receive region ``recv_buf`` (wire order)."""
        if self.framed or self.chunk_experts is None:
            return self._per_peer(recv_buf, self.recv_peers, self.recv_counts)
        eb, out = self.expert_bytes, {}
        for _, recvs in self.batches():
            for peer, first, count in recvs:
                out.setdefault(peer, recv_buf[first * eb : (first + count) * eb])
        return out

    def _part(self, message: torch.Tensor, start: int, stop: int, count: int) -> torch.Tensor:
        """Experts ``[start, stop)`` of a ``count``-expert message; the last part also carries
        the checksum trailer (it follows the data)."""
        end = stop * self.expert_bytes if stop < count else message.numel()
        return message[start * self.expert_bytes : end]

    def exchanges(self, staging: torch.Tensor) -> list[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
        """``(sends, recvs)`` by peer of each framed exchange of this round, in order: every
        peer's whole message at once, or (``steps``) one slice to and from at most one peer each."""
        sends, recvs = self.send_messages(staging), self.recv_messages(staging)
        if self.steps is None:
            return [(sends, recvs)]
        counts = dict(zip(self.send_peers, self.send_counts))
        recv_counts = dict(zip(self.recv_peers, self.recv_counts))
        out = []
        for send_peer, a, b, recv_peer, c, d in self.steps:
            part_sends = {send_peer: self._part(sends[send_peer], a, b, counts[send_peer])} if send_peer >= 0 else {}
            part_recvs = {recv_peer: self._part(recvs[recv_peer], c, d, recv_counts[recv_peer])} if recv_peer >= 0 else {}
            out.append((part_sends, part_recvs))
        return out

    @property
    def op_labels(self) -> list[tuple[int, str]]:
        """``(peer, kind)`` of each request :meth:`post` returns (for error messages)."""
        return Communicator.op_labels(dict.fromkeys(self.send_peers), dict.fromkeys(self.recv_peers))

    # -- steps -------------------------------------------------------------------------------
    def post_batches(
        self,
        layout: ExpertLayout,
        send_buf: torch.Tensor,
        recv_buf: torch.Tensor,
        comm: Communicator,
        backend: str | None,
        stash: torch.Tensor | None = None,
        *,
        pack: bool = True,
        local_buf: torch.Tensor | None = None,
        launch_lock=contextlib.nullcontext(),
        where: str = "exchange",
    ) -> tuple[list, list[tuple[int, str]], list[int]]:
        """Pack and post every batch of :meth:`batches`: pack batch ``i``'s sends (one launch),
        then post its ops; on GPUs the next pack runs while batch ``i`` is on the wire (NCCL's
        stream waits only for the packs queued before each post). Receives land in ``recv_buf``
        in wire order. Reads rows (and the stash) only. Returns the requests, the ops' labels
        and the number of ops of each batch. ``pack=False`` sends ``send_buf`` as it is (a
        drain's junk, matching a peer's batches op for op). ``local_buf``: also pack the local
        moves' sources there; when it directly follows ``send_buf`` and messages are whole, one
        launch packs both. ``launch_lock`` is held around each launch (not around the posts)."""
        eb, device_rows = self.expert_bytes, self.device_rows(layout.device)
        rows = device_rows["send"]
        batches = self.batches()
        if local_buf is not None and self.local_src_rows.size:
            adjacent = local_buf.data_ptr() == send_buf.data_ptr() + self.send_rows.size * eb
            if pack and len(batches) == 1 and adjacent and (stash is None or not self.stashed_sends.size):
                both = send_buf.as_strided((self.send_rows.size * eb + local_buf.numel(),), (1,))
                with launch_lock:
                    layout.move("pack", both, src_rows=device_rows["send+local_src"], backend=backend)
                pack = False  # the sends are packed too
            else:
                with launch_lock:
                    layout.move("pack", local_buf, src_rows=device_rows["local_src"], backend=backend)
        requests, labels, ops = [], [], []
        for sends, recvs in batches:
            if sends and pack:
                first, stop = sends[0][1], sends[-1][1] + sends[-1][2]
                with launch_lock:
                    layout.move("pack", send_buf[first * eb : stop * eb], src_rows=rows[first:stop], backend=backend)
                if stash is not None and self.stashed_sends.size:  # the blocking path: rows its earlier rounds overwrote
                    mine = (self.stashed_sends >= first) & (self.stashed_sends < stop)
                    self._from_stash(send_buf, self.stashed_sends[mine], self.stashed_send_entries[mine], stash)
            out = {peer: send_buf[f * eb : (f + n) * eb] for peer, f, n in sends}
            into = {peer: recv_buf[f * eb : (f + n) * eb] for peer, f, n in recvs}
            requests += comm.exchange(out, into, where=where)
            labels += Communicator.op_labels(out, into)
            ops.append(len(out) + len(into))
        return requests, labels, ops

    def pack_sends(
        self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None, stash: torch.Tensor | None = None
    ) -> None:
        """Framed messages: pack every peer's rows (reads rows and the stash only); with
        ``verify`` also their checksums. (Batches pack in :meth:`post_batches`.)"""
        if not self.send_rows.size:
            return
        send_buf = self._slices(staging)[0]
        if not self.verify:
            layout.move("pack", send_buf, src_rows=self.device_rows(layout.device)["send"], backend=backend)
            self._from_stash(send_buf, self.stashed_sends, self.stashed_send_entries, stash)
            return
        offset = 0
        for peer, message in self.send_messages(staging).items():
            rows = self.view.send_rows[peer]
            data, sums = self._split(message, len(rows))
            layout.pack(rows, data, backend=backend)
            mine = (self.stashed_sends >= offset) & (self.stashed_sends < offset + len(rows))
            self._from_stash(data, self.stashed_sends[mine] - offset, self.stashed_send_entries[mine], stash)
            expert_checksums(data, self.expert_bytes, out=sums)
            offset += len(rows)

    def _from_stash(self, packed: torch.Tensor, positions: np.ndarray, entries: np.ndarray, stash) -> None:
        """Overwrite packed experts ``positions`` with stash entries (rows that may be overwritten already)."""
        if positions.size:
            eb = self.expert_bytes
            table = packed.view(-1, eb)
            table[torch.as_tensor(positions, device=table.device)] = stash.view(-1, eb)[
                torch.as_tensor(entries, device=table.device)
            ]

    def stage_local(self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None) -> None:
        """Copy the old rows that local moves read into scratch (reads rows only)."""
        if self.local_src_rows.size:
            rows = self.device_rows(layout.device)["local_src"]
            layout.move("pack", self._slices(staging)[2], src_rows=rows, backend=backend)

    def post(self, staging: torch.Tensor, comm: Communicator) -> list:
        """Start one irecv + one isend per peer (framed messages); returns the requests (order: :attr:`op_labels`)."""
        return comm.exchange(self.send_messages(staging), self.recv_messages(staging))

    def start(
        self, layout: ExpertLayout, staging: torch.Tensor, comm: Communicator, backend: str | None, stash: torch.Tensor | None = None
    ) -> list:
        """Pack every peer's rows, stage local sources and start the exchange; returns requests."""
        if not self.framed:
            send_buf, recv_buf, scratch = self._slices(staging)
            return self.post_batches(layout, send_buf, recv_buf, comm, backend, stash, local_buf=scratch)[0]
        self.stage_local(layout, staging, backend)
        self.pack_sends(layout, staging, backend, stash)
        return self.post(staging, comm)

    def verify_received(self, staging: torch.Tensor) -> list[tuple[int, int]]:
        """``(peer, index in that peer's message)`` of every received expert whose checksum
        differs from the sender's (empty without ``verify``)."""
        if not self.verify:
            return []
        bad = []
        for peer, message in self.recv_messages(staging).items():
            count = len(self.view.recv_rows[peer])
            data, sums = self._split(message, count)
            mismatch = (expert_checksums(data, self.expert_bytes) != sums).nonzero().flatten().tolist()
            bad.extend((peer, k) for k in mismatch)
        return bad

    def apply(
        self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None, stash: torch.Tensor | None = None
    ) -> None:
        """Write the round: staged local moves, moves from the stash, received rows, then duplicate fills."""
        if not self.verify and self.local_dst_rows.size and self.recv_rows.size:
            # scratch and receives are adjacent: one launch writes both (distinct rows)
            _, recvs, scratch = self._slices(staging)
            both = scratch.as_strided((scratch.numel() + recvs.numel(),), (1,))
            layout.move("unpack", both, dst_rows=self.device_rows(layout.device)["local_dst+recv"], backend=backend)
            self._local_from_stash(layout, stash, backend)
            self._fill_duplicates(layout, backend)
            return
        if self.local_dst_rows.size:
            rows = self.device_rows(layout.device)["local_dst"]
            layout.move("unpack", self._slices(staging)[2], dst_rows=rows, backend=backend)
        self._local_from_stash(layout, stash, backend)
        self.apply_received(layout, staging, backend)

    def _local_from_stash(self, layout: ExpertLayout, stash: torch.Tensor | None, backend: str | None) -> None:
        if self.stash_local_dst_rows.size:
            eb = self.expert_bytes
            entries = torch.as_tensor(self.stash_local_entries, device=stash.device)
            layout.unpack(stash.view(-1, eb)[entries].reshape(-1), self.stash_local_dst_rows, backend=backend)

    def apply_local(
        self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None, stash: torch.Tensor | None = None
    ) -> None:
        """Local moves straight from rows (writes before the receives are in: not atomic;
        kept for callers of the first API; :meth:`stage_local` + :meth:`apply` replace it)."""
        if self.local_dst_rows.size:
            layout.copy_rows(self.local_src_rows, self.local_dst_rows, backend=backend, scratch=self._slices(staging)[2])
        self._local_from_stash(layout, stash, backend)

    def apply_received(self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None) -> None:
        """Unpack received rows, then duplicate fills (the end of :meth:`apply`; pairs with
        :meth:`apply_local` in the first API's order)."""
        view, rows = self.view, self.device_rows(layout.device)
        if self.recv_rows.size and not self.verify:
            layout.move("unpack", self._slices(staging)[1], dst_rows=rows["recv"], backend=backend)  # one launch, all peers
        elif self.recv_rows.size:
            for peer, message in self.recv_messages(staging).items():
                peer_rows = view.recv_rows[peer]
                layout.unpack(self._split(message, len(peer_rows))[0], peer_rows, backend=backend)
        self._fill_duplicates(layout, backend)

    def _fill_duplicates(self, layout: ExpertLayout, backend: str | None) -> None:
        if self.view.dup_dst_rows.size:
            rows = self.device_rows(layout.device)
            layout.move("copy", None, src_rows=rows["dup_src"], dst_rows=rows["dup_dst"], backend=backend)

    def count_into(self, stats: TransferStats, ops: int, *, batches: Sequence[int] | None = None) -> None:
        """Add this round to ``stats``; ``batches``: ops of each exchange issued (default: one
        exchange of ``ops`` ops, if any)."""
        for peer, count in zip(self.send_peers, self.send_counts):
            stats.bytes_sent[peer] += self._message_bytes(count)
        for peer, count in zip(self.recv_peers, self.recv_counts):
            stats.bytes_received[peer] += self._message_bytes(count)
        stats.p2p_ops += ops
        batches = [b for b in (batches if batches is not None else [ops]) if b]
        stats.exchanges += len(batches)
        stats.max_ops_per_exchange = max([stats.max_ops_per_exchange, *batches])
        stats.rounds += 1
        stats.local_copies += int(self.view.local_dst_rows.size + self.view.dup_dst_rows.size)


@dataclass
class LayerWork:
    """One layer on one rank: its layout, plan, rounds and the rows it stashes first.

    ``expert_ids`` (the layer's new map, optional) lets errors name logical experts.
    """

    index: int
    layout: ExpertLayout
    plan: LayerPlan
    rounds: list[RoundWork]
    stash_rows: np.ndarray
    expert_ids: np.ndarray | None = None

    @property
    def stash_bytes(self) -> int:
        return int(self.stash_rows.size) * self.layout.expert_bytes

    @property
    def staging_bytes(self) -> int:
        """Stash plus the largest round's staging."""
        return self.stash_bytes + max((r.staging_bytes for r in self.rounds), default=0)

    @property
    def undo_bytes(self) -> int:
        """Bytes needed to roll this layer back: old contents of the rows written by every
        round but the last (a single-round layer needs none)."""
        return sum(r.written_rows.size for r in self.rounds[:-1]) * self.layout.expert_bytes

    @property
    def has_network(self) -> bool:
        return self.plan.num_network > 0

    def expert_at(self, rank: int, row: int) -> int | None:
        if self.expert_ids is None:
            return None
        return int(self.expert_ids[rank * self.layout.num_local + row])

    def run(
        self,
        staging: torch.Tensor,
        comm: Communicator,
        backend: str | None,
        stats: TransferStats,
        *,
        timeout_s: float | None = None,
        undo: torch.Tensor | None = None,
        transport=None,
    ) -> None:
        """Run every round of this layer, blocking until its rows are in place.

        ``transport``: a :class:`~eplb_triton.p2p.P2PTransport` whose symmetric buffer is
        ``staging`` (peers pull the sends from its offset 0; the stash goes to its end), or
        ``None`` for ``comm``'s own isend/irecv.

        Atomic on this rank: a round writes rows only after its receives completed (and
        passed ``verify``); when the layer has several rounds, the old contents of the rows
        each round but the last overwrites are saved in ``undo`` (``>= undo_bytes`` bytes;
        ``None`` = no rollback, a failure may leave the layer half-applied). On any failure
        before the last round is applied, the rows written so far are restored and the
        layer is entirely old again.

        Raises:
            PeerError: a peer failed or missed the deadline (``.layer`` set); rolled back.
            ChecksumMismatchError: received bytes differ from the sender's; every round's
                exchange still completed (peers are not left waiting) and the layer was
                rolled back, so the group is still usable.
        """
        layout, eb = self.layout, self.layout.expert_bytes
        if transport is not None and self.stash_rows.size:  # p2p: the sends stay at offset 0, where peers read them
            cut = staging.numel() - self.stash_bytes
            staging, stash = staging[:cut], staging[cut:]
        elif self.stash_rows.size:
            stash, staging = staging[: self.stash_bytes], staging[self.stash_bytes :]
        else:  # the usual case: nothing overwritten early, nothing to read back
            stash = None
        if self.rounds and undo is None and len(self.rounds) > 1:
            logger.debug("layer %d runs in %d rounds without an undo buffer: not atomic", self.index, len(self.rounds))
        saved_rows: list[np.ndarray] = []
        saved_bytes = 0
        committed = False
        mismatch: ChecksumMismatchError | None = None
        last = len(self.rounds) - 1

        def rollback() -> None:
            nonlocal saved_bytes
            if saved_rows:
                layout.unpack(undo[:saved_bytes], np.concatenate(saved_rows), backend=backend)
                saved_rows.clear()
                saved_bytes = 0
                stats.rollbacks += 1

        _fault("layer_start", rank=comm.rank, layer=self.index)
        if self.stash_rows.size:  # reads only: old contents of rows that cycles overwrite early
            layout.pack(self.stash_rows, stash, backend=backend)
        try:
            for i, work in enumerate(self.rounds):
                where = f"layer {self.index}, round {i + 1}/{len(self.rounds)}"
                batches = []
                mover = comm if transport is None else transport.exchange_for(work.round_traffic, eb, verify=work.verify)
                if not work.framed:  # packs and posts batch by batch, then one wait for all
                    _fault("before_send", rank=comm.rank, layer=self.index, round=i)
                    send_buf, recv_buf, scratch = work._slices(staging)
                    try:  # posting fails too when a peer's connection is already closed
                        requests, labels, batches = work.post_batches(
                            layout, send_buf, recv_buf, mover, backend, stash, local_buf=scratch, where=where
                        )
                        _fault("posted", rank=comm.rank, layer=self.index, round=i, step=0, ops=labels)
                        mover.wait(requests, timeout_s=timeout_s, labels=labels, where=where)
                    except PeerError as exc:
                        exc.layer = self.index
                        raise
                    exchanges = []
                else:
                    work.stage_local(layout, staging, backend)
                    work.pack_sends(layout, staging, backend, stash)
                    _fault("before_send", rank=comm.rank, layer=self.index, round=i)
                    exchanges = work.exchanges(staging)
                for step, (sends, recvs) in enumerate(exchanges):
                    # planner rounds (``rounds=``) run one after the other; nothing is
                    # written until the last one completed
                    at = where if work.steps is None else f"{where}, network round {step + 1}/{len(exchanges)}"
                    labels = Communicator.op_labels(sends, recvs)
                    try:  # posting fails too when a peer's connection is already closed
                        requests = mover.exchange(sends, recvs, where=at)
                        _fault("posted", rank=comm.rank, layer=self.index, round=i, step=step, ops=labels)
                        mover.wait(requests, timeout_s=timeout_s, labels=labels, where=at)
                    except PeerError as exc:
                        exc.layer = self.index
                        raise
                    batches.append(len(labels))
                work.count_into(stats, sum(batches), batches=batches)
                if fault_hook is not None:  # the received views are only made for a hook
                    _fault("in_flight", rank=comm.rank, layer=self.index, round=i, received=work.recv_messages(staging))
                if mismatch is None:
                    bad = work.verify_received(staging)
                    stats.verified_experts += int(work.recv_rows.size) if work.verify else 0
                    if bad:
                        mismatch = self._mismatch_error(work, bad, comm.rank, where)
                        rollback()  # keep exchanging: the later rounds' peers are waiting for us
                if mismatch is not None:
                    continue
                if undo is not None and i < last:
                    rows = work.written_rows
                    if rows.size:
                        layout.pack(rows, undo[saved_bytes : saved_bytes + rows.size * eb], backend=backend)
                        saved_rows.append(rows)
                        saved_bytes += rows.size * eb
                work.apply(layout, staging, backend, stash)
                work.release()
                committed = i == last
                _fault("round_applied", rank=comm.rank, layer=self.index, round=i)
        except BaseException:
            if not committed:
                rollback()
            raise
        finally:
            if transport is not None:
                transport.mark_used()
        if mismatch is not None:
            raise mismatch

    def _mismatch_error(self, work: RoundWork, bad: list[tuple[int, int]], rank: int, where: str) -> ChecksumMismatchError:
        peer, k = bad[0]
        row = int(work.view.recv_rows[peer][k])
        expert = self.expert_at(rank, row)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        message = (
            f"{where}: rank {rank}: checksum mismatch for expert {expert} received from peer {peer} "
            f"(row {row}){more}; layer {self.index} was not applied on rank {rank}"
        )
        logger.error("%s", message)
        return ChecksumMismatchError(message, layer=self.index, peer=peer, expert=expert)


def _exchange_steps(plan: LayerPlan, rank: int) -> list[tuple[int, int, int, int, int, int]]:
    """:attr:`RoundWork.steps` of ``rank`` from a plan with rounds (rounds it is idle in are
    dropped: nobody waits for it there)."""
    steps = []
    for send_peer, send_pos, recv_peer, recv_pos in plan.round_steps(rank):
        if send_peer < 0 and recv_peer < 0:
            continue
        span = []
        for pos in (send_pos, recv_pos):
            start, stop = (int(pos[0]), int(pos[-1]) + 1) if pos.size else (0, 0)
            if not np.array_equal(pos, np.arange(start, stop)):  # one contiguous slice per peer
                raise RuntimeError(f"rank {rank}: a network round moves non-contiguous positions {pos.tolist()}")
            span.append((start, stop))
        steps.append((send_peer, *span[0], recv_peer, *span[1]))
    return steps


#: Pieces of a per-peer message moved as separate batches, so the pack of piece ``i + 1`` overlaps
#: the wire time of piece ``i``. Off (0) by default: on two H200 over NVLink (NCCL 2.28.9,
#: bench/results/link_speed-h200x2-run1.json) pieces made every config slower: qwen3 1.45 ms per
#: layer whole vs 2.78 (4 MiB pieces) / 2.19 (16 MiB) / 1.99 (32 MiB); deepseek-fp8 2.29 vs
#: 2.59 / 2.52 / 3.60; the per-batch cost of a NCCL group exceeds the pack time it hides.
PIPELINE_CHUNK_BYTES = 0
CHUNK_ENV = "EPLB_TRITON_CHUNK_BYTES"  # overrides it (0 = whole messages); must match on every rank


def pipeline_chunk_bytes(dist_backend: str | None) -> int:
    """Bytes per message piece for this process group's backend (0 = whole messages).

    NCCL only by default: on gloo the pack is not asynchronous to the wire, so pieces only add
    messages. ``EPLB_TRITON_CHUNK_BYTES`` overrides it for any backend (tests use it on gloo).
    """
    value = os.environ.get(CHUNK_ENV)
    if value not in (None, ""):
        try:
            chunk = int(value)
        except ValueError:
            raise ValueError(f"{CHUNK_ENV} must be an integer number of bytes, got {value!r}") from None
        if chunk < 0:
            raise ValueError(f"{CHUNK_ENV} must be >= 0, got {chunk}")
        return chunk
    return PIPELINE_CHUNK_BYTES if dist_backend == "nccl" else 0


def _chunk_experts(expert_bytes: int, chunk_bytes: int) -> int | None:
    """Experts per message piece (at least one), or None for whole messages."""
    return max(1, chunk_bytes // expert_bytes) if chunk_bytes else None


def prepare_layers(
    old_global_expert_indices,
    new_global_expert_indices,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    comm: Communicator,
    max_buffer_bytes: int | None = None,
    rank_mapping=None,
    *,
    verify: bool = False,
    timeout_s: float | None = None,
    rounds: bool | str | None = None,
    ranks_per_node: int | None = None,
    staging=None,
    expected_weights: WeightsSignature | None = None,
    transport: str = "auto",
) -> list[LayerWork]:
    """Validate everything, agree with every rank, plan and schedule; touches no weight.

    ``verify`` and ``rounds`` must be the same on every rank (they change the wire format
    and which ops meet; the agreement checks them). ``timeout_s`` bounds the agreement
    collective. ``rounds`` (``True``/``"pair"``/``"expert"``) splits each round's exchange
    into planner rounds (:attr:`RoundWork.steps`). ``ranks_per_node``: prefer same-node
    senders (see :func:`~eplb_triton.plan.plan_rearrangement`). ``staging``: a caller-provided
    buffer (see :func:`rearrange_expert_weights_inplace`); its bytes cap the budget.

    Input checking and the agreement are :mod:`eplb_triton.inputs`; ``expected_weights``
    refuses tensors replaced since that signature was taken (the background worker).
    ``transport`` (``"auto"``/``"nccl"``/``"p2p"``, :func:`eplb_triton.p2p.resolve_transport`)
    is resolved and agreed here; ``"p2p"`` moves whole messages (no pieces, no ``rounds``).

    Raises the same ValueError/TypeError on every rank when any rank's input is bad.
    """
    def more_checks(checked: CheckedInputs) -> dict[str, object]:
        # part of the input stage: errors become this rank's verdict; the result is agreed on
        options: dict[str, object] = {"chunk_bytes": pipeline_chunk_bytes(comm.backend)}  # which ops meet
        device = checked.layouts[0].device if checked.layouts else None
        options["transport"] = resolve_transport(transport, comm, device)  # same on every rank
        if options["transport"] == "p2p":  # one pull per peer message: no pieces, no planner rounds
            options["chunk_bytes"] = 0
            if checked.round_kind is not None:
                raise ValueError(f"transport='p2p' moves whole messages; rounds={rounds!r} needs transport='nccl'")
        if ranks_per_node is not None:
            _check_options(checked.maps.ep_size, "balanced", ranks_per_node)
        options["ranks_per_node"] = ranks_per_node  # it changes the senders: every rank must use the same
        if staging is not None and checked.layouts:  # the caller's buffer is the staging: its size is the budget
            held = staging_view(staging, checked.layouts[0].device).numel()
            largest = max(row_cost(lay, verify) for lay in checked.layouts)
            if held < largest:
                raise ValueError(f"staging holds {held} bytes, less than one packed expert ({largest} bytes)")
            budget = checked.max_buffer_bytes
            checked.max_buffer_bytes = held if budget is None else min(budget, held)
        return options

    checked = check_inputs(
        old_global_expert_indices,
        new_global_expert_indices,
        expert_weights,
        comm,
        max_buffer_bytes,
        rank_mapping,
        verify=verify,
        timeout_s=timeout_s,
        rounds=rounds,
        expected_weights=expected_weights,
        more_checks=more_checks,
    )
    agree_inputs(comm, checked)  # raises the same error on every rank; nothing touched yet
    maps, layouts, kind = checked.maps, checked.layouts, checked.round_kind
    max_buffer_bytes = checked.max_buffer_bytes
    chunk_bytes = checked.extra_options.get("chunk_bytes", 0)

    plan = plan_from_maps(maps, ranks_per_node=ranks_per_node)
    costs = [row_cost(layout, verify) for layout in layouts]
    if max_buffer_bytes is not None and costs and max_buffer_bytes < max(costs):
        # same plan and budget on every rank (agreed above): every rank raises this
        what = "one packed expert and its checksum" if verify else "one packed expert"
        raise ValueError(
            f"max_buffer_bytes={max_buffer_bytes} is smaller than {what} ({max(costs)} bytes); "
            f"{_smallest_budget_text(plan, costs, verify)}"
        )
    layers = []
    for index, (layout, layer_plan, cost) in enumerate(zip(layouts, plan.layers, costs)):
        try:  # None: the default budget, one layer (two rows with one row per rank), always enough
            schedule = schedule_layer(layer_plan, cost, max_buffer_bytes)
        except ValueError as exc:
            raise ValueError(f"layer {index}: {exc}; {_smallest_budget_text(plan, costs, verify)}") from None
        stash_rows = schedule.stash_rows(comm.rank, layer_plan.num_local)
        works = []
        for r in schedule.rounds:
            whole = len(schedule.rounds) == 1 and r.size == layer_plan.num_deliveries
            sub = layer_plan if whole else layer_plan.restrict(r)  # one pass: the plan itself
            steps = None
            if kind is not None:
                sub = with_rounds(sub, kind)
                steps = _exchange_steps(sub, comm.rank)
            view = sub.rank(comm.rank)
            chunk = _chunk_experts(layout.expert_bytes, chunk_bytes) if steps is None and not verify else None
            works.append(
                RoundWork.from_view(view, layout.expert_bytes, stash_rows, verify=verify, steps=steps, chunk_experts=chunk)
            )
            works[-1].round_traffic = sub.traffic
        layers.append(
            LayerWork(
                index=index,
                layout=layout,
                plan=layer_plan,
                rounds=works,
                stash_rows=stash_rows,
                expert_ids=maps.new[index],
            )
        )
    return layers


def _smallest_budget_text(plan: RearrangementPlan, costs: Sequence[int], verify: bool) -> str:
    """The smallest ``max_buffer_bytes`` every layer of ``plan`` can be scheduled in (at least one row)."""
    smallest = max([max(costs)] + [smallest_budget_bytes(layer, cost) for layer, cost in zip(plan.layers, costs)])
    return f"the smallest max_buffer_bytes that works for every layer{' with verify' if verify else ''} is {smallest}"


def staging_view(staging, device: torch.device) -> torch.Tensor:
    """The bytes of a caller-provided staging buffer as one contiguous 1-D uint8 view.

    ``staging``: one contiguous tensor (any dtype), or a list/tuple of tensors (a runtime's
    per-tensor scratch buffers, e.g. vLLM's ``expert_buffer``): the largest contiguous one is
    used, since the staging must be one block of memory. Nothing is allocated or copied.
    """
    if isinstance(staging, torch.Tensor):
        candidates = [staging]
    elif isinstance(staging, (list, tuple)) and staging and all(isinstance(t, torch.Tensor) for t in staging):
        candidates = list(staging)
    else:
        raise TypeError(f"staging must be a tensor or a non-empty list of tensors, got {type(staging).__name__}")
    usable = [t for t in candidates if t.is_contiguous() and t.device == device and t.numel()]
    if not usable:
        where = ", ".join(f"{tuple(t.shape)} on {t.device}" + ("" if t.is_contiguous() else " (not contiguous)") for t in candidates)
        raise ValueError(f"staging has no non-empty contiguous tensor on the weights' device {device}: {where}")
    largest = max(usable, key=lambda t: t.numel() * t.element_size())
    return largest.reshape(-1).view(torch.uint8)


def staging_bound(expert_weights: Sequence[Sequence[torch.Tensor]], max_buffer_bytes: int | None = None, *, verify: bool = False) -> int:
    """The most staging bytes one rank's blocking rearrangement of these weights can use:
    ``max_buffer_bytes``, or by default the largest layer's local rows packed (with
    ``verify``, plus their checksum trailers). Any plan fits in it (see :func:`schedule_layer`)."""
    layouts = [ExpertLayout(tensors) for tensors in expert_weights]
    if max_buffer_bytes is not None:
        return int(max_buffer_bytes)
    return max((lay.num_local * row_cost(lay, verify) for lay in layouts), default=0)


def reserve(
    expert_weights: Sequence[Sequence[torch.Tensor]],
    *,
    max_buffer_bytes: int | None = None,
    verify: bool = False,
    atomic: bool = False,
) -> torch.Tensor:
    """Allocate, up front, the staging a blocking rearrangement of these weights will use.

    Pass the result as ``staging=`` (with the same ``max_buffer_bytes`` and ``verify``) to
    :func:`rearrange_expert_weights_inplace`: it then allocates no staging of its own, so
    the memory can be counted by a runtime's profile run and the first rebalance allocates
    nothing. ``atomic=True`` adds room for the undo copy of layers that need several rounds
    (one layer's local rows, packed); without it such a call allocates that copy when needed
    (or pass ``atomic=False`` to the rearrangement as well).

    Returns a uint8 tensor on the weights' device; keep it for as long as rearrangements run.
    """
    bound = staging_bound(expert_weights, max_buffer_bytes, verify=verify)
    if atomic:
        bound += max(ExpertLayout(tensors).num_local * ExpertLayout(tensors).expert_bytes for tensors in expert_weights)
    device = expert_weights[0][0].device
    return torch.empty(max(bound, 1), dtype=torch.uint8, device=device)


def finish_transfer(
    comm: Communicator,
    layers: Sequence[LayerWork],
    stats: TransferStats,
    errors: Sequence[ChecksumMismatchError] = (),
    *,
    timeout_s: float | None = None,
) -> None:
    """The last step of a rearrangement: every rank learns whether every rank succeeded.

    Runs :meth:`Communicator.confirm` (a tiny all-to-all bounded by ``timeout_s``) when any
    layer moves data over the network, so a rank that died or stalled is named on every rank,
    and a checksum failure on one rank (``errors``: this rank's, its layers already rolled
    back) is raised on all of them. Without network traffic no rank depends on another and
    nothing is exchanged.

    Raises:
        PeerError: a peer did not confirm (dead, stalled, or failed earlier).
        ChecksumMismatchError: some rank's ``verify`` failed; the message lists every
            failing rank's first error (``.layer``/``.peer``/``.expert`` are this rank's own,
            if it failed).
    """
    failed = bool(errors)
    if any(layer.has_network for layer in layers) and comm.world_size > 1:
        _fault("before_confirm", rank=comm.rank)
        failed_ranks = comm.confirm(failed, timeout_s=timeout_s, where="final confirmation")
        stats.control_ops += 2 * (comm.world_size - 1)
    else:
        failed_ranks = [comm.rank] if failed else []
    if not failed_ranks:
        return
    mine = "; ".join(str(e) for e in errors) if errors else None
    messages = comm.all_gather_object(mine) if comm.world_size > 1 else [mine]
    text = " | ".join(m for m in messages if m)
    first = errors[0] if errors else None
    if first is None:
        text = f"rank {comm.rank} applied all its layers, but: {text}"
    raise ChecksumMismatchError(
        text,
        layer=first.layer if first else None,
        peer=first.peer if first else None,
        expert=first.expert if first else None,
    )


def _mark(device: torch.device):
    """A point in time on ``device``'s current stream (CUDA event) or on the host clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()


def _elapsed(marks: list) -> list[float]:
    """Seconds between consecutive :func:`_mark` points (waits for the last CUDA event)."""
    if marks and isinstance(marks[0], torch.cuda.Event):
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    return [b - a for a, b in zip(marks, marks[1:])]


def rearrange_expert_weights_inplace(
    old_global_expert_indices: ExpertMap,
    new_global_expert_indices: ExpertMap,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    ep_group: EPGroup = None,
    *,
    max_buffer_bytes: int | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
    verify: bool = False,
    atomic: bool = True,
    log_traffic: bool = False,
    rank_mapping: RankMapping | None = None,
    rounds: bool | str | None = None,
    ranks_per_node: int | None = None,
    staging=None,
    transport: str = "auto",
) -> TransferStats:
    """Rearrange this rank's expert weights in place so every row holds its new expert.

    Args:
        old_global_expert_indices: ``(num_layers, num_physical)`` (or ``(num_physical,)``)
            map of the current placement, torch tensor or numpy array; ``-1`` = empty slot.
        new_global_expert_indices: the target placement, same shape.
        expert_weights: ``expert_weights[layer][i]`` is a tensor ``(num_local, ...)`` of any
            dtype with contiguous rows; all on one device (CPU for gloo, CUDA for NCCL).
        ep_group: the EP process group (default: the world group; none initialised = a
            single rank).
        max_buffer_bytes: staging memory bound per rank (default: one layer's local weights,
            packed, or two experts where a rank holds one: enough for every valid pair of
            maps); a layer that needs more runs in rounds. A budget too small for some layer
            raises ValueError stating the smallest budget that works.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for pack/unpack/copy.
        timeout_s: the longest any wait on peers may take (each exchange, the input
            agreement and the final confirmation); ``None`` = the process group's timeout.
            When a peer dies or stalls, every surviving rank raises :class:`PeerError`
            naming the layer (if any) and the peer within about ``timeout_s`` (up to twice
            that when the failure cascades through a rank that was itself waiting).
        verify: send a checksum with every expert and check it before writing; a mismatch
            leaves that layer old on the receiving rank and raises
            :class:`ChecksumMismatchError` on every rank after all layers were exchanged.
            Costs one checksum pass over the sent and the received bytes and 8 bytes per
            expert on the wire (trailer padded to 16 per peer).
        atomic: keep an undo copy for layers that run in several rounds, so a failure rolls
            the layer back (memory: the rows written by all rounds but the last, at most one
            layer's local rows, on the weights' device, on top of ``max_buffer_bytes``;
            reported as ``peak_undo_bytes``). Single-round layers need no copy. With
            ``atomic=False`` such layers may be left half-applied by a failure.
        log_traffic: log this rank's per-peer bytes at INFO on logger ``eplb_triton.transfer``
            (otherwise at DEBUG).
        rank_mapping: elastic EP, old rank -> new rank (``-1`` = removed); the maps then
            have different EP sizes. Scale-down runs on the old (larger) group and removed
            ranks only send; scale-up runs on the new group and new ranks only receive.
            See :func:`eplb_triton.plan.normalize_elastic_maps`.
        rounds: ``None`` (default): each round exchanges with every peer at once (one
            isend + one irecv per peer). ``True`` or ``"pair"`` / ``"expert"``: the exchange
            is split into the planner's network rounds (:func:`eplb_triton.plan.network_rounds`),
            in which every rank sends to at most one peer and receives from at most one, run
            one after the other (``"pair"``: whole per-peer messages, fewest rounds;
            ``"expert"``: one expert per rank and round). Bytes moved and results are the
            same; all reads of a round still precede its writes. Same value on every rank.
        ranks_per_node: ranks per node; a sender on the receiver's node is preferred (see
            :func:`eplb_triton.plan.plan_rearrangement`). Same value on every rank.
        staging: a buffer the caller already holds (a runtime's scratch buffer, or
            :func:`reserve`'s result): one contiguous tensor or a list of tensors (the
            largest contiguous one is used). The staging then lives in it and its bytes cap
            ``max_buffer_bytes``, so no staging memory is allocated; with ``atomic`` the
            undo copy (layers that need several rounds) is taken from what the staging
            leaves free, else allocated. Its contents are overwritten.
        transport: ``"nccl"``: the EP group's own isend/irecv (NCCL on GPUs, gloo on CPU).
            ``"p2p"``: every rank maps the others' symmetric staging buffer and pulls its
            messages with the copy engines over NVLink (:mod:`eplb_triton.p2p`; a NCCL group
            on one node; the staging then lives in that buffer, cached per group and device
            until :func:`eplb_triton.p2p.release_cached`). ``"auto"`` (default): ``"nccl"``,
            or ``"p2p"`` when ``EPLB_TRITON_TRANSPORT=p2p`` and it can work. Same on every
            rank; ``"p2p"`` where it cannot work raises ``ValueError`` on every rank.

    Returns:
        This rank's :class:`TransferStats`.

    Raises:
        ValueError, TypeError: bad input, raised on every rank before any weight is touched.
        PeerError: a peer failed or missed ``timeout_s``; the process group must be
            re-created. Each layer on each rank is entirely old or entirely new.
        ChecksumMismatchError: ``verify`` failed somewhere (the group is still usable).
    """
    comm = Communicator.from_group(ep_group)
    layers = prepare_layers(
        old_global_expert_indices,
        new_global_expert_indices,
        expert_weights,
        comm,
        max_buffer_bytes,
        rank_mapping=rank_mapping,
        verify=verify,
        timeout_s=timeout_s,
        rounds=rounds,
        ranks_per_node=ranks_per_node,
        staging=staging,
        transport=transport,
    )
    stats = TransferStats.empty(comm.rank, comm.world_size)
    if not layers:
        return stats
    device = layers[0].layout.device
    upload_rows([work for layer in layers for work in layer.rounds], device)
    peak = max(layer.staging_bytes for layer in layers)
    given = None if staging is None else staging_view(staging, device)  # validated by prepare_layers
    p2p = None  # agreed by prepare_layers; the plan (hence has_network) is the same on every rank
    if resolve_transport(transport, comm, device) == "p2p" and any(layer.has_network for layer in layers):
        p2p = acquire_p2p(comm, device, peak, timeout_s=timeout_s)  # collective
        staging = p2p.buffer  # the rounds' staging: peers read the sends from it
    else:
        staging = given[:peak] if given is not None else torch.empty(peak, dtype=torch.uint8, device=device)
    stats.peak_staging_bytes = peak
    undo = None
    if atomic:
        undo_bytes = max(layer.undo_bytes for layer in layers)
        if undo_bytes and given is not None and given.numel() - peak >= undo_bytes:
            undo = given[peak : peak + undo_bytes]
        elif undo_bytes:
            undo = torch.empty(undo_bytes, dtype=torch.uint8, device=device)
        stats.peak_undo_bytes = undo_bytes
    errors: list[ChecksumMismatchError] = []
    # Layer times: CUDA events on GPUs (the host queues layer after layer without waiting for
    # the device; a per-layer synchronize stalled the queue), host clocks elsewhere.
    marks = [_mark(device)]
    for layer in layers:
        try:
            layer.run(staging, comm, backend, stats, timeout_s=timeout_s, undo=undo, transport=p2p)
        except ChecksumMismatchError as exc:
            errors.append(exc)  # exchanges completed: carry on, report after the confirmation
            stats.failed_layers.append(layer.index)
        except TransferError as exc:
            stats.failed_layers.extend(range(layer.index, len(layers)))
            logger.error("rank %d: rearrangement stopped at layer %d: %s", comm.rank, layer.index, exc)
            exc.stats = stats  # which layers are new on this rank: those not in failed_layers
            raise
        marks.append(_mark(device))
    try:  # the confirmation waits for the layers anyway: read their times after it, not before
        finish_transfer(comm, layers, stats, errors, timeout_s=timeout_s)
    except ChecksumMismatchError as exc:  # every exchange completed: the times can be read
        stats.layer_times_s = _elapsed(marks)
        exc.stats = stats
        raise
    except TransferError as exc:  # a peer failed: the stream may never reach the last mark
        exc.stats = stats
        raise
    stats.layer_times_s = _elapsed(marks)
    for layer, seconds in zip(layers, stats.layer_times_s):
        logger.debug("rank %d layer %d: %d rounds in %.6f s", comm.rank, layer.index, len(layer.rounds), seconds)
    logger.log(logging.INFO if log_traffic else logging.DEBUG, "%s", stats.traffic_summary())
    return stats

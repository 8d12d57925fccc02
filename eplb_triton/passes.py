"""One staging pass of one layer on one rank: its rows, its staging layout and message format.

(Over 400 lines: one class whose operations all read the same staging layout and wire format.)

A layer that does not fit in ``max_buffer_bytes`` runs in several staging passes
(:mod:`eplb_triton.schedule`); :class:`PassWork` holds one pass's per-rank work: the rows it
sends, receives and moves, where each lies in the staging, how the per-peer messages are cut
into batches on the wire, and the pack / post / verify / write steps the executor calls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .checksum import CHECKSUM_BYTES, expert_checksums, trailer_bytes
from .comm import Communicator
from .layout import ExpertLayout, index_flat, move_pair
from .plan import RankPlan
from .schedule import direct_local_moves
from .stats import TransferStats

__all__ = ["PassWork", "upload_rows"]


def upload_rows(works: Sequence["PassWork"], device: torch.device) -> None:
    """Every row list of ``works`` to ``device`` in one pinned copy (one per call rather than
    one per pass). Each pass gets its lists as views of that one tensor, made when first asked
    for (:class:`_RowViews`): a view costs ~2-3 us of host time on the H200 hosts and a pass
    launches with two of its eight lists in the usual case."""
    flat, starts = index_flat([a for work in works for a in work._row_lists()], device)
    width = len(_ROW_LISTS)
    for i, work in enumerate(works):  # ~1 us per pass: the spans are looked up when a view is made
        work._device_rows = _RowViews(flat, starts, i * width)


def _run_first(rows: np.ndarray, what: str = "") -> int:
    """The first of ``rows`` when they are consecutive ascending rows, else -1 (``what`` set:
    they must be: the plan said so)."""
    first = int(rows[0]) if rows.size else -1
    if rows.size and int(rows[-1]) - first == rows.size - 1 and (rows.size < 3 or bool(np.all(np.diff(rows) == 1))):
        return first
    if what:
        raise AssertionError(f"{what} rows {rows.tolist()} are not one run of consecutive rows")
    return -1


def _send_run(sends: list[tuple[int, int, int]]) -> tuple[int, int]:
    """``(first, stop)`` in experts of the send region: one batch's sends ``(peer, first,
    count)``, one contiguous run that one launch packs."""
    return sends[0][1], sends[-1][1] + sends[-1][2]


class _RowViews(dict):
    """A pass's row lists on the device, by name: views of one uploaded tensor, each made on
    first use (``rows[name]``). ``starts[base + k]`` is where list ``k`` of :data:`_ROW_LISTS`
    begins in ``flat``."""

    def __init__(self, flat: torch.Tensor, starts: list[int], base: int):
        super().__init__()
        self._flat, self._starts, self._base = flat, starts, base

    def __missing__(self, name: str) -> torch.Tensor:
        first, last = _ROW_SPANS[name]
        view = self[name] = self._flat[self._starts[self._base + first] : self._starts[self._base + last]]
        return view


_ROW_LISTS = ("send", "local_src", "local_dst", "recv", "dup_src", "dup_dst", "direct_src", "direct_dst")  # in this order in memory
#: name -> (first list, one past the last) in :data:`_ROW_LISTS`; the pairs are one run of memory
#: (send + local sources, local destinations + receives): one launch each
_ROW_SPANS = {name: (k, k + 1) for k, name in enumerate(_ROW_LISTS)} | {"send+local_src": (0, 2), "local_dst+recv": (2, 4)}


def _wire_order(rows_by_peer: dict[int, np.ndarray], peers: list[int], chunk: int | None) -> np.ndarray:
    """Rows of every peer's message in wire order: peer by peer, or piece by piece (``chunk``
    experts of each peer per piece) when messages are split."""
    if not peers:
        return np.zeros(0, dtype=np.int64)
    if chunk is None and len(peers) == 1:  # one peer (world 2): its rows as they are, no copy
        return np.asarray(rows_by_peer[peers[0]], dtype=np.int64)
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
class PassWork:
    """One staging pass of one layer on one rank, with its staging slices.

    Staging layout of a pass (bytes)::

        | sends, peer by peer | local scratch | receives, peer by peer |
        | receives, peer by peer | local scratch |        (a direct or pushed pass: no sends staged)

    (sends and the staged local moves' sources are packed by one launch, those local moves and
    the receives unpacked by one; a pass that is a whole layer copies its other local moves row
    to row, ``direct_src_rows -> direct_dst_rows``, first when it is written)

    Each peer's message is its packed experts (``count * expert_bytes``); with ``verify`` it
    is followed by a trailer of one int64 checksum per expert padded to 16 bytes
    (:func:`~eplb_triton.checksum.trailer_bytes`), so a peer still gets one isend and one
    irecv per pass. Without ``verify`` every send row is packed by one launch; with it,
    one launch per peer (the trailers split the buffer).

    Sync-path order (see :meth:`LayerWork.run`): :meth:`post_batches` (or, for framed
    messages, :meth:`pack_local_sources` and :meth:`pack_sends`, then :meth:`exchanges`) only
    *read* rows and start the exchange; after the wait, :meth:`verify_received` checks and
    :meth:`apply` writes rows. So nothing is written before the pass's receives are in.

    Rows listed in the layer's stash are read from the stash, not from the live weights:
    ``stashed_sends`` are positions in ``send_rows`` whose packed expert is copied from stash
    entry ``stashed_send_entries``; local moves from the stash write ``stash_local_dst_rows``
    from entries ``stash_local_entries``. ``local_src_rows``/``local_dst_rows`` are the other
    local moves.

    ``network_rounds`` (``rounds=``; ``None`` = one exchange with every peer): per network round,
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
    network_rounds: list[tuple[int, int, int, int, int, int]] | None = None
    chunk_experts: int | None = None
    #: local moves copied row to row when the pass is written, before the received rows
    #: land (:func:`~eplb_triton.schedule.direct_local_moves`); they take no staging
    direct_src_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    direct_dst_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _device_rows: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _batches: list | None = field(default=None, repr=False)
    _totals: tuple[int, int] | None = field(default=None, repr=False)  # bytes of all sends, of all receives
    _views: tuple | None = field(default=None, repr=False)  # (staging key, its three regions)
    _messages: tuple | None = field(default=None, repr=False)  # (buffers key, sends, receives, op labels)
    #: the pass's (ep, ep) expert counts, every rank's sends (set by prepare_layers): where
    #: the p2p transport finds each peer's message (:func:`eplb_triton.p2p.message_spans`)
    pass_traffic: np.ndarray | None = field(default=None, repr=False)
    #: messages sent straight from the weights (see :meth:`from_view`): the first row of each
    #: send peer's run; each receive peer's first destination row when they are consecutive, else -1
    direct_send_first: list[int] | None = None
    direct_recv_first: list[int] | None = None
    #: the p2p transport's pack kernel writes the sends straight into the receivers' slots
    pushed: bool = False

    @classmethod
    def from_view(
        cls,
        view: RankPlan,
        expert_bytes: int,
        stash_rows: np.ndarray | None = None,
        *,
        verify: bool = False,
        network_rounds: list[tuple[int, int, int, int, int, int]] | None = None,
        chunk_experts: int | None = None,
        direct_local: bool = False,
        direct_sends: bool = False,
        pushed: bool = False,
    ) -> "PassWork":
        """``chunk_experts``: split every per-peer message into pieces of that many experts,
        exchanged as separate batches (the wire order becomes piece-major, see :meth:`batches`);
        ``None`` = whole messages. Only without ``verify`` and ``network_rounds``.
        ``direct_local``: the pass is the whole layer (one pass, no stash), so local moves whose
        source no local move writes are copied row to row instead of staged.
        ``direct_sends``: every sender's rows for each receiver are one run of consecutive rows
        (:func:`~eplb_triton.plan.sends_one_run`, the same on every rank) and the tensors have
        dense rows: each message goes out as one slice of each tensor's rows, nothing packed, and
        arrives tensor by tensor (the rows of tensor 0, then of tensor 1...: :meth:`apply`); the
        pass then takes no staging for its sends. Whole messages, no ``verify``, planner rounds
        or stash.
        ``pushed`` (the p2p transport): the sender's pack kernel writes each message straight
        into its receiver's slot (:meth:`~eplb_triton.p2p._PassExchange.push_packed`), so the
        pass takes no staging for its sends either; messages packed as usual. Same limits."""
        if chunk_experts is not None and (verify or network_rounds is not None or chunk_experts < 1):
            raise ValueError("chunk_experts needs verify=False, no planner rounds and a value >= 1")
        if (direct_sends or pushed) and (
            chunk_experts is not None or verify or network_rounds is not None or (stash_rows is not None and stash_rows.size)
        ):
            raise ValueError("direct_sends and pushed need whole messages: no chunk_experts, verify, planner rounds or stash")
        if direct_sends and pushed:
            raise ValueError("a pass is sent straight from the weights (direct_sends) or pushed packed, not both")
        send_peers = sorted(view.send_rows)
        recv_peers = sorted(view.recv_rows)
        send_rows = _wire_order(view.send_rows, send_peers, chunk_experts)
        stash_rows = np.zeros(0, dtype=np.int64) if stash_rows is None else stash_rows
        if view.dup_dst_rows.size and np.intersect1d(view.dup_src_rows, view.dup_dst_rows).size:
            raise AssertionError("a duplicate fill writes a row another duplicate fill reads")  # the copy launch relies on it
        none = np.zeros(0, dtype=np.int64)
        local_src, local_dst = view.local_src_rows, view.local_dst_rows
        stashed_sends = stashed_send_entries = stash_local_entries = stash_local_dst = none
        direct_src = direct_dst = none
        if direct_local and local_src.size:
            if stash_rows.size:
                raise ValueError("direct local moves need a pass without stash (the whole layer in one pass)")
            direct = direct_local_moves(local_src, local_dst)  # the rule the schedule counted with
            direct_src, direct_dst = local_src[direct], local_dst[direct]
            local_src, local_dst = local_src[~direct], local_dst[~direct]
        if stash_rows.size:  # rows an earlier pass may have overwritten are read from the stash
            send_stashed = np.isin(send_rows, stash_rows)
            local_stashed = np.isin(view.local_src_rows, stash_rows)
            local_src, local_dst = view.local_src_rows[~local_stashed], view.local_dst_rows[~local_stashed]
            stashed_sends = np.flatnonzero(send_stashed)
            stashed_send_entries = np.searchsorted(stash_rows, send_rows[send_stashed])
            stash_local_entries = np.searchsorted(stash_rows, view.local_src_rows[local_stashed])
            stash_local_dst = view.local_dst_rows[local_stashed]
        direct_send_first = direct_recv_first = None
        if direct_sends:
            direct_send_first = [_run_first(view.send_rows[p], "send") for p in send_peers]
            direct_recv_first = [_run_first(view.recv_rows[p]) for p in recv_peers]
        return cls(
            pushed=pushed,
            direct_send_first=direct_send_first,
            direct_recv_first=direct_recv_first,
            view=view,
            expert_bytes=expert_bytes,
            send_peers=send_peers,
            send_counts=[len(view.send_rows[p]) for p in send_peers],
            recv_peers=recv_peers,
            recv_counts=[len(view.recv_rows[p]) for p in recv_peers],
            send_rows=send_rows,
            recv_rows=_wire_order(view.recv_rows, recv_peers, chunk_experts),
            local_src_rows=local_src,
            local_dst_rows=local_dst,
            stashed_sends=stashed_sends,
            stashed_send_entries=stashed_send_entries,
            stash_local_entries=stash_local_entries,
            stash_local_dst_rows=stash_local_dst,
            verify=verify,
            network_rounds=network_rounds,
            chunk_experts=chunk_experts,
            direct_src_rows=direct_src,
            direct_dst_rows=direct_dst,
        )

    # -- wire order -------------------------------------------------------------------------
    def batches(self) -> list[tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]]:
        """The exchanges of this pass without ``verify``/``network_rounds``, in order: per batch,
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

    def pack_spans(self) -> list[tuple[int, int]]:
        """``(first, count)`` in experts of the send region, per pack launch that
        :meth:`post_batches` makes without local sources: the whole region for whole messages,
        else one run per batch that sends (the worker loads these kernels ahead: see
        ``StagingMixin._load_kernels``)."""
        if not self.send_rows.size:
            return []
        if self.chunk_experts is None:
            return [(0, int(self.send_rows.size))]
        return [(first, stop - first) for first, stop in (_send_run(sends) for sends, _ in self.batches() if sends)]

    def release(self) -> None:
        """Drop the device row lists once the pass's launches are queued (the caching
        allocator reuses their memory only behind those launches on the same stream)."""
        self._device_rows = None
        self._views = None
        self._messages = None

    def _row_lists(self) -> tuple[np.ndarray, ...]:
        """The lists :data:`_ROW_LISTS` names, in its order (so sends and local sources are one
        run of memory, packed by one launch; local destinations and receives too, unpacked by one)."""
        view = self.view
        return (
            self.send_rows, self.local_src_rows, self.local_dst_rows, self.recv_rows, view.dup_src_rows, view.dup_dst_rows,
            self.direct_src_rows, self.direct_dst_rows,
        )

    def device_rows(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every row list this pass launches with, on ``device`` (uploaded by :func:`upload_rows`
        for a whole call, or here for this pass alone)."""
        if self._device_rows is None:
            upload_rows([self], device)
        return self._device_rows

    def _message_bytes(self, count: int) -> int:
        return count * self.expert_bytes + (trailer_bytes(count) if self.verify else 0)

    def _message_totals(self) -> tuple[int, int]:
        """Bytes of all sends and of all receives (computed once: asked several times a layer)."""
        if self._totals is None:
            self._totals = (sum(map(self._message_bytes, self.send_counts)), sum(map(self._message_bytes, self.recv_counts)))
        return self._totals

    @property
    def direct(self) -> bool:
        """Whether the messages go straight from and to the weights' tensors (:meth:`from_view`)."""
        return self.direct_send_first is not None

    @property
    def receives_first(self) -> bool:
        """No staging for the sends (:attr:`direct` or :attr:`pushed`): the staging holds the
        receives from its start, where a p2p sender finds them (:func:`eplb_triton.p2p.receive_spans`)."""
        return self.pushed or self.direct

    @property
    def _sends_bytes(self) -> int:
        """Staging bytes of the sends (none when they go straight from the weights or are pushed)."""
        return 0 if self.receives_first else self._message_totals()[0]

    @property
    def _recvs_bytes(self) -> int:
        return self._message_totals()[1]

    @property
    def staging_bytes(self) -> int:
        return self._sends_bytes + self._recvs_bytes + self.local_dst_rows.size * self.expert_bytes

    @property
    def written_rows(self) -> np.ndarray:
        """Rows this pass writes on this rank (distinct): received, local moves, duplicate fills."""
        view = self.view
        return np.concatenate([self.recv_rows, view.local_dst_rows, view.dup_dst_rows]).astype(np.int64)

    def _slices(self, staging: torch.Tensor):
        """``(sends, receives, local scratch)`` regions of ``staging`` (laid out sends, scratch,
        receives; a direct or pushed pass: receives, scratch, so every rank's receives start its
        slot and a p2p sender finds where its message lands from the plan alone).
        The last staging's views are kept: a layer asks for them several times (~8 us each)."""
        key = (staging.data_ptr(), staging.numel())
        if self._views is None or self._views[0] != key:
            scratch_bytes = self.local_dst_rows.size * self.expert_bytes
            if self.receives_first:
                recvs_end = self._recvs_bytes
                views = staging[:0], staging[:recvs_end], staging[recvs_end : recvs_end + scratch_bytes]
            else:
                sends_end = self._sends_bytes
                scratch_end = sends_end + scratch_bytes
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
        trailer; ``network_rounds``: one exchange per network round), rather than the batches of :meth:`post_batches`."""
        return self.verify or self.network_rounds is not None

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
        """``(sends, recvs)`` by peer of each framed exchange of this pass, in order: every
        peer's whole message at once, or (``network_rounds``) one slice to and from at most one peer each."""
        sends, recvs = self.send_messages(staging), self.recv_messages(staging)
        if self.network_rounds is None:
            return [(sends, recvs)]
        counts = dict(zip(self.send_peers, self.send_counts))
        recv_counts = dict(zip(self.recv_peers, self.recv_counts))
        out = []
        for send_peer, a, b, recv_peer, c, d in self.network_rounds:
            part_sends = {send_peer: self._part(sends[send_peer], a, b, counts[send_peer])} if send_peer >= 0 else {}
            part_recvs = {recv_peer: self._part(recvs[recv_peer], c, d, recv_counts[recv_peer])} if recv_peer >= 0 else {}
            out.append((part_sends, part_recvs))
        return out

    # -- pack, post, write ---------------------------------------------------------------
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
        if self.chunk_experts is None and pack and (stash is None or not self.stashed_sends.size):
            return self._post_whole(layout, send_buf, recv_buf, comm, backend, local_buf, launch_lock, where)
        eb, device_rows = self.expert_bytes, self.device_rows(layout.device)
        batches = self.batches()
        with_sends = pack and len(batches) == 1 and (stash is None or not self.stashed_sends.size)
        if self._pack_local_sources(layout, send_buf, local_buf, backend, launch_lock, with_sends=with_sends):
            pack = False  # the sends are packed too
        requests, labels, ops = [], [], []
        for sends, recvs in batches:
            if sends and pack:
                first, stop = _send_run(sends)
                with launch_lock:
                    layout.move("pack", send_buf[first * eb : stop * eb], src_rows=device_rows["send"][first:stop], backend=backend)
                if stash is not None and self.stashed_sends.size:  # the blocking path: rows its earlier passes overwrote
                    mine = (self.stashed_sends >= first) & (self.stashed_sends < stop)
                    self._from_stash(send_buf, self.stashed_sends[mine], self.stashed_send_entries[mine], stash)
            out = {peer: send_buf[f * eb : (f + n) * eb] for peer, f, n in sends}
            into = {peer: recv_buf[f * eb : (f + n) * eb] for peer, f, n in recvs}
            requests += comm.exchange(out, into, where=where)
            labels += Communicator.op_labels(out, into)
            ops.append(len(out) + len(into))
        return requests, labels, ops

    def _pack_local_sources(self, layout, send_buf, local_buf, backend, launch_lock, *, with_sends: bool) -> bool:
        """Pack the local moves' sources into ``local_buf`` (if any); ``with_sends``: when
        ``local_buf`` directly follows ``send_buf``, the sends too, in the same launch. Returns
        whether the sends were packed."""
        if local_buf is None or not self.local_src_rows.size:
            return False
        rows, eb = self.device_rows(layout.device), self.expert_bytes
        if with_sends and local_buf.data_ptr() == send_buf.data_ptr() + self.send_rows.size * eb:
            both = send_buf.as_strided((self.send_rows.size * eb + local_buf.numel(),), (1,))
            with launch_lock:
                layout.move("pack", both, src_rows=rows["send+local_src"], backend=backend)
            return True
        with launch_lock:
            layout.move("pack", local_buf, src_rows=rows["local_src"], backend=backend)
        return False

    def _post_whole(self, layout, send_buf, recv_buf, comm, backend, local_buf, launch_lock, where):
        """:meth:`post_batches` of whole messages (one batch), the usual case, with less host
        work per layer: no slicing of whole regions, the per-peer views and op labels made once
        per staging buffer."""
        if self.direct:
            return self._post_direct(layout, recv_buf, comm, backend, local_buf, launch_lock, where)
        if self.pushed:
            return self._post_pushed(layout, recv_buf, comm, backend, local_buf, launch_lock, where)
        packed = self._pack_local_sources(layout, send_buf, local_buf, backend, launch_lock, with_sends=True)
        if not packed and self.send_rows.size:
            with launch_lock:
                layout.move("pack", send_buf, src_rows=self.device_rows(layout.device)["send"], backend=backend)
        key = (send_buf.data_ptr(), recv_buf.data_ptr())
        if self._messages is None or self._messages[0] != key:
            out = self._per_peer(send_buf, self.send_peers, self.send_counts)
            into = self._per_peer(recv_buf, self.recv_peers, self.recv_counts)
            self._messages = (key, out, into, Communicator.op_labels(out, into))
        _, out, into, labels = self._messages
        return comm.exchange(out, into, where=where), labels, [len(labels)]

    def _post_direct(self, layout, recv_buf, comm, backend, local_buf, launch_lock, where):
        """:meth:`_post_whole` of messages sent straight from the weights: per peer, one slice of
        each tensor's rows goes out, and each received message lands tensor by tensor in its
        region of ``recv_buf`` (read back by :meth:`_apply_direct`)."""
        self._pack_local_sources(layout, recv_buf, local_buf, backend, launch_lock, with_sends=False)
        key = (recv_buf.data_ptr(), id(layout.tensors[0]))
        if self._messages is None or self._messages[0] != key:
            out = {
                peer: layout.rows_by_tensor(first, count)
                for peer, first, count in zip(self.send_peers, self.direct_send_first, self.send_counts)
            }
            into = {peer: layout.parts_by_tensor(message, count) for (peer, message), count in zip(
                self._per_peer(recv_buf, self.recv_peers, self.recv_counts).items(), self.recv_counts)}
            self._messages = (key, out, into, Communicator.op_labels(out, into))
        _, out, into, labels = self._messages
        return comm.exchange(out, into, where=where), labels, [len(labels)]

    def _post_pushed(self, layout, recv_buf, mover, backend, local_buf, launch_lock, where):
        """:meth:`_post_whole` of a pushed pass: the local moves' sources packed into the scratch,
        then ``mover`` (a p2p exchange) packs each peer's rows into that peer's slot."""
        self._pack_local_sources(layout, recv_buf, local_buf, backend, launch_lock, with_sends=False)
        if self._messages is None or self._messages[0] != recv_buf.data_ptr():
            into = self._per_peer(recv_buf, self.recv_peers, self.recv_counts)
            self._messages = (recv_buf.data_ptr(), None, into, Communicator.op_labels(dict.fromkeys(self.send_peers), into))
        _, _, into, labels = self._messages
        with launch_lock:
            requests = mover.push_packed(layout, self, into, backend, where=where)
        return requests, labels, [len(labels)]

    def _apply_direct(self, layout: ExpertLayout, recv_buf: torch.Tensor) -> None:
        """Write the received rows of direct messages, peer by peer (:meth:`ExpertLayout.unpack_by_tensor`:
        one copy per tensor into consecutive destination rows, else one ``index_copy_``)."""
        rows, at = self.device_rows(layout.device)["recv"], 0
        for message, count, first in zip(
            self._per_peer(recv_buf, self.recv_peers, self.recv_counts).values(), self.recv_counts, self.direct_recv_first
        ):
            layout.unpack_by_tensor(message, rows[at : at + count], first)
            at += count

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

    def pack_local_sources(self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None) -> None:
        """Copy the old rows that local moves read into scratch (reads rows only)."""
        if self.local_src_rows.size:
            rows = self.device_rows(layout.device)["local_src"]
            layout.move("pack", self._slices(staging)[2], src_rows=rows, backend=backend)

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
        self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None, stash: torch.Tensor | None = None,
        *, pack_beside: tuple | None = None,
    ) -> bool:
        """Write the pass: direct local moves, staged local moves, moves from the stash, received
        rows, then duplicate fills.

        ``pack_beside``: ``(layout, packed region, source rows)`` of another layer's pack, which
        writes none of the memory this pass reads or writes; it is launched with this pass's
        receive unpack where that is one launch (:func:`~eplb_triton.layout.move_pair`). Returns
        whether it was (else the caller launches it)."""
        if self.direct_dst_rows.size:  # first: their sources may be overwritten by the writes below
            rows = self.device_rows(layout.device)
            layout.move("copy", None, src_rows=rows["direct_src"], dst_rows=rows["direct_dst"], backend=backend)
        if not self.verify and not self.receives_first and self.local_dst_rows.size and self.recv_rows.size:
            # scratch and receives are adjacent: one launch writes both (distinct rows)
            _, recvs, scratch = self._slices(staging)
            both = scratch.as_strided((scratch.numel() + recvs.numel(),), (1,))
            layout.move("unpack", both, dst_rows=self.device_rows(layout.device)["local_dst+recv"], backend=backend)
            self._local_from_stash(layout, stash, backend)
            self._fill_duplicates(layout, backend)
            return False
        if self.local_dst_rows.size:
            rows = self.device_rows(layout.device)["local_dst"]
            layout.move("unpack", self._slices(staging)[2], dst_rows=rows, backend=backend)
        self._local_from_stash(layout, stash, backend)
        if self.direct:  # received tensor by tensor
            self._apply_direct(layout, self._slices(staging)[1])
            self._fill_duplicates(layout, backend)
            return False
        return self.apply_received(layout, staging, backend, pack_beside=pack_beside)

    def _local_from_stash(self, layout: ExpertLayout, stash: torch.Tensor | None, backend: str | None) -> None:
        if self.stash_local_dst_rows.size:
            eb = self.expert_bytes
            entries = torch.as_tensor(self.stash_local_entries, device=stash.device)
            layout.unpack(stash.view(-1, eb)[entries].reshape(-1), self.stash_local_dst_rows, backend=backend)

    def apply_received(
        self, layout: ExpertLayout, staging: torch.Tensor, backend: str | None, *, pack_beside: tuple | None = None
    ) -> bool:
        """Unpack received rows, then duplicate fills (the end of :meth:`apply`, which says
        what ``pack_beside`` is; returns whether it was launched)."""
        view, rows = self.view, self.device_rows(layout.device)
        paired = False
        if self.recv_rows.size and not self.verify:
            if pack_beside is not None:  # one launch: this unpack and another layer's pack
                other, region, src_rows = pack_beside
                move_pair(layout, "unpack", self._slices(staging)[1], rows["recv"], other, "pack", region, src_rows, backend)
                paired = True
            else:
                layout.move("unpack", self._slices(staging)[1], dst_rows=rows["recv"], backend=backend)  # one launch, all peers
        elif self.recv_rows.size:
            for peer, message in self.recv_messages(staging).items():
                peer_rows = view.recv_rows[peer]
                layout.unpack(self._split(message, len(peer_rows))[0], peer_rows, backend=backend)
        self._fill_duplicates(layout, backend)
        return paired

    def _fill_duplicates(self, layout: ExpertLayout, backend: str | None) -> None:
        if self.view.dup_dst_rows.size:
            rows = self.device_rows(layout.device)
            layout.move("copy", None, src_rows=rows["dup_src"], dst_rows=rows["dup_dst"], backend=backend)

    def count_into(self, stats: TransferStats, ops: int, *, batches: Sequence[int] | None = None) -> None:
        """Add this pass to ``stats``; ``batches``: ops of each exchange issued (default: one
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

"""Communication: one batched isend/irecv per peer over ``torch.distributed``, and agreement.

(Over 400 lines: one class; each backend's deadline handling needs its own comments.)

NCCL on GPUs, gloo on CPU. Peers are ranks *of the EP group*; they are translated to global
ranks for ``torch.distributed``. Ops are issued in a deterministic order (ascending peer,
receive before send) so that every backend pairs them the same way.

Deadlines (``timeout_s``): :meth:`Communicator.wait` bounds how long one exchange may wait
for its peers, independently of the process group's own (usually much longer) timeout.

* gloo: ``Work.wait(timeout)`` on each request with the time left. A gloo timeout (or a
  peer's closed connection) fails every pending op of that rank's gloo context, so after a
  :class:`PeerError` the group must be considered broken and be re-created.
* NCCL (untested here: no GPU in CI): requests are polled with ``is_completed()`` until the
  deadline; on expiry the group's NCCL communicator is aborted (``backend.abort()``) so no
  kernel keeps spinning on a dead peer, and :class:`PeerTimeoutError` is raised. The group
  cannot be used afterwards. When NCCL coalesces a batch into one request the error names
  every peer of the batch.
* other backends: like gloo.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from .errors import ChecksumMismatchError, PeerError, PeerFailedError, PeerTimeoutError, TransferError
from .layout import index_tensor

__all__ = [
    "ChecksumMismatchError",
    "Communicator",
    "PeerError",
    "PeerFailedError",
    "PeerTimeoutError",
    "TransferError",
]

logger = logging.getLogger(__name__)


# Why every gloo collective here ends with _wait_released (found with gdb, torch 2.13): gloo
# runs a collective on its worker thread ("pt_gloo_runloop"), which wakes the caller and only
# then destroys its work object, dropping its references to the tensors. Dropping a C++
# reference to a tensor that has a Python object takes the GIL (TensorImpl::decref_pyobject).
# In about 1 of 3 collectives the caller returns first; if the process is exiting by the
# time the worker gets the GIL (a script that ends right after an input error), Python kills
# the thread inside take_gil, the forced unwind meets a noexcept C++ frame, and the process
# aborts: "terminate called without an active exception". Waiting, with the GIL released,
# until the worker has let go of the tensor closes that window.
_RELEASE_WAIT_S = 0.05  # the worker needs only the GIL: microseconds; never wait longer than this
# A wait with a deadline checks completion on the host; a 0.2 ms sleep between checks overslept
# each layer's completion by ~0.1-0.3 ms (run 70: timeout_s made the 48-layer qwen3 call 1.6x
# slower over NCCL, 2.1x over p2p). It spins (sleep(0): the GIL is let go) this long first.
POLL_SPIN_S = 5e-3
_POLL_SLEEP_S = 2e-4


def poll_pause(waited_s: float) -> None:
    """Pause between two completion checks of a wait that began ``waited_s`` ago."""
    time.sleep(0 if waited_s < POLL_SPIN_S else _POLL_SLEEP_S)
_use_count = getattr(torch.Tensor, "_use_count", None)  # feature check: private, may be absent


def _wait_released(tensor: torch.Tensor, references: int) -> None:
    """Wait (releasing the GIL) until ``tensor`` has ``references`` C++ references again, i.e.
    the backend's worker thread dropped its work object; bounded by ``_RELEASE_WAIT_S``."""
    if _use_count is None:
        time.sleep(0)  # older torch: at least let the worker thread run
        return
    deadline = None
    while _use_count(tensor) > references:
        now = time.monotonic()
        if deadline is None:
            deadline = now + _RELEASE_WAIT_S
        elif now > deadline:
            return
        time.sleep(0 if now < deadline - _RELEASE_WAIT_S / 2 else 1e-4)


Messages = "torch.Tensor | list[torch.Tensor]"  # what exchange() moves to or from one peer


def _parts(message) -> tuple | list:
    """The tensors of one peer's message: one, or a list of them (several ops, in order)."""
    return message if isinstance(message, (list, tuple)) else (message,)


def _request_labels(labels: list | None, count: int) -> tuple[list | None, list[int] | None]:
    """``(labels, batch_peers)`` for ``count`` requests: coalesced (NCCL) requests each cover
    every peer of a batch, so a failure names every peer of the call (at world 2, the peer)."""
    if labels is None or len(labels) == count:
        return labels, None
    peers = sorted({peer for peer, _ in labels})
    return _batch_labels(peers, count), peers


def _batch_labels(peers: list[int], count: int) -> list[tuple[int | None, str]]:
    """Labels of ``count`` coalesced requests covering ``peers``: the peer when there is one."""
    return [(peers[0] if len(peers) == 1 else None, "op")] * count


DIRECT_POST_ENV = "EPLB_TRITON_DIRECT_POST"  # "0": post NCCL groups through batch_isend_irecv
_DIRECT_POST: dict[tuple[int, str], bool] = {}  # (id(group), device) -> the group can coalesce directly


def _direct_post_enabled(group, device: torch.device) -> bool:
    if os.environ.get(DIRECT_POST_ENV, "1") == "0":
        return False
    key = (id(group), str(device))
    known = _DIRECT_POST.get(key)
    if known is None:
        try:
            known = (
                type(group) is dist.ProcessGroup
                and all(hasattr(group, name) for name in ("_start_coalescing", "_end_coalescing", "send", "recv"))
                and bool(group._get_backend(device).supports_coalescing)
            )
        except Exception:  # noqa: BLE001 - an unknown group type: take the public path
            known = False
        _DIRECT_POST[key] = known
    return known


@dataclass
class Communicator:
    """The EP group as seen by one rank. ``group=None`` with no process group = one rank alone."""

    group: object | None
    rank: int
    world_size: int
    dist_backend: str | None  # the torch.distributed backend ("nccl", "gloo"), not the kernel backend

    @classmethod
    def from_group(cls, ep_group=None) -> "Communicator":
        if ep_group is not None and not (dist.is_available() and isinstance(ep_group, dist.ProcessGroup)):
            # before any torch.distributed call: those would report an unrelated problem
            hint = " (a runtime's group wrapper: pass its .device_group)" if hasattr(ep_group, "device_group") else ""
            raise TypeError(
                f"ep_group must be a torch.distributed ProcessGroup or None, got {type(ep_group).__name__} "
                f"({ep_group!r:.60}){hint}"
            )
        if ep_group is None and not (dist.is_available() and dist.is_initialized()):
            return cls(group=None, rank=0, world_size=1, dist_backend=None)
        group = ep_group if ep_group is not None else dist.group.WORLD
        return cls(
            group=group,
            rank=dist.get_rank(group),
            world_size=dist.get_world_size(group),
            dist_backend=str(dist.get_backend(group)).lower(),
        )

    @property
    def collective_device(self) -> torch.device:
        """Where small control tensors live: the current GPU for NCCL, else the CPU."""
        if self.dist_backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def global_rank(self, peer: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return peer
        return dist.get_global_rank(self.group, peer)

    def exchange(self, sends: dict[int, Messages], recvs: dict[int, Messages], *, where: str = "exchange") -> list:
        """Start one irecv and one isend per peer as one batch; returns the requests to wait on.
        A peer's value may also be a list of tensors: that many ops to or from it, in order
        (a message sent straight from the weights, one slice per tensor).

        A backend error while posting (gloo raises at once when a peer's connection is
        already closed) comes back as :class:`PeerFailedError` naming the peer, like errors
        of :meth:`wait`; ``where`` prefixes its message.
        """
        if not sends and not recvs:
            return []
        if self.group is None:
            raise RuntimeError("exchange needs a process group")
        posts = []  # (irecv or isend, tensor, peer in the group), in the order of op_labels
        for peer in sorted(set(sends) | set(recvs)):
            if peer in recvs:
                posts += [(dist.irecv, tensor, peer) for tensor in _parts(recvs[peer])]
            if peer in sends:
                posts += [(dist.isend, tensor, peer) for tensor in _parts(sends[peer])]
        # the group's own backend: a worker's CPU control group says "nccl" for the checks
        # (it speaks for the transfer group) but moves its tensors over gloo
        if self._group_backend() == "nccl":  # coalesced: a posting error has no single peer
            try:
                return self._post_coalesced(posts)
            except Exception as exc:  # noqa: BLE001 - backend errors have no common type
                peers = sorted(set(sends) | set(recvs))
                raise self._peer_error(exc, 0, _batch_labels(peers, 1), where, None, peers) from exc
        # Other backends post op by op anyway (what batch_isend_irecv does without
        # coalescing); doing it here tells which peer's op failed.
        labels = self.op_labels(sends, recvs)
        requests = []
        for index, (fn, tensor, peer) in enumerate(posts):
            try:
                request = fn(tensor, self.global_rank(peer), group=self.group)
            except Exception as exc:  # noqa: BLE001
                raise self._peer_error(exc, index, labels, where, None) from exc
            if request is not None:
                requests.append(request)
        return requests

    def _post_coalesced(self, posts: list) -> list:
        """Post ``(irecv|isend, tensor, peer)`` ops (peers: ranks of the group) as one NCCL
        group; returns its request.

        Straight on the process group (``_start_coalescing``, ``send``/``recv``,
        ``_end_coalescing``: what ``batch_isend_irecv`` does underneath, minus its per-op Python
        checks) where this torch has those methods; ``batch_isend_irecv`` otherwise or when
        ``EPLB_TRITON_DIRECT_POST=0``.
        """
        group, device = self.group, posts[0][1].device
        if not _direct_post_enabled(group, device):
            return dist.batch_isend_irecv([dist.P2POp(fn, t, self.global_rank(p), group) for fn, t, p in posts])
        group._start_coalescing(device)
        for fn, tensor, peer in posts:
            (group.recv if fn is dist.irecv else group.send)([tensor], peer, 0)
        return [group._end_coalescing(device)]

    def _group_backend(self) -> str | None:
        known = self.__dict__.get("_group_backend_name")  # asked once per layer: ~5 us each time
        if known is None:
            try:
                known = str(dist.get_backend(self.group)).lower()
            except (ValueError, RuntimeError, TypeError):  # not a registered group (a test's stand-in)
                known = self.dist_backend
            self.__dict__["_group_backend_name"] = known
        return known

    @staticmethod
    def op_labels(sends: dict, recvs: dict) -> list[tuple[int, str]]:
        """``(peer, "recv"|"send")`` of each op :meth:`exchange` issues, in its order."""
        labels = []
        for peer in sorted(set(sends) | set(recvs)):
            if peer in recvs:
                labels += [(peer, "recv")] * len(_parts(recvs[peer]))
            if peer in sends:
                labels += [(peer, "send")] * len(_parts(sends[peer]))
        return labels

    def wait(
        self,
        requests: list,
        *,
        timeout_s: float | None = None,
        labels: list[tuple[int, str]] | None = None,
        where: str = "exchange",
    ) -> None:
        """Wait for ``requests``; with ``timeout_s``, raise :class:`PeerError` past the deadline.

        ``labels`` (from :meth:`op_labels`) lets the error name the peer; ``where`` prefixes
        its message (e.g. ``"layer 3, pass 1/2"``). Without ``timeout_s`` this is a plain
        wait under the process group's own timeout, but backend errors still come back as
        :class:`PeerFailedError` naming the peer.
        """
        if not requests:
            return
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self.dist_backend == "nccl" and deadline is not None:
            named, batch_peers = _request_labels(labels, len(requests))
            self._poll_until(requests, deadline, named, where, timeout_s, batch_peers)
        for index, request in enumerate(requests):
            try:
                if deadline is None or self.dist_backend == "nccl":
                    request.wait()  # NCCL: complete, or without a deadline: this only orders the current stream
                else:
                    left = max(deadline - time.monotonic(), 1e-3)
                    request.wait(timeout=datetime.timedelta(seconds=left))
            except Exception as exc:  # noqa: BLE001 - backend errors have no common type
                # the labels are put in the requests' terms only here (the usual case never fails)
                named, batch_peers = _request_labels(labels, len(requests))
                raise self._peer_error(exc, index, named, where, timeout_s, batch_peers) from exc

    def _poll_until(self, requests, deadline, labels, where, timeout_s, batch_peers=None) -> None:
        pending = list(range(len(requests)))
        begin = time.monotonic()
        while pending:
            pending = [i for i in pending if not requests[i].is_completed()]
            if not pending:
                return
            if time.monotonic() > deadline:
                self.abort()
                peers = sorted({labels[i][0] for i in pending if labels[i][0] is not None}) if labels else None
                peers = peers or batch_peers
                who = f"peers {peers}" if peers else "its peers"
                raise PeerTimeoutError(
                    f"{where}: rank {self.rank} waited {timeout_s:g} s (timeout_s) for {who}; "
                    "the NCCL communicator was aborted",
                    peer=peers[0] if peers and len(peers) == 1 else None,
                )
            poll_pause(time.monotonic() - begin)

    def _peer_error(self, exc, index, labels, where, timeout_s, batch_peers=None) -> PeerError:
        """``batch_peers``: every peer of a coalesced batch, named when the failing op's own
        peer is unknown."""
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        peer, kind = labels[index] if labels else (None, "op")
        who = f"peer {peer}" if peer is not None else (f"one of peers {batch_peers}" if batch_peers else "a peer")
        # gloo says "Timed out waiting ...ms for recv/send"; later ops of a broken context
        # report "Application timeout caused pair closure".
        timed_out = timeout_s is not None and "timed out" in text.lower()
        if timed_out:
            message = f"{where}: rank {self.rank} got no {kind} completion from {who} within {timeout_s:g} s (timeout_s)"
            error = PeerTimeoutError(message, peer=peer)
        else:
            message = f"{where}: rank {self.rank}: {kind} with {who} failed: {text}"
            error = PeerFailedError(message, peer=peer)
        logger.error("%s", message)
        return error

    def abort(self) -> None:
        """Abort the NCCL communicator of this group (no-op elsewhere); the group is unusable after."""
        if self.dist_backend != "nccl" or self.group is None:
            return
        try:
            self.group._get_backend(torch.device("cuda")).abort()
        except Exception:  # noqa: BLE001 - best effort: we are already failing
            logger.exception("aborting the NCCL communicator failed")

    def confirm(self, failed: bool, *, timeout_s: float | None = None, where: str = "confirmation") -> list[int]:
        """Tell every peer whether this rank failed and learn theirs; returns failed ranks.

        One tiny isend + irecv per peer (``2 * (world_size - 1)`` ops), waited on with
        ``timeout_s``: a rank that died or stalled is named by a :class:`PeerError` on every
        rank that reaches this point, even ranks that never exchanged data with it.
        """
        if self.group is None or self.world_size == 1:
            return [self.rank] if failed else []
        # one tensor holds this rank's flag and every peer's slot: one copy in, one copy out
        # (a copy and a sync per peer cost ~0.1 ms per call on the H200 hosts)
        flags = index_tensor([-1] * self.world_size + [int(failed)], self.collective_device)  # pinned: no wait for queued work
        mine = flags[self.world_size :]
        theirs = {p: flags[p : p + 1] for p in range(self.world_size) if p != self.rank}
        sends = {p: mine for p in theirs}
        requests = self.exchange(sends, theirs, where=where)
        self.wait(requests, timeout_s=timeout_s, labels=self.op_labels(sends, theirs), where=where)
        values = flags.tolist()
        values[self.rank] = int(failed)
        return sorted(p for p in range(self.world_size) if values[p])

    def all_reduce_max(self, values: torch.Tensor, *, timeout_s: float | None = None) -> torch.Tensor:
        """In-place MAX all-reduce. With ``timeout_s`` the collective is polled against a
        deadline and :class:`PeerTimeoutError` (no peer named) is raised on expiry; on gloo its
        worker thread stays blocked until the group's own timeout (the group is broken anyway).
        On CPU (gloo) it returns once gloo's worker thread let go of ``values`` (see
        :func:`_wait_released`), so a process may exit right after."""
        return self._all_reduce_max_start(values, timeout_s=timeout_s)()

    def _all_reduce_max_start(self, values: torch.Tensor, *, timeout_s: float | None = None) -> Callable[[], torch.Tensor]:
        """:meth:`all_reduce_max` posted now; the returned function finishes it (the deadline
        counts from now) and returns ``values``."""
        if self.group is None or self.world_size == 1:
            return lambda: values
        references = _use_count(values) if _use_count is not None else 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            work = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        except Exception as exc:  # noqa: BLE001 - a peer's closed connection, say
            raise PeerFailedError(f"input agreement: rank {self.rank}: {exc}") from exc

        def finish() -> torch.Tensor:
            nonlocal work
            if deadline is not None:
                begin = time.monotonic()
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        self.abort()
                        raise PeerTimeoutError(
                            f"input agreement: rank {self.rank} waited {timeout_s:g} s (timeout_s) for the other ranks"
                        )
                    poll_pause(time.monotonic() - begin)
            try:
                work.wait()
            except Exception as exc:  # noqa: BLE001
                raise PeerFailedError(f"input agreement: rank {self.rank}: {exc}") from exc
            del work
            if values.device.type == "cpu":
                _wait_released(values, references)
            return values

        return finish

    def agree(
        self,
        error: BaseException | None,
        fingerprints: Mapping[str, int] | int = 0,
        *,
        timeout_s: float | None = None,
        describe: Callable[[str], list[str]] | None = None,
    ) -> None:
        """Agree on the input verdict before any weight is touched.

        Every rank calls this with its local verdict (``None`` if fine) and fingerprints of
        the inputs that must match everywhere, by name (e.g. ``{"maps": crc, "weight layouts":
        crc, "options": crc}``; the same names on every rank). If any rank saw an error, every
        rank raises the same exception type (``TypeError`` if any rank's is one, else
        ``ValueError``) carrying every failing rank's message; if a fingerprint differs, every
        rank raises ``ValueError`` naming what differs and on which ranks (the ranks that
        disagree with the most common value), with the first differing item of
        ``describe(name)`` (labelled strings, only computed then) of each rank.

        Costs one small all-reduce when everything agrees. The error paths exchange messages
        with all-reduces that return only once gloo let go of their tensors
        (:meth:`all_reduce_max`), so a process may exit right after the error.
        """
        self.agree_start(error, fingerprints, timeout_s=timeout_s, describe=describe)()

    def agree_start(
        self,
        error: BaseException | None,
        fingerprints: Mapping[str, int] | int = 0,
        *,
        timeout_s: float | None = None,
        describe: Callable[[str], list[str]] | None = None,
    ) -> Callable[[], None]:
        """:meth:`agree` in two halves: post the all-reduce now and return the function that
        finishes it (waits, bounded by ``timeout_s`` from now, and raises as :meth:`agree`
        does). The caller may work in between (``prepare_layers`` plans meanwhile: the
        agreement's ~0.35 ms on the H200 hosts overlaps the planning's ~0.7)."""
        if not isinstance(fingerprints, Mapping):
            fingerprints = {"inputs": int(fingerprints)}
        names = sorted(fingerprints)
        code = 0 if error is None else (2 if isinstance(error, TypeError) else 1)
        values = [int(fingerprints[name]) for name in names]
        # pinned: a pageable copy would first wait for all queued work (planning runs beside it)
        payload = index_tensor([code] + [x for v in values for x in (v, -v)], self.collective_device)
        finish_reduce = self._all_reduce_max_start(payload, timeout_s=timeout_s)

        def finish() -> None:
            self._agree_finish(finish_reduce().cpu().tolist(), error, fingerprints, names, timeout_s, describe)

        return finish

    def _agree_finish(self, reduced: list[int], error, fingerprints, names, timeout_s, describe) -> None:
        worst = reduced[0]
        if worst:
            messages = self.gather_texts(None if error is None else str(error), timeout_s=timeout_s)
            failing = [(r, m) for r, m in enumerate(messages) if m is not None]
            if len({m for _, m in failing}) == 1 and len(failing) == self.world_size:
                text = failing[0][1]  # every rank saw the same problem (a bad global map, say)
            else:
                text = "; ".join(f"rank {r}: {m}" for r, m in failing)
            raise (TypeError if worst == 2 else ValueError)(text)
        differ = [name for i, name in enumerate(names) if reduced[1 + 2 * i] != -reduced[2 + 2 * i]]
        if not differ:
            return
        parts = []
        for name in differ:
            mine = _safe_describe(describe, name)
            mine_text = "\n".join([str(fingerprints[name])] + mine)
            theirs = [t.split("\n") for t in self.gather_texts(mine_text, timeout_s=timeout_s)]
            parts.append(_difference(name, theirs))
        raise ValueError("ranks were given different inputs: " + "; ".join(parts))

    def gather_texts(self, text: str | None, *, timeout_s: float | None = None) -> list[str | None]:
        """Every rank's ``text`` (``None`` stays ``None``); see :meth:`gather_bytes`."""
        raw = self.gather_bytes(None if text is None else text.encode("utf-8", "replace"), timeout_s=timeout_s)
        return [None if r is None else r.decode("utf-8", "replace") for r in raw]

    def gather_bytes(self, data: bytes | None, *, timeout_s: float | None = None) -> list[bytes | None]:
        """Every rank's ``data`` through two all-reduces (lengths, then a ``(world_size,
        longest)`` byte table in which each rank fills its row: MAX of zeros and one rank's
        bytes is that rank's bytes), each bounded by ``timeout_s``.

        All-reduce rather than ``all_gather_object`` on purpose: that one's tensors are
        internal, so nothing can wait until gloo's worker thread let go of them, and a process
        that exits right after may abort (see :func:`_wait_released`); here it can.
        """
        if self.group is None or self.world_size == 1:
            return [data]
        device = self.collective_device
        sizes = torch.zeros(self.world_size, dtype=torch.int64)  # 0: None, else 1 + length
        sizes[self.rank] = 0 if data is None else 1 + len(data)
        lengths = [n - 1 for n in self.all_reduce_max(sizes.to(device), timeout_s=timeout_s).cpu().tolist()]
        table = torch.zeros(self.world_size, max(max(lengths), 1), dtype=torch.uint8)
        if data:
            table[self.rank, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        table = self.all_reduce_max(table.to(device), timeout_s=timeout_s).cpu()
        return [None if n < 0 else bytes(table[r, :n].numpy().tobytes()) for r, n in enumerate(lengths)]

    def all_gather_object(
        self, obj, *, where: str = "gathering the ranks' messages", timeout_s: float | None = None
    ) -> list:
        """``obj`` of every rank (picklable), through :meth:`gather_bytes` (no all-gather); a
        backend error comes back as :class:`PeerFailedError`."""
        if self.group is None or self.world_size == 1:
            return [obj]
        try:
            raw = self.gather_bytes(pickle.dumps(obj), timeout_s=timeout_s)
        except PeerFailedError as exc:
            raise PeerFailedError(f"{where}: {str(exc).replace('input agreement: ', '')}") from exc
        return [pickle.loads(data) for data in raw]


def _safe_describe(describe: Callable[[str], list[str]] | None, name: str) -> list[str]:
    if describe is None:
        return []
    try:
        return [str(item).replace("\n", " ") for item in describe(name)]
    except Exception as exc:  # noqa: BLE001 - only makes the message less precise
        return [f"(could not describe: {type(exc).__name__}: {exc})"]


def _difference(name: str, per_rank: list[list[str]]) -> str:
    """``"<name> differ on rank(s) R: rank r has X where rank q has Y"`` from each rank's
    ``[fingerprint, item, item...]``; the reference is the most common fingerprint."""
    fingerprints = [items[0] for items in per_rank]
    counts = {fp: fingerprints.count(fp) for fp in fingerprints}
    reference = max(counts, key=lambda fp: (counts[fp], -fingerprints.index(fp)))
    ref_rank = fingerprints.index(reference)
    odd = [r for r, fp in enumerate(fingerprints) if fp != reference]
    details = []
    ref_items = per_rank[ref_rank][1:]
    for r in odd:
        items = per_rank[r][1:]
        at = next((i for i, (a, b) in enumerate(zip(items, ref_items)) if a != b), min(len(items), len(ref_items)))
        if at < len(items) or at < len(ref_items):
            have = items[at] if at < len(items) else "(nothing)"
            want = ref_items[at] if at < len(ref_items) else "(nothing)"
            details.append(f"rank {r} has {have} where rank {ref_rank} has {want}")
    same = [r for r, fp in enumerate(fingerprints) if fp == reference]
    text = f"{name} differ on {_ranks_text(odd)} (vs {_ranks_text(same)})"
    return text + (": " + "; ".join(details) if details else "")


def _ranks_text(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)

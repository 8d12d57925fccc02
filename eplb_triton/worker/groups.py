"""Process groups of a worker: the pool, the rendezvous before creating them, rank order.

A worker moves bytes on its own transfer group (so the serving thread may keep using the EP
group) and agrees on a CPU (gloo) control group that its thread never uses. Making groups is
collective and unbounded in torch, so the ranks first meet through the default store
(:func:`_rendezvous`); groups of closed workers are pooled for the next worker.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import threading

import torch
import torch.distributed as dist

from ..comm import Communicator, PeerTimeoutError

log = logging.getLogger("eplb_triton.worker")  # one logger for the package (documented name)


# Process groups of finished workers, by (ranks, backend), for the next worker to reuse.
# Groups made with use_local_synchronization=True are named after their ranks and the number
# of live groups, so destroying one and making another with the same ranks reuses its name and
# its stale rendezvous keys: seen hanging the second worker's constructor at world 4 on gloo.
# Reusing groups avoids both that and a leak of one group per worker.
_GROUP_POOL: dict[tuple[tuple[int, ...], str], list] = {}
_GROUP_POOL_LOCK = threading.Lock()


def _acquire_group(ranks: list[int], backend: str):
    """A process group over ``ranks`` not used by any live worker (collective over ``ranks``
    when a new one must be made; every EP rank takes the same branch as long as workers are
    created and closed alike on all of them)."""
    live = dist.distributed_c10d._world.pg_group_ranks
    with _GROUP_POOL_LOCK:
        for key, groups in _GROUP_POOL.items():  # forget groups destroyed since (e.g. with the default group)
            _GROUP_POOL[key] = [group for group in groups if group in live]
        free = _GROUP_POOL.get((tuple(ranks), backend), [])
        if free:
            return free.pop()
    # Only the EP ranks take part (several EP groups may build workers at once).
    return dist.new_group(ranks, backend=backend, use_local_synchronization=True, **_keep_rank_order(ranks))


def _keep_rank_order(ranks: list[int]) -> dict:
    """``new_group`` keywords that keep ``ranks`` in the EP group's order.

    ``new_group`` sorts ranks, which renumbers a group whose global ranks are not ascending;
    ``sort_ranks=False`` prevents that but only exists in newer torch (torch 2.11 rejects it).
    Ascending ranks (the usual EP group) need nothing.
    """
    if list(ranks) == sorted(ranks):
        return {}
    if "sort_ranks" in inspect.signature(dist.new_group).parameters:
        return {"sort_ranks": False}
    raise ValueError(
        f"the EP group's global ranks {list(ranks)} are not ascending, and this torch's new_group cannot keep "
        "that order (no sort_ranks): pass transfer_group= (same ranks, same order) or use ascending ranks"
    )


def _release_group(group, ranks: tuple[int, ...], backend: str) -> None:
    with _GROUP_POOL_LOCK:
        _GROUP_POOL.setdefault((ranks, backend), []).append(group)


# Constructions of a TransferWorker per EP group, in this process: names each rendezvous.
_RENDEZVOUS_COUNT: dict[tuple[int, str], int] = {}


def _rendezvous(ep: Communicator, timeout_s: float | None) -> None:
    """Wait until every EP rank is constructing a worker, bounded by ``timeout_s``.

    ``new_group`` blocks in the store until every member calls it, ignoring ``timeout_s``;
    so the ranks first meet here, through the default store, before any group is created.
    On expiry nothing was created and this rank withdraws its arrival key (a peer that
    arrives later then times out too instead of going on alone) and raises
    :class:`PeerTimeoutError` naming the ranks that did not arrive. Every rank counts its
    constructions per EP group, so the n-th construction of each rank meet (when every rank
    gave up on the same one, the next ones still meet).
    """
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no default store: group creation stays unbounded
        return
    name = getattr(ep.group, "group_name", None) or "-".join(map(str, dist.get_process_group_ranks(ep.group)))
    with _GROUP_POOL_LOCK:
        generation = _RENDEZVOUS_COUNT.get((id(store), name), 0)
        _RENDEZVOUS_COUNT[(id(store), name)] = generation + 1
    keys = [f"eplb_triton/worker/{name}/{generation}/{r}" for r in range(ep.world_size)]
    store.set(keys[ep.rank], "1")
    try:
        if timeout_s is None:
            store.wait(keys)
        else:
            store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - the store reports a timeout as a generic error
        try:
            store.delete_key(keys[ep.rank])
        except Exception:  # noqa: BLE001 - best effort
            pass
        missing = [r for r, key in enumerate(keys) if r != ep.rank and not store.check([key])]
        waited = "the store's timeout" if timeout_s is None else f"{timeout_s:g} s (timeout_s)"
        message = (
            f"TransferWorker: rank {ep.rank} waited {waited} for EP rank(s) {missing} to construct their "
            f"TransferWorker (every EP rank must construct one, collectively); nothing was created: {exc}"
        )
        log.error("%s", message)
        raise PeerTimeoutError(message, peer=missing[0] if missing else None) from exc


class _ControlCommunicator(Communicator):
    """The CPU control group as seen by ``prepare_layers``.

    Its agreement runs over gloo on CPU tensors (``collective_device``), so ``submit`` never
    waits on a GPU stream; ``backend`` is the transfer group's, so the weights' device is
    checked against the backend that will actually move them.
    """

    @property
    def collective_device(self) -> torch.device:
        return torch.device("cpu")



class GroupsMixin:
    """The :class:`~eplb_triton.worker.TransferWorker` part that makes and hands back groups.

    Uses ``self._device`` and keeps the groups it made in ``self._owned_groups``.
    """

    def _make_communicators(self, ep_group, transfer_group) -> tuple[Communicator, Communicator]:
        ep = Communicator.from_group(ep_group)
        if ep.world_size == 1:  # nothing crosses ranks: no collective, no p2p, no new group
            transfer = ep if transfer_group is None else Communicator.from_group(transfer_group)
            return transfer, _ControlCommunicator(group=ep.group, rank=ep.rank, world_size=1, dist_backend=transfer.dist_backend)
        ranks = dist.get_process_group_ranks(ep.group)
        if transfer_group is None:
            transfer_group = self._new_group(ranks, ep.dist_backend)
        elif dist.get_process_group_ranks(transfer_group) != ranks:
            raise ValueError(
                f"transfer_group must hold the EP ranks in the same order: {dist.get_process_group_ranks(transfer_group)} "
                f"vs {ranks}"
            )
        transfer = Communicator.from_group(transfer_group)
        self._warm_up(transfer)
        # The main thread's agreements need a CPU group the worker thread never uses.
        if ep.dist_backend == "gloo" and ep.group is not transfer_group:
            control_group = ep.group
        else:
            control_group = self._new_group(ranks, "gloo")
        control = _ControlCommunicator(group=control_group, rank=ep.rank, world_size=ep.world_size, dist_backend=transfer.dist_backend)
        return transfer, control

    def _warm_up(self, transfer: Communicator) -> None:
        """One tiny exchange with every peer over ``transfer``, here on the serving thread: NCCL
        creates its communicator and each pair's connections, and CUDA loads the send/receive
        kernel, now rather than in the worker thread's first layer (a kernel's first load waits
        for the running kernels, which may wait for a peer: see ``StagingMixin._load_kernels``)."""
        peers = [p for p in range(transfer.world_size) if p != transfer.rank]
        sends = {p: torch.zeros(16, dtype=torch.uint8, device=self._device) for p in peers}
        recvs = {p: torch.empty(16, dtype=torch.uint8, device=self._device) for p in peers}
        where = "TransferWorker construction (warm-up exchange)"
        on_device = torch.cuda.device(self._device) if self._device.type == "cuda" else contextlib.nullcontext()
        with on_device:  # the weights' device, as on the worker thread (the caller's current device may differ)
            requests = transfer.exchange(sends, recvs, where=where)
            transfer.wait(requests, timeout_s=self.timeout_s, labels=Communicator.op_labels(sends, recvs), where=where)
            if self._device.type == "cuda":
                torch.cuda.current_stream(self._device).synchronize()

    def _new_group(self, ranks: list[int], backend: str):
        group = _acquire_group(ranks, backend)
        self._owned_groups.append((group, tuple(ranks), backend))
        return group


    def _release_owned_groups(self) -> None:
        """Hand the groups this worker made back to the pool for the next worker (see
        :func:`_acquire_group`); called only after a clean stop, when no op is pending."""
        for group, ranks, backend in self._owned_groups:
            _release_group(group, ranks, backend)
        self._owned_groups = []

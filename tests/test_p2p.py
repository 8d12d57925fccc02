"""The p2p transport on CPU: the option, where every sender's messages lie, and the data path.

No GPU here, so three things are checked without one:

* the ``transport`` option: validated and agreed like the other options (a bad value, or
  ``"p2p"`` on gloo, raises the same error on every rank before any weight is touched;
  ``"auto"`` keeps the process group's own ops);
* the layout the receivers pull from (:func:`eplb_triton.p2p.message_spans`, computed from a
  round's traffic matrix) against each sender's own :class:`PassWork` for random plans
  (worlds 2-8, replicas, empty slots, several staging passes);
* the whole data path of both APIs, with the symmetric buffers emulated by shared CPU memory
  and the device barrier by a process barrier: the bytes must equal the expected experts and
  the NCCL path's (here gloo's) result exactly.

The GPU half (real symmetric memory, NVLink, timeouts) is tests/test_p2p_gpu.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from eplb_triton import TransferWorker, executor, p2p, rearrange_expert_weights_inplace, transfer
from eplb_triton.comm import Communicator
from eplb_triton.p2p import P2PTransport, check_transport, message_spans, send_region_bytes
from eplb_triton.testing.synthetic import make_rank_weights, fill_rank_weights, row_mismatches
from eplb_triton.transfer import prepare_layers
from map_cases import all_to_all_run_maps, packed_expert_bytes, random_maps, rotation_maps
from eplb_triton.testing.synthetic import TensorSpec
from test_worker import PACKED, SPECS, as_bytes, rank_weights, same_bytes


# -- the option -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["auto", "nccl", "p2p"])
def test_check_transport_accepts_the_three_values(value):
    assert check_transport(value) == value


@pytest.mark.parametrize(
    "value,error",
    [
        pytest.param("NCCL", ValueError, id="case-matters"),
        pytest.param("nvlink", ValueError, id="unknown"),
        pytest.param(None, TypeError, id="none"),
        pytest.param(2, TypeError, id="int"),
    ],
)
def test_check_transport_refuses_other_values(value, error):
    with pytest.raises(error, match="transport must be one of"):
        check_transport(value)


def test_auto_is_the_group_path_unless_the_environment_asks(monkeypatch):
    gloo = Communicator(group=None, rank=0, world_size=2, dist_backend="gloo")
    monkeypatch.delenv(p2p.TRANSPORT_ENV, raising=False)
    assert p2p.resolve_transport("auto", gloo, torch.device("cpu")) == "nccl"
    monkeypatch.setenv(p2p.TRANSPORT_ENV, "p2p")  # asked, but it cannot work on gloo: logged, NCCL kept
    assert p2p.resolve_transport("auto", gloo, torch.device("cpu")) == "nccl"
    monkeypatch.setenv(p2p.TRANSPORT_ENV, "bogus")
    with pytest.raises(ValueError, match=p2p.TRANSPORT_ENV):
        p2p.resolve_transport("auto", gloo, torch.device("cpu"))
    with pytest.raises(ValueError, match="backend is 'gloo'"):
        p2p.resolve_transport("p2p", gloo, torch.device("cpu"))
    alone = Communicator(group=None, rank=0, world_size=1, dist_backend=None)
    assert p2p.resolve_transport("p2p", alone, torch.device("cpu")) == "nccl"  # nothing crosses ranks


def _outcome(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - inspected by the test
        return type(exc).__name__, str(exc)
    return None


def _rank_refusals(rank, world, old, new):
    import os

    weights = rank_weights(rank, world, old, seed=5)
    before = as_bytes(weights)
    out = {}
    call = lambda **kw: lambda: rearrange_expert_weights_inplace(old, new, weights, **kw)  # noqa: E731
    out["bogus"] = _outcome(call(transport="bogus"))
    out["int"] = _outcome(call(transport=3))
    out["p2p"] = _outcome(call(transport="p2p"))
    out["rank_dependent"] = _outcome(call(transport="bogus" if rank == 0 else "nccl"))
    out["worker_p2p"] = _outcome(lambda: TransferWorker(weights, transport="p2p"))
    out["worker_bogus"] = _outcome(lambda: TransferWorker(weights, transport="bogus"))
    out["untouched"] = same_bytes(as_bytes(weights), before)
    os.environ[p2p.TRANSPORT_ENV] = "p2p"  # "auto" asked for p2p; on gloo it keeps the group's ops
    out["auto"] = _outcome(call(transport="auto"))
    out["auto_rows"] = row_mismatches(weights, old, new, rank, seed=5)
    return out


def test_bad_or_impossible_transport_raises_on_every_rank_before_touching_weights(distributed):
    rng = np.random.default_rng(7)
    old, new = random_maps(rng, 2, 2, 4, 6)
    results = distributed(2, _rank_refusals, old, new)
    for rank, res in enumerate(results):
        assert res["bogus"][0] == "ValueError" and "transport must be one of" in res["bogus"][1], res["bogus"]
        assert res["int"][0] == "TypeError", res["int"]
        assert res["p2p"][0] == "ValueError" and "transport='p2p' cannot work here" in res["p2p"][1], res["p2p"]
        assert "gloo" in res["p2p"][1]
        # the rank that passed a bad value is named on every rank
        assert res["rank_dependent"][0] == "ValueError" and "transport must be one of" in res["rank_dependent"][1]
        assert res["worker_p2p"][0] == "ValueError" and "p2p" in res["worker_p2p"][1], res["worker_p2p"]
        assert res["worker_bogus"][0] == "ValueError", res["worker_bogus"]
        assert res["untouched"], f"rank {rank}: a refused call changed weights"
        assert res["auto"] is None and res["auto_rows"] == [], (res["auto"], res["auto_rows"][:5])


# -- where each sender's messages lie -------------------------------------------------------
def _rank_views(old, new, world, budget, verify):
    """Every rank's layers, planned in one process (no agreement needed: group None)."""
    out = []
    for rank in range(world):
        comm = Communicator(group=None, rank=rank, world_size=world, dist_backend="gloo")
        weights = make_rank_weights(SPECS, old.shape[0], old.shape[1] // world)
        out.append(prepare_layers(old, new, weights, comm, budget, verify=verify))
    return out


def _brute_force_spans(work, split: bool) -> list[dict[int, tuple[int, int]]]:
    """Offsets of ``work``'s messages in its own send region, from its own per-peer counts."""
    eb = work.expert_bytes
    if not split:
        spans, offset = {}, 0
        for peer, count in zip(work.send_peers, work.send_counts):
            spans[peer] = (offset, work._message_bytes(count))
            offset += work._message_bytes(count)
        return [spans]
    data, trailers, offset = {}, {}, 0
    for peer, count in zip(work.send_peers, work.send_counts):
        data[peer] = (offset, count * eb)
        offset += count * eb
    for peer, count in zip(work.send_peers, work.send_counts):
        trailers[peer] = (offset, (count * 8 + 15) // 16 * 16)
        offset += (count * 8 + 15) // 16 * 16
    return [data, trailers]


@pytest.mark.parametrize(
    "world,layers,num_local,logical,budget_rows,empty",
    [
        pytest.param(2, 3, 4, 6, None, 0.1, id="W2-N4-E6"),
        pytest.param(3, 3, 5, 9, 3, 0.2, id="W3-N5-E9-budget3"),
        pytest.param(4, 4, 3, 8, None, 0.0, id="W4-N3-E8-replicas"),
        pytest.param(4, 3, 6, 10, 4, 0.25, id="W4-N6-E10-budget4-empty"),
        pytest.param(8, 2, 4, 20, 5, 0.1, id="W8-N4-E20-budget5"),
    ],
)
@pytest.mark.parametrize("verify", [pytest.param(False, id="plain"), pytest.param(True, id="verify")])
def test_message_spans_match_every_senders_own_layout(world, layers, num_local, logical, budget_rows, empty, verify):
    rng = np.random.default_rng(world * 100 + num_local)
    for trial in range(4):
        old, new = random_maps(rng, layers, world, num_local, logical, empty_frac=empty)
        row = PACKED + (16 if verify else 0)
        budget = None if budget_rows is None else budget_rows * row
        views = _rank_views(old, new, world, budget, verify)
        passes = 0
        for index in range(layers):
            counts = {len(views[r][index].passes) for r in range(world)}
            assert len(counts) == 1, f"layer {index}: ranks run different numbers of rounds {counts}: barriers would not meet"
            for k in range(counts.pop()):
                works = [views[r][index].passes[k] for r in range(world)]
                passes += 1
                traffic = works[0].pass_traffic
                assert all(np.array_equal(w.pass_traffic, traffic) for w in works), "ranks see different round plans"
                for split in ([False, True] if verify else [False]):
                    for s, sender in enumerate(works):
                        want = _brute_force_spans(sender, split)
                        got = message_spans(traffic, s, sender.expert_bytes, verify=verify, split=split)
                        assert got == want, (index, k, s, split)
                        assert send_region_bytes(traffic, s, sender.expert_bytes, verify=verify) == sender._sends_bytes
                        for r, size in ((r, sum(sz for _, sz in (g.get(r, (0, 0)) for g in got))) for r in range(world)):
                            receiver = works[r]
                            if r == s:
                                continue
                            count = dict(zip(receiver.recv_peers, receiver.recv_counts)).get(s, 0)
                            expect = receiver._message_bytes(count) if count else 0
                            assert size == expect, f"rank {r} expects {expect} bytes from {s}, the span says {size}"
        if budget_rows is not None and trial == 0:
            assert passes > layers, "the budget should split some layer into several staging passes"


# -- the data path, with CPU stand-ins for symmetric memory and the device barrier ----------
class SharedMemoryTransport(P2PTransport):
    """:class:`P2PTransport` over CPU buffers shared by forked processes and a process barrier
    (what symmetric memory and the device barrier provide on GPUs)."""

    def __init__(self, comm, buffers, barrier, nbytes):
        assert nbytes <= buffers[0].numel(), f"the emulated symmetric buffers are too small for {nbytes} bytes"
        self.comm, self.device, self.host = comm, torch.device("cpu"), "cpu"
        self.buffer, self.handle, self.broken, self.closed = buffers[comm.rank], None, False, False
        self._peers = {p: b for p, b in enumerate(buffers) if p != comm.rank}
        self._barrier = barrier
        self.barriers = 0

    def barrier(self) -> None:
        self.barriers += 1
        self._barrier.wait(timeout=60)

    def close(self) -> None:
        self.closed = True


def _emulate(buffers, barrier, made):
    """Route transport="p2p" through SharedMemoryTransport in this (forked) process."""
    p2p.p2p_unavailable_reason = lambda comm, device: None
    p2p._record_event = lambda: None

    def create(comm, device, nbytes, *, control=None, timeout_s=None):
        made.append(SharedMemoryTransport(comm, buffers, barrier, nbytes))
        return made[-1]

    P2PTransport.create = staticmethod(create)
    p2p._key = lambda comm, device: ("emulated", 0)  # the real agreement and cache, on CPU
    p2p._CACHE.clear()
    p2p._GRANULE = 256  # sizes stay within the emulated buffers


def _blocking_both_ways(rank, world, old, new, budget, verify, specs, seed, made) -> tuple[list, dict]:
    """The blocking call over the group path (gloo) and over the emulated p2p transport, from the
    same weights: the group path's result, and the p2p call's rows, bytes, stats and barriers."""
    reference = make_rank_weights(specs, old.shape[0], old.shape[1] // world)
    fill_rank_weights(reference, old, rank, seed)
    ref_stats = rearrange_expert_weights_inplace(old, new, reference, max_buffer_bytes=budget, verify=verify, transport="nccl")
    weights = make_rank_weights(specs, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, seed)
    stats = rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=budget, verify=verify, transport="p2p")
    return reference, dict(
        rows=row_mismatches(weights, old, new, rank, seed),
        equal=same_bytes(as_bytes(weights), as_bytes(reference)),
        sent=stats.bytes_sent.tolist() == ref_stats.bytes_sent.tolist(),
        barriers=made[-1].barriers if made else 0,
        overlapped=stats.overlapped_layers,
        exchanges=stats.exchanges,
        ops=(stats.p2p_ops, ref_stats.p2p_ops),
        peak=stats.peak_staging_bytes,
    )


def _rank_emulated(rank, world, old, new, budget, verify, buffers, barrier, specs, push="1"):
    made = []
    _emulate(buffers, barrier, made)
    os.environ["EPLB_TRITON_P2P_PUSH"] = push
    seed = 9
    reference, blocking = _blocking_both_ways(rank, world, old, new, budget, verify, specs, seed, made)
    weights = make_rank_weights(specs, old.shape[0], old.shape[1] // world)
    fill_rank_weights(weights, old, rank, seed)
    with TransferWorker(weights, max_buffer_bytes=budget, verify=verify, transport="p2p") as worker:
        worker.submit(old, new)
        worker_stats = worker.wait()
        mapped = worker._p2p
    return dict(
        blocking=blocking,
        worker_rows=row_mismatches(weights, old, new, rank, seed),
        worker_equal=same_bytes(as_bytes(weights), as_bytes(reference)),
        worker_verified=worker_stats.verified_experts,
        worker_barriers=mapped.barriers if mapped is not None else 0,
        worker_released=mapped is None or mapped.closed,
    )


MIXED = [SPECS, [SPECS[0], SPECS[3]], SPECS[1:]]  # per-layer tensor lists: different expert sizes


@pytest.mark.parametrize(
    "world,layers,num_local,logical,budget_rows,verify,mixed",
    [
        pytest.param(2, 3, 4, 6, None, False, False, id="W2-L3-N4"),
        pytest.param(2, 3, 5, 7, 2, True, False, id="W2-L3-N5-budget2-verify"),
        pytest.param(3, 3, 4, 8, 3, False, True, id="W3-L3-N4-budget3-mixed"),
        pytest.param(3, 2, 4, 9, None, True, True, id="W3-L2-N4-verify-mixed"),
        pytest.param(3, 5, 4, 8, 16, False, False, id="W3-L5-N4-budget16-two-slots"),
    ],
)
@pytest.mark.parametrize("push", [pytest.param("1", id="pushed"), pytest.param("0", id="pulled")])
def test_emulated_p2p_moves_the_same_bytes_as_the_group_path(distributed, world, layers, num_local, logical, budget_rows, verify, mixed, push):
    """Both APIs over the emulated p2p transport equal the group path. ``pushed``
    (``EPLB_TRITON_P2P_PUSH=1``, the default): the blocking call's one-pass layers are packed
    straight into the receivers' slots, with one barrier per layer where two slots alternate;
    ``pulled``: packed into this rank's slot, pulled by the receivers (two barriers per pass)."""
    rng = np.random.default_rng(world * 31 + num_local)
    old, new = random_maps(rng, layers, world, num_local, logical)
    specs = MIXED[:layers] if mixed else SPECS
    row = max(packed_expert_bytes(s) for s in (MIXED if mixed else [SPECS])) + (16 if verify else 0)
    budget = None if budget_rows is None else budget_rows * row
    buffers = [torch.zeros(1 << 16, dtype=torch.uint8).share_memory_() for _ in range(world)]
    barrier = mp.get_context("fork").Barrier(world)
    results = distributed(world, _rank_emulated, old, new, budget, verify, buffers, barrier, specs, push)
    for rank, res in enumerate(results):
        b = res["blocking"]
        assert b["rows"] == [], f"rank {rank}: blocking p2p wrote wrong rows {b['rows'][:6]}"
        assert b["equal"] and b["sent"], f"rank {rank}: blocking p2p differs from the group path"
        assert b["barriers"] > 0, "the emulated transport was not used"
        assert res["worker_rows"] == [], f"rank {rank}: worker p2p wrote wrong rows {res['worker_rows'][:6]}"
        assert res["worker_equal"], f"rank {rank}: worker p2p differs from the group path"
        assert res["worker_barriers"] > 0 and res["worker_released"]
        if verify:
            assert res["worker_verified"] > 0
        if budget_rows == 16 and push == "0":  # two slots: each sender's messages at the second slot's offset too
            assert b["overlapped"] > 0, "the two-slot path was not taken"
    exchanges = max(r["blocking"]["exchanges"] for r in results)  # a pass with network traffic: every rank takes part
    if push == "1" and budget_rows == 16:  # pushed in alternating slots: one barrier per layer, one more per call
        assert results[0]["blocking"]["barriers"] == exchanges + 1
    elif push == "0" or verify:
        assert results[0]["blocking"]["barriers"] == 2 * exchanges
    # barriers meet: every rank passed the same number of them
    assert len({r["blocking"]["barriers"] for r in results}) == 1
    assert len({r["worker_barriers"] for r in results}) == 1


def _rank_emulated_pushed(rank, world, old, new, budget, buffers, barrier, specs, direct, backend):
    made = []
    _emulate(buffers, barrier, made)
    os.environ["EPLB_TRITON_DIRECT_SENDS"] = direct
    os.environ["EPLB_TRITON_P2P_PUSH"] = "1"
    if backend is not None:  # the Triton kernels through the interpreter (conftest set TRITON_INTERPRET=1)
        os.environ["EPLB_TRITON_BACKEND"] = backend
    return _blocking_both_ways(rank, world, old, new, budget, False, specs, 5, made)[1]


@pytest.mark.parametrize(
    "world,layers,num_local,moved,budget_rows,specs,backend",
    [
        pytest.param(2, 4, 6, 2, None, SPECS, None, id="W2-L4-N6-default-budget"),
        pytest.param(2, 3, 6, 2, None, SPECS, "triton", id="W2-L3-N6-default-budget-triton"),
        pytest.param(3, 3, 5, 1, 3, SPECS, None, id="W3-L3-N5-budget3-one-slot"),
        pytest.param(3, 4, 6, 2, None, SPECS, None, id="W3-L4-N6-default-budget"),
        pytest.param(2, 3, 6, 2, None, SPECS[:1] + [TensorSpec((0,), torch.float32)] + SPECS[1:], None, id="W2-zero-byte-rows"),
        pytest.param(4, 2, None, 2, None, SPECS, None, id="W4-every-rank-to-every-rank"),
    ],
)
@pytest.mark.parametrize("direct", [pytest.param("0", id="packed"), pytest.param("1", id="direct-sends-asked")])
def test_emulated_p2p_pushed_passes_with_local_moves_replicas_and_empty_slots(
    distributed, world, layers, num_local, moved, budget_rows, specs, backend, direct
):
    """Pushed passes (``EPLB_TRITON_P2P_PUSH=1``, the default): each sender's pack kernel
    writes its messages into the receivers' slots; the bytes equal the group path's. Two slots
    alternate with one barrier per layer (and one per call); where a rank pushes to one peer,
    each layer's unpack and the next layer's pack are one launch (counted as overlapped;
    ``triton``: the pair kernel itself, through the interpreter). ``EPLB_TRITON_DIRECT_SENDS=1``
    changes nothing over p2p (the group path then sends one op per tensor).
    ``num_local=None``: :func:`all_to_all_run_maps` (several senders per receiver)."""
    if num_local is None:
        old, new = all_to_all_run_maps(layers, world, moved)
    else:
        old, new = rotation_maps(layers, world, num_local, moved)
    row = packed_expert_bytes(specs)
    budget = None if budget_rows is None else budget_rows * row
    buffers = [torch.zeros(1 << 16, dtype=torch.uint8).share_memory_() for _ in range(world)]
    barrier = mp.get_context("fork").Barrier(world)
    results = distributed(world, _rank_emulated_pushed, old, new, budget, buffers, barrier, specs, direct, backend)
    tensors = sum(1 for spec in specs if spec.row_bytes())
    for rank, res in enumerate(results):
        assert res["rows"] == [], f"rank {rank}: pushed p2p wrote wrong rows {res['rows'][:6]}"
        assert res["equal"] and res["sent"], f"rank {rank}: pushed p2p differs from the group path"
        ops, ref_ops = res["ops"]
        peers = world - 1 if num_local is None else 1
        # one packed message each way per peer and layer: staging only for the receives, so one
        # pass per layer where the group path's packed sends may need two
        assert ops == 2 * peers * layers, f"{ops} ops"
        assert ref_ops == (2 * peers * tensors * layers if direct == "1" else ref_ops) and ref_ops >= ops
        received = peers * moved if num_local is None else moved + 1  # rows of the largest layer
        two_slots = budget_rows is None and 2 * received <= old.shape[1] // world  # receives only: two slots in a layer's budget
        assert res["barriers"] == (layers + 1 if two_slots else 2 * layers)
        # one peer: layer i's unpack and layer i+1's pack are one launch; else each layer is
        # written before the next one is packed
        assert res["overlapped"] == (layers - 1 if two_slots and peers == 1 else 0)
        if two_slots:
            assert res["peak"] == 2 * (-(-received * row // 256) * 256)  # slots 256-byte aligned
    assert len({r["barriers"] for r in results}) == 1


def test_receive_spans_put_each_senders_message_where_the_receivers_pass_holds_it():
    """:func:`~eplb_triton.p2p.receive_spans` against each receiver's own pushed PassWork, for
    rotations, every rank to every rank, and random maps with replicas and empty slots, worlds 2-8."""
    from eplb_triton.maps import ExpertMaps
    from eplb_triton.passes import PassWork
    from eplb_triton.plan import plan_from_maps

    rng = np.random.default_rng(17)
    cases = [(w, *rotation_maps(2, w, n, k)) for w, n, k in ((2, 6, 2), (3, 5, 1), (4, 7, 3), (8, 4, 1))]
    cases += [(w, *all_to_all_run_maps(2, w, k)) for w, k in ((3, 2), (4, 1), (8, 2))]
    cases += [(w, *random_maps(rng, 2, w, n, n * w - 2)) for w, n in ((2, 5), (4, 3), (8, 4))]
    for world, old, new in cases:
        plan = plan_from_maps(ExpertMaps(old, new, world, False))
        for layer in plan.layers:
            for receiver in range(world):
                work = PassWork.from_view(layer.rank(receiver), 48, pushed=True)
                staging = torch.empty(work.staging_bytes, dtype=torch.uint8)
                messages = work.recv_messages(staging)
                got = {p: (m.data_ptr() - staging.data_ptr(), m.numel()) for p, m in messages.items()}
                assert got == p2p.receive_spans(layer.traffic, receiver, 48), (world, receiver)


# -- the deadline ---------------------------------------------------------------------------------
class _NeverDone:
    """A CUDA event stand-in for a pass whose barrier never completes (a stalled peer)."""

    def query(self) -> bool:
        return False


def test_a_pass_past_timeout_s_raises_peer_timeout_naming_layer_and_peer_and_writes_nothing(monkeypatch):
    """Rank 0 of two, alone: its peer never arrives, so the pass's event never completes."""
    monkeypatch.setattr(p2p, "_record_event", lambda: _NeverDone())
    monkeypatch.setattr(p2p, "_RELEASE_S", 0.05)
    world, rank = 2, 0
    old, new = random_maps(np.random.default_rng(3), 2, world, 4, 6)
    comm = Communicator(group=None, rank=rank, world_size=world, dist_backend="gloo")
    weights = rank_weights(rank, world, old, seed=2)
    before = as_bytes(weights)
    layers = prepare_layers(old, new, weights, comm, 2 * PACKED)  # several passes: a rollback is needed
    layer = next(l for l in layers if l.has_network)
    buffers = [torch.zeros(1 << 14, dtype=torch.uint8) for _ in range(world)]
    transport = SharedMemoryTransport(comm, buffers, barrier=None, nbytes=0)
    transport.barrier = lambda: None  # the peer never comes; the host deadline must end the wait
    stats = transfer.TransferStats.empty(rank, world)
    undo = torch.empty(max(layer.undo_bytes, 1), dtype=torch.uint8)
    with pytest.raises(p2p.PeerTimeoutError) as caught:
        layer.run(transport.buffer, comm, None, stats, timeout_s=0.05, undo=undo, transport=transport)
    error = caught.value
    assert error.layer == layer.index and f"layer {layer.index}" in str(error), str(error)
    assert error.peer == 1 and "peers [1]" in str(error), str(error)
    assert transport.broken, "a timed-out transport must not be reused"
    assert same_bytes(as_bytes(weights), before), "a pass that timed out wrote rows (or was not rolled back)"


# -- the GPU-only glue, with stand-ins for torch's symmetric memory and CUDA streams -----------
class _FakeHandle:
    """What ``symm_mem.rendezvous`` returns, for rank 0 of two: buffers and signal pads by rank."""

    def __init__(self, buffer):
        self.buffers = {0: buffer, 1: torch.arange(buffer.numel(), dtype=torch.int64).to(torch.uint8)}
        self.pads = {0: torch.zeros(64, dtype=torch.int32), 1: torch.ones(64, dtype=torch.int32)}  # peer: my signal unread
        self.barriers = 0

    @staticmethod
    def _view(memory, sizes, dtype, storage_offset):  # like torch: ``sizes`` elements from the offset
        count = int(np.prod(sizes))
        return memory.view(dtype)[storage_offset : storage_offset + count].reshape(sizes)

    def get_buffer(self, rank, sizes, dtype, storage_offset=0):
        return self._view(self.buffers[rank], sizes, dtype, storage_offset)

    def get_signal_pad(self, rank, sizes, dtype, storage_offset=0):
        return self._view(self.pads[rank], sizes, dtype, storage_offset)

    def barrier(self, channel=0, timeout_ms=0):
        self.barriers += 1


class _FakeSymmMem:
    def __init__(self):
        self.calls = []

    def empty(self, *size, dtype=None, device=None):
        self.calls.append(("empty", size, dtype))
        return torch.zeros(*size, dtype=dtype)

    def rendezvous(self, tensor, group):
        self.calls.append(("rendezvous", group))
        self.handle = _FakeHandle(tensor)
        return self.handle


class _Nothing:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


def test_create_maps_peers_and_a_timeout_releases_the_stuck_barrier(monkeypatch):
    from types import SimpleNamespace

    fake = _FakeSymmMem()
    monkeypatch.setattr(p2p, "symmetric_memory", lambda: fake)
    monkeypatch.setattr(torch.cuda, "device", _Nothing)
    monkeypatch.setattr(torch.cuda, "Stream", _Nothing)
    monkeypatch.setattr(torch.cuda, "stream", _Nothing)
    monkeypatch.setattr(torch.cuda, "current_stream", _Nothing)
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)
    comm = Communicator(group=SimpleNamespace(group_name="7"), rank=0, world_size=2, dist_backend="nccl")
    control = Communicator(group=None, rank=0, world_size=2, dist_backend="gloo")  # agreements pass through
    transport = P2PTransport.create(comm, torch.device("cpu"), 4096, control=control)
    assert fake.calls == [("empty", (4096,), torch.uint8), ("rendezvous", "7")]
    # one barrier at creation, on the caller's thread: its kernel is loaded there (CUDA lazy loading)
    assert fake.handle.barriers == 1
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1", "multicast must be off before the first mapping"
    assert torch.equal(transport.peer_bytes(1, 10, 5), fake.handle.buffers[1][10:15])
    pads = fake.handle.pads

    class StuckUntilReleased:
        """The barrier completes once my pad says "peer 1 arrived" and peer 1's pad is free for my signal."""

        def query(self):
            return bool(pads[0][1] == 1 and pads[1][0] == 0)

    request = p2p._Pending(StuckUntilReleased(), [1])
    monkeypatch.setattr(p2p, "time", SimpleNamespace(monotonic=_clock(), sleep=lambda s: None))
    with pytest.raises(p2p.PeerTimeoutError, match=r"layer 4, pass 1/1: rank 0 waited 0.5 s .* peers \[1\]") as caught:
        transport.wait([request], timeout_s=0.5, where="layer 4, pass 1/1")
    assert caught.value.peer == 1
    assert request.event.query(), "the stuck barrier was not released"
    assert transport.broken and transport in p2p._BROKEN
    transport.close()
    assert transport.buffer is not None, "a broken transport keeps its memory mapped (a late peer may write to it)"


def _clock(step: float = 0.1):
    now = [0.0]

    def monotonic():
        now[0] += step
        return now[0]

    return monotonic

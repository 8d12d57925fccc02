"""vLLM adapter: every call form vLLM's sources use, on gloo ranks, byte for byte against a
plain torch reference; the packed communicator through vLLM's add_send/add_recv/execute
sequence; install()/uninstall() on a fake vLLM module tree.

The call shapes are those of vLLM's ``tests/distributed/test_eplb_execute.py``,
``eplb_state.py`` and ``async_worker.py`` (see the module docstring of
``eplb_triton.integrations.vllm`` for the revisions read).
"""

from __future__ import annotations

import abc
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb_triton.integrations import vllm as adapter
from map_cases import random_maps
from runtime_cases import (
    byte_view,
    clone_layers,
    elastic_group_maps,
    expected_weights,
    expert_table,
    mismatches,
    poisoned_like,
    random_bytes,
    rank_weights,
)

LOGICAL = 7


class UnusedCommunicator:
    """Stands for vLLM's communicator object: the adapter must accept it and never use it."""

    def add_send(self, *args, **kwargs):
        raise AssertionError("the adapter used vLLM's communicator")

    add_recv = execute = add_send


def _maps(world: int, layers: int, num_local: int, seed: int):
    return random_maps(np.random.default_rng(seed), layers, world, num_local, min(LOGICAL, world * num_local), empty_frac=0.15)


def _call(form: str, old, new, weights, buffer, group, is_profile: bool, rank_mapping):
    """``rearrange_expert_weights_inplace`` exactly as each vLLM source calls it."""
    comm = UnusedCommunicator()
    old_t, new_t = torch.from_numpy(old), torch.from_numpy(new)
    f = adapter.rearrange_expert_weights_inplace
    if form == "tests":  # tests/distributed/test_eplb_execute.py
        return f(old_t, new_t, weights, group, is_profile=is_profile)
    if form == "state-2025":  # eplb_state.py (2025-26), positional
        return f(old_t, new_t, weights, group, is_profile, rank_mapping)
    if form == "communicator":  # eplb_state.py (2026, before expert_buffer), positional
        return f(old_t, new_t, weights, group, comm, is_profile, rank_mapping)
    if form == "communicator-kw":  # a test of that period, keywords, no profile / mapping
        return f(old_global_expert_indices=old_t, new_global_expert_indices=new_t, expert_weights=weights, ep_group=group, communicator=comm)
    if form == "buffer":  # eplb_state.py (newest), positional with profile and mapping
        return f(old_t, new_t, weights, buffer, group, comm, is_profile, rank_mapping)
    if form == "buffer-coordinator":  # newest, a vLLM GroupCoordinator instead of its device_group
        coordinator = types.SimpleNamespace(device_group=group, cpu_group=group, world_size=dist.get_world_size(group))
        return f(old_t, new_t, weights, buffer, coordinator, comm, is_profile=is_profile, rank_mapping=rank_mapping)
    if form == "buffer-batching":  # newest with enable_migration_batching
        return f(old_t, new_t, weights, buffer, group, comm, is_profile, rank_mapping, True)
    raise ValueError(form)


def _rank_rearrange(rank, world, form, old, new, mapping, is_profile, seed):
    group = dist.new_group(list(range(world)))  # vLLM passes a group of its own, not WORLD
    group_old, group_new = (old, new) if mapping is None else elastic_group_maps(old, new, mapping, world)
    num_local = group_old.shape[1] // world
    table = expert_table(seed, old.shape[0], LOGICAL)
    weights = rank_weights(table, group_old, rank, num_local, seed)
    before = clone_layers(weights)
    buffer = poisoned_like(weights[0], seed + rank)
    buffer_before = [t.clone() for t in buffer]
    _call(form, old, new, weights, buffer, group, is_profile, mapping)
    want = before if is_profile else expected_weights(before, table, group_new, rank, num_local)
    buffer_kept = all(torch.equal(byte_view(a), byte_view(b)) for a, b in zip(buffer, buffer_before))
    return mismatches(weights, want), buffer_kept


FORMS = ["tests", "state-2025", "communicator", "communicator-kw", "buffer", "buffer-coordinator", "buffer-batching"]


@pytest.mark.parametrize(
    "form,world",
    [pytest.param(form, 4, id=f"{form}-W4") for form in FORMS]
    + [pytest.param("tests", 2, id="tests-W2"), pytest.param("buffer", 2, id="buffer-W2")],
)
def test_every_call_form_moves_the_right_bytes(distributed, form, world):
    old, new = _maps(world, 3, 3, seed=world + len(form))
    results = distributed(world, _rank_rearrange, form, old, new, None, False, 1)
    for rank, (bad, _) in enumerate(results):
        assert bad == [], f"rank {rank}: wrong rows (layer, tensor, row): {bad[:8]}"


@pytest.mark.parametrize(
    "form,old_ep,new_ep,mapping",
    [
        pytest.param("state-2025", 4, 2, [0, -1, -1, 1], id="down-4to2-state-2025"),
        pytest.param("buffer", 4, 3, [2, 0, -1, 1], id="down-4to3-permuted-buffer"),
        pytest.param("communicator", 2, 4, [0, 1], id="up-2to4-communicator"),
        pytest.param("buffer", 3, 4, [3, 0, 1], id="up-3to4-permuted-buffer"),
    ],
)
def test_rank_mapping_scale_down_and_up(distributed, form, old_ep, new_ep, mapping):
    rng = np.random.default_rng(old_ep * 10 + new_ep)
    old, _ = random_maps(rng, 2, old_ep, 3, 6, empty_frac=0.1)
    new, _ = random_maps(rng, 2, new_ep, 3, 6, empty_frac=0.1)
    for layer in range(2):  # the new map may only name experts the old layer holds
        held = np.unique(old[layer][old[layer] >= 0])
        bad = (new[layer] >= 0) & ~np.isin(new[layer], held)
        new[layer][bad] = rng.choice(held, bad.sum())
    world = max(old_ep, new_ep)
    results = distributed(world, _rank_rearrange, form, old, new, mapping, False, 2)
    for rank, (bad, _) in enumerate(results):
        assert bad == [], f"rank {rank}: wrong rows (layer, tensor, row): {bad[:8]}"


@pytest.mark.parametrize("form", ["state-2025", "buffer"])
def test_profile_run_touches_nothing(distributed, form):
    old, new = _maps(2, 2, 3, seed=5)
    assert not np.array_equal(old, new)
    results = distributed(2, _rank_rearrange, form, old, new, None, True, 3)
    for rank, (bad, buffer_kept) in enumerate(results):
        assert bad == [], f"rank {rank}: profile run changed rows {bad[:8]}"
        assert buffer_kept, f"rank {rank}: profile run wrote into expert_buffer"


# Rows dominated by one tensor, as in a real MoE layer (w13 is most of the bytes): the
# staging fits in vLLM's buffer, so the buffer's bytes change and nothing else is used.
WIDE_SPECS = [((64, 16), torch.bfloat16), ((3,), torch.float32)]


def _rank_staged_in_buffer(rank, world, old, new, seed):
    num_local = old.shape[1] // world
    table = expert_table(seed, old.shape[0], LOGICAL, WIDE_SPECS)
    weights = rank_weights(table, old, rank, num_local, seed)
    before = clone_layers(weights)
    buffer = poisoned_like(weights[0], seed + rank)
    poison = [t.clone() for t in buffer]
    stats = adapter.rearrange_expert_weights_inplace(
        torch.from_numpy(old), torch.from_numpy(new), weights, buffer, dist.group.WORLD, UnusedCommunicator()
    )
    written = not torch.equal(byte_view(buffer[0]), byte_view(poison[0]))
    untouched_others = all(torch.equal(byte_view(b), byte_view(p)) for b, p in zip(buffer[1:], poison[1:]))
    return mismatches(weights, expected_weights(before, table, new, rank, num_local)), stats.peak_staging_bytes, written, untouched_others


def test_staging_lives_in_the_largest_buffer_tensor(distributed):
    old, new = _maps(2, 2, 8, seed=9)
    for rank, (bad, staged, written, others) in enumerate(distributed(2, _rank_staged_in_buffer, old, new, 7)):
        assert bad == [], f"rank {rank}: {bad[:8]}"
        assert staged > 0 and written and others, (rank, staged, written, others)


def _rank_bad_maps(rank, world):
    weights = rank_weights(expert_table(0, 1, LOGICAL), np.zeros((1, 2 * world), dtype=np.int64), rank, 2, 0)
    old = torch.zeros(1, 2 * world, dtype=torch.int64)
    new = torch.full((1, 2 * world), 5, dtype=torch.int64)  # expert 5 is held nowhere
    try:
        adapter.rearrange_expert_weights_inplace(old, new, weights, poisoned_like(weights[0], 0), dist.group.WORLD, None)
    except ValueError as exc:
        return str(exc)
    return None


def test_bad_maps_raise_the_same_error_on_every_rank(distributed):
    messages = distributed(2, _rank_bad_maps)
    assert messages[0] is not None and messages[0] == messages[1]


def test_unknown_keyword_and_extra_arguments_are_type_errors():
    weights = [[torch.zeros(2, 3)]]
    maps = torch.tensor([[0, 1]])
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_buffer'"):
        adapter.rearrange_expert_weights_inplace(maps, maps, weights, None, max_buffer=1)
    with pytest.raises(TypeError, match="positional arguments"):
        adapter.rearrange_expert_weights_inplace(maps, maps, weights, None, False, None, 1)
    with pytest.raises(TypeError, match="is_profile must be a bool"):
        adapter.rearrange_expert_weights_inplace(maps, maps, weights, None, is_profile="yes")


# ------------------------------------------------------------------------------------------
# transfer_layer / move_from_buffer as vLLM's async worker and main thread call them
# ------------------------------------------------------------------------------------------


def _rank_async(rank, world, old, new, buffer_rows, mapping, seed):
    group = dist.new_group(list(range(world)))
    group_old, group_new = (old, new) if mapping is None else elastic_group_maps(old, new, mapping, world)
    num_local = group_old.shape[1] // world
    table = expert_table(seed, old.shape[0], LOGICAL)
    weights = rank_weights(table, group_old, rank, num_local, seed)
    before = clone_layers(weights)
    # vLLM's model_state.expert_buffer: one empty_like per tensor of a layer (here resized)
    buffer = poisoned_like([torch.empty(buffer_rows, *t.shape[1:], dtype=t.dtype) for t in weights[0]], seed + rank)
    old_t, new_t = torch.from_numpy(old), torch.from_numpy(new)
    untouched, in_buffer = True, []
    for layer in range(old.shape[0]):
        metadata = adapter.transfer_layer(  # async_worker.py, keywords
            old_layer_indices=old_t[layer],
            new_layer_indices=new_t[layer],
            expert_weights=weights[layer],
            expert_weights_buffer=buffer,
            communicator=UnusedCommunicator(),
            ep_group=group,
            is_profile=False,
            cuda_stream=None,
            rank_mapping=mapping,
            layer_idx=layer,
        )
        untouched &= mismatches([weights[layer]], [before[layer]]) == []  # staged, nothing written yet
        if metadata.packed is not None:
            in_buffer.append(any(metadata.packed.data_ptr() == b.data_ptr() for b in buffer))
        adapter.move_from_buffer(  # eplb_state.py main thread, keywords
            expert_weights=weights[layer],
            expert_weights_buffers=buffer,
            transfer_metadata=metadata,
            new_indices=new_t[layer].numpy(),
            ep_rank=rank,
        )
    return mismatches(weights, expected_weights(before, table, group_new, rank, num_local)), untouched, in_buffer


@pytest.mark.parametrize(
    "buffer_rows,expect_in_buffer",
    [
        pytest.param(64, True, id="staging-in-vllm-buffer"),
        pytest.param(3, False, id="buffer-too-small-kept-staging"),
    ],
)
def test_transfer_layer_then_move_from_buffer(distributed, buffer_rows, expect_in_buffer):
    old, new = _maps(4, 3, 6, seed=11)  # 6 rows: several experts per peer message
    results = distributed(4, _rank_async, old, new, buffer_rows, None, 4)
    for rank, (bad, untouched, in_buffer) in enumerate(results):
        assert untouched, f"rank {rank}: transfer_layer wrote weights"
        assert bad == [], f"rank {rank}: wrong rows (layer, tensor, row): {bad[:8]}"
        assert in_buffer and all(x == expect_in_buffer for x in in_buffer), in_buffer


def test_transfer_layer_with_rank_mapping(distributed):
    rng = np.random.default_rng(3)
    old, _ = random_maps(rng, 2, 4, 2, 4, empty_frac=0.0)
    new, _ = random_maps(rng, 2, 2, 2, 4, empty_frac=0.0)
    for layer in range(2):
        held = np.unique(old[layer])
        bad = ~np.isin(new[layer], held)
        new[layer][bad] = rng.choice(held, bad.sum())
    results = distributed(4, _rank_async, old, new, 64, {0: 1, 1: -1, 2: 0, 3: -1}, 5)
    for rank, (bad, untouched, _) in enumerate(results):
        assert untouched and bad == [], f"rank {rank}: {bad[:8]}"


def test_transfer_layer_on_one_rank_and_in_profile_mode():
    table = expert_table(8, 1, LOGICAL)
    old = np.array([[0, 1, 2, 3, -1, 5]])
    new = np.array([[5, 5, 1, 0, 2, -1]])  # a replica, a swap, an empty slot filled and one emptied
    weights = rank_weights(table, old, 0, 6, 8)
    before = clone_layers(weights)
    buffer = poisoned_like(weights[0], 8)
    profile = adapter.transfer_layer(torch.from_numpy(old[0]), torch.from_numpy(new[0]), weights[0], buffer, None, is_profile=True)
    adapter.move_from_buffer(weights[0], buffer, profile, new[0], 0)
    assert mismatches(weights, before) == []  # profile: nothing staged, nothing written
    metadata = adapter.transfer_layer(torch.from_numpy(old[0]), torch.from_numpy(new[0]), weights[0], buffer, None)
    assert mismatches(weights, before) == []
    adapter.move_from_buffer(weights[0], buffer, metadata, new[0], 0)
    assert mismatches(weights, expected_weights(before, table, new, 0, 6)) == []


def test_move_from_buffer_rejects_foreign_metadata():
    with pytest.raises(TypeError, match="PackedTransferMetadata"):
        adapter.move_from_buffer([torch.zeros(2, 2)], [torch.zeros(2, 2)], object(), np.zeros(2), 0)


# ------------------------------------------------------------------------------------------
# Packed communicator, driven the way vLLM's move_to_buffer drives an EplbCommunicator
# ------------------------------------------------------------------------------------------


class PerTensorReference:
    """What vLLM's torch_nccl/torch_gloo communicators do: one isend/irecv per tensor."""

    def __init__(self, group):
        self.group, self.ops = group, []

    def set_transfer_context(self, old_indices, layer_idx):
        pass

    def add_send(self, tensors, dst_rank, expert_id):
        self.ops += [dist.P2POp(dist.isend, t.contiguous(), dst_rank, self.group) for t in tensors]

    def add_recv(self, tensors, src_rank, expert_id):
        self.ops += [dist.P2POp(dist.irecv, t, src_rank, self.group) for t in tensors]

    def execute(self):
        for request in dist.batch_isend_irecv(self.ops) if self.ops else []:
            request.wait()
        self.ops = []


def _drive_like_move_to_buffer(communicator, old, new, rank, num_local, weights, buffer, layer_idx):
    """vLLM's sequence per layer: set_transfer_context, then for each expert held here (by
    id) add_send to the receivers this rank serves, for each expert needed here and held
    nowhere on this rank (by id) add_recv into the buffer row, then execute(). Senders:
    holders in rank order, receivers split evenly among them (vLLM's rule)."""
    def ranks_of(layer_map, expert):
        return sorted({s // num_local for s in np.flatnonzero(layer_map == expert)})

    communicator.set_transfer_context(old, layer_idx)
    sent_to = set()
    mine_old, mine_new = old[rank * num_local : (rank + 1) * num_local], new[rank * num_local : (rank + 1) * num_local]
    for expert in sorted(set(mine_old[mine_old >= 0].tolist())):
        senders = ranks_of(old, expert)
        receivers = [r for r in ranks_of(new, expert) if r not in senders]
        per = len(receivers) // len(senders)
        i = senders.index(rank)
        mine = receivers[i * per : (i + 1) * per] + receivers[len(senders) * per + i : len(senders) * per + i + 1]
        src_row = int(np.flatnonzero(mine_old == expert)[0])
        for dst in mine:
            communicator.add_send([w[src_row] for w in weights], dst, expert_id=expert)
            sent_to.add(dst)
    for expert in sorted(set(mine_new[mine_new >= 0].tolist()) - set(mine_old.tolist())):
        senders, receivers = ranks_of(old, expert), [r for r in ranks_of(new, expert) if r not in ranks_of(old, expert)]
        per, j = len(receivers) // len(senders), receivers.index(rank)
        src = senders[j // per] if j < len(senders) * per else senders[j - len(senders) * per]
        dst_row = int(np.flatnonzero(mine_new == expert)[0])
        communicator.add_recv([b[dst_row] for b in buffer], src, expert_id=expert)
    communicator.execute()
    return sent_to


def _rank_communicator(rank, world, old, new, seed):
    num_local = old.shape[1] // world
    table = expert_table(seed, old.shape[0], LOGICAL)
    weights = rank_weights(table, old, rank, num_local, seed)
    packed = adapter.PackedEplbCommunicator(dist.group.WORLD)
    reference = PerTensorReference(dist.group.WORLD)
    bad, messages, peers = [], [], []
    for layer in range(old.shape[0]):
        ours = poisoned_like(weights[layer], seed + 10 * rank + layer)
        theirs = [t.clone() for t in ours]
        sent_before = packed.messages_sent
        peers.append(len(_drive_like_move_to_buffer(packed, old[layer], new[layer], rank, num_local, weights[layer], ours, layer)))
        messages.append(packed.messages_sent - sent_before)
        _drive_like_move_to_buffer(reference, old[layer], new[layer], rank, num_local, weights[layer], theirs, layer)
        bad += [(layer, b) for b in mismatches([ours], [theirs])]
    return bad, messages, peers


@pytest.mark.parametrize("world", [pytest.param(2, id="W2"), pytest.param(4, id="W4")])
def test_packed_communicator_matches_per_tensor_p2p(distributed, world):
    old, new = _maps(world, 3, 4, seed=20 + world)
    results = distributed(world, _rank_communicator, old, new, 6)
    for rank, (bad, messages, peers) in enumerate(results):
        assert bad == [], f"rank {rank}: buffer rows differ from per-tensor p2p: {bad[:8]}"
        assert messages == peers, f"rank {rank}: {messages} messages per layer for {peers} peers"
    assert sum(sum(peers) for _, _, peers in results) > 0


def test_communicator_rejects_a_bad_peer():
    communicator = adapter.PackedEplbCommunicator(None)  # no process group: one rank alone
    with pytest.raises(ValueError, match="cannot exchange with itself"):
        communicator.add_send([torch.zeros(2)], 0, expert_id=1)
    with pytest.raises(ValueError, match=r"peer rank must be an int in \[0, 1\)"):
        communicator.add_recv([torch.zeros(2)], 3, expert_id=1)


# ------------------------------------------------------------------------------------------
# install() / uninstall() against a fake vllm module tree
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_vllm(monkeypatch):
    """The vLLM modules install() patches, with sentinel functions, in sys.modules."""
    def sentinel(name):
        def f(*args, **kwargs):
            return (name, args, kwargs)
        f.__name__ = name
        return f

    names = ["vllm", "vllm.distributed", "vllm.distributed.eplb"]
    tree = {name: types.ModuleType(name) for name in names}
    execute = tree["vllm.distributed.eplb.rebalance_execute"] = types.ModuleType("vllm.distributed.eplb.rebalance_execute")
    for attr in ("rearrange_expert_weights_inplace", "transfer_layer", "move_from_buffer"):
        setattr(execute, attr, sentinel(attr))
    communicator = tree["vllm.distributed.eplb.eplb_communicator"] = types.ModuleType("vllm.distributed.eplb.eplb_communicator")
    communicator.create_eplb_communicator = sentinel("create_eplb_communicator")

    class EplbCommunicator(abc.ABC):  # vLLM's abstract base, with a helper of newer versions
        @abc.abstractmethod
        def add_send(self, tensors, dst_rank, expert_id): ...

        @abc.abstractmethod
        def add_recv(self, tensors, src_rank, expert_id): ...

        @abc.abstractmethod
        def execute(self): ...

        def next_rearrangement_id(self) -> int:
            self._next = getattr(self, "_next", -1) + 1
            return self._next

    communicator.EplbCommunicator = EplbCommunicator
    state = tree["vllm.distributed.eplb.eplb_state"] = types.ModuleType("vllm.distributed.eplb.eplb_state")
    state.rearrange_expert_weights_inplace = execute.rearrange_expert_weights_inplace  # imported by name
    state.move_from_buffer = execute.move_from_buffer
    state.create_eplb_communicator = communicator.create_eplb_communicator
    worker = tree["vllm.distributed.eplb.async_worker"] = types.ModuleType("vllm.distributed.eplb.async_worker")
    worker.transfer_layer = execute.transfer_layer
    for name, module in tree.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield tree
    adapter.uninstall()


def test_install_replaces_every_binding_and_uninstall_restores(fake_vllm):
    originals = {
        (name, attr): getattr(module, attr)
        for name, module in fake_vllm.items()
        for attr in ("rearrange_expert_weights_inplace", "transfer_layer", "move_from_buffer", "create_eplb_communicator")
        if hasattr(module, attr)
    }
    replaced = adapter.install()
    assert set(replaced) == {f"{name}.{attr}" for name, attr in originals}
    for (name, attr), original in originals.items():
        assert replaced[f"{name}.{attr}"] is original
        now = getattr(fake_vllm[name], attr)
        if attr == "create_eplb_communicator":
            assert now.__wrapped__ is original
        else:
            assert now is getattr(adapter, attr)
    with pytest.raises(RuntimeError, match="already installed"):
        adapter.install()
    restored = adapter.uninstall()
    assert set(restored) == set(replaced)
    for (name, attr), original in originals.items():
        assert getattr(fake_vllm[name], attr) is original
    assert adapter.uninstall() == []


def test_installed_factory_creates_the_packed_communicator_by_name(fake_vllm):
    adapter.install(functions=False)
    factory = fake_vllm["vllm.distributed.eplb.eplb_state"].create_eplb_communicator
    coordinator = types.SimpleNamespace(device_group=None, cpu_group=None)
    weights = [[torch.zeros(2, 3)]]
    created = factory(group_coordinator=coordinator, backend=adapter.COMMUNICATOR_NAME, expert_weights=weights, expert_buffer=[])
    assert isinstance(created, adapter.PackedEplbCommunicator)
    assert isinstance(created, fake_vllm["vllm.distributed.eplb.eplb_communicator"].EplbCommunicator)
    assert [created.next_rearrangement_id(), created.next_rearrangement_id()] == [0, 1]  # the base's helpers work
    passed = factory(coordinator, "torch_nccl", weights, [])  # other names: vLLM's own factory
    assert passed == ("create_eplb_communicator", (coordinator, "torch_nccl", weights, []), {})
    # functions=False left the transfer functions alone
    assert fake_vllm["vllm.distributed.eplb.rebalance_execute"].transfer_layer is not adapter.transfer_layer


def test_install_without_vllm_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError):
        adapter.install()


def test_importing_the_adapters_does_not_import_the_runtimes():
    code = (
        "import sys, eplb_triton.integrations.vllm, eplb_triton.integrations.sglang; "
        "print('vllm' in sys.modules, 'sglang' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


# ------------------------------------------------------------------------------------------
# GPU: the expert_buffer path allocates no staging (run by hand on a CUDA machine)
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_expert_buffer_path_allocates_no_staging():
    device = torch.device("cuda")
    num_local = 16
    shapes = [((512, 256), torch.bfloat16), ((256, 256), torch.bfloat16), ((), torch.float32)]
    g = torch.Generator().manual_seed(0)
    weights = [[random_bytes((num_local, *shape), dtype, g).to(device) for shape, dtype in shapes]]
    buffer = [torch.empty_like(t) for t in weights[0]]  # what vLLM allocates once
    old = torch.arange(num_local).reshape(1, -1)
    # Rotate 8 rows: staged in one round (8 experts fit in the largest buffer tensor, 10).
    moved = torch.cat([torch.roll(torch.arange(8), 1), torch.arange(8, num_local)]).reshape(1, -1)
    expected = [t[moved[0].to(device)].clone() for t in weights[0]]
    comm = UnusedCommunicator()
    adapter.rearrange_expert_weights_inplace(old, moved, weights, buffer, None, comm)  # warm-up: compiles kernels
    adapter.rearrange_expert_weights_inplace(moved, old, weights, buffer, None, comm)  # and back
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stats = adapter.rearrange_expert_weights_inplace(old, moved, weights, buffer, None, comm)
    torch.cuda.synchronize()
    delta = torch.cuda.max_memory_allocated() - base
    assert all(torch.equal(byte_view(w), byte_view(e)) for w, e in zip(weights[0], expected))
    assert stats.peak_staging_bytes > 1 << 20  # it did stage megabytes...
    # ... inside vLLM's buffer: only index/descriptor tensors (kilobytes) may come and go
    assert delta < 64 << 10, f"the expert_buffer path allocated {delta} bytes at peak"
    # the same call without expert_buffer allocates its staging: the measurement sees it
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    own = adapter.rearrange_expert_weights_inplace(moved, old, weights, None, comm)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base >= own.peak_staging_bytes


def test_plugin_installs_only_when_asked_and_only_once(fake_vllm, monkeypatch):
    monkeypatch.delenv(adapter.PLUGIN_ENV, raising=False)
    adapter.vllm_plugin()
    assert fake_vllm["vllm.distributed.eplb.async_worker"].transfer_layer is not adapter.transfer_layer
    monkeypatch.setenv(adapter.PLUGIN_ENV, "1")
    adapter.vllm_plugin()
    adapter.vllm_plugin()  # vLLM may load plugins several times per process
    assert fake_vllm["vllm.distributed.eplb.async_worker"].transfer_layer is adapter.transfer_layer


def test_plugin_is_declared_for_vllm():
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    target = meta["project"]["entry-points"]["vllm.general_plugins"]["eplb_triton"]
    module, _, name = target.partition(":")
    assert module == adapter.__name__ and getattr(adapter, name) is adapter.vllm_plugin

"""SGLang adapter: the per-layer update called the way SGLang's ``_update_expert_weights_raw``
calls it, on gloo ranks, byte for byte against a plain torch reference; same-node senders;
install()/uninstall() on a fake SGLang module tree.

Call shapes from ``python/sglang/srt/eplb/expert_location_updater.py`` (see the module
docstring of ``eplb_triton.integrations.sglang`` for the revision read).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from eplb_triton import plan_rearrangement
from eplb_triton.layout import ExpertLayout
from eplb_triton.integrations import sglang as adapter
from map_cases import random_maps
from runtime_cases import byte_view, clone_layers, expected_weights, expert_table, mismatches, poisoned_like, rank_weights

LOGICAL = 7


def _rank_update(rank, world, old, new, per_node, form, seed):
    num_local = old.shape[1] // world
    table = expert_table(seed, old.shape[0], LOGICAL)
    weights = rank_weights(table, old, rank, num_local, seed)
    before = clone_layers(weights)
    # SGLang: temp_buffers = create_temp_buffers(weights of the first updated layer), shared by all layers
    temp_buffers = poisoned_like(weights[0], seed + rank)
    stats = []
    real = adapter.rearrange_in_buffer
    adapter.rearrange_in_buffer = lambda *a, **k: stats.append(real(*a, **k)) or stats[-1]  # record this rank's traffic
    returned = []
    for layer_id in range(old.shape[0]):
        if form == "raw-2026":  # _update_expert_weights_raw, keywords
            missing: list[int] = []
            returned.append(
                adapter.update_expert_weights_single_layer(
                    routed_experts_weights=weights[layer_id],
                    temp_buffers=temp_buffers,
                    old_physical_to_logical_map=torch.from_numpy(old)[layer_id].tolist(),
                    new_physical_to_logical_map=torch.from_numpy(new)[layer_id].tolist(),
                    num_local_physical_experts=num_local,
                    num_gpu_per_node=per_node,
                    rank=rank,
                    world_size=world,
                    missing_logical_experts_info=missing,
                    log_metrics=False,
                )
            )
            assert missing == []
        else:  # the 2025 signature, positional, debug last
            returned.append(
                adapter.update_expert_weights_single_layer(
                    weights[layer_id], temp_buffers, old[layer_id].tolist(), new[layer_id].tolist(), num_local, per_node, rank, True
                )
            )
    received = np.stack([s.bytes_received for s in stats])
    return mismatches(weights, expected_weights(before, table, new, rank, num_local)), received, returned


@pytest.mark.parametrize(
    "form,world,per_node,empty",
    [
        pytest.param("raw-2026", 4, 2, 0.0, id="raw-2026-W4-2pernode"),
        pytest.param("raw-2026", 4, 4, 0.15, id="raw-2026-W4-empty-slots"),
        pytest.param("positional-debug-2025", 2, 1, 0.0, id="positional-debug-W2"),
    ],
)
def test_layer_update_moves_the_right_bytes(distributed, form, world, per_node, empty):
    old, new = random_maps(np.random.default_rng(world + per_node), 3, world, 3, min(LOGICAL, 3 * world), empty_frac=empty)
    results = distributed(world, _rank_update, old, new, per_node, form, 1)
    for rank, (bad, _, returned) in enumerate(results):
        assert bad == [], f"rank {rank}: wrong rows (layer, tensor, row): {bad[:8]}"
        if form.startswith("positional-debug"):
            assert all(isinstance(r, list) and r[0].startswith(f"rank {rank}:") for r in returned)
        else:
            assert returned == [None] * 3


def test_same_node_senders_first(distributed):
    # Found by search: without nodes the balanced plan sends 3 experts across nodes, with
    # ranks_per_node=2 only 2 (every receiver is then served from its own node where it can).
    old = np.array([[5, 3, 2, 4, 3, 5, 0, 1]])
    new = np.array([[3, 2, 0, 4, 4, 5, 3, 1]])
    nodes = plan_rearrangement(old, new, 4, ranks_per_node=2).layers[0].traffic
    flat = plan_rearrangement(old, new, 4).layers[0].traffic
    assert not np.array_equal(nodes, flat)  # the check below can tell them apart
    results = distributed(4, _rank_update, old, new, 2, "raw-2026", 2)
    for rank, (bad, _, _) in enumerate(results):
        assert bad == [], f"rank {rank}: {bad[:8]}"
    expert_bytes = ExpertLayout(rank_weights(expert_table(0, 1, LOGICAL), old, 0, 2, 0)[0]).expert_bytes
    got = np.stack([r[1][0] for r in results], axis=1) // expert_bytes  # got[src, dst]: experts received
    np.fill_diagonal(got, 0)
    off_diagonal = nodes * (1 - np.eye(4, dtype=np.int64))
    assert np.array_equal(got, off_diagonal), f"traffic {got.tolist()} vs same-node plan {off_diagonal.tolist()}"


# ------------------------------------------------------------------------------------------
# install() / uninstall() against a fake sglang module tree
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_sglang(monkeypatch):
    names = ["sglang", "sglang.srt", "sglang.srt.eplb", "sglang.srt.eplb.expert_location_updater"]
    tree = {name: types.ModuleType(name) for name in names}
    updater = tree["sglang.srt.eplb.expert_location_updater"]

    def original(**kwargs):
        return "sglang's own"

    updater.update_expert_weights_single_layer = original
    # SGLang's caller looks the function up in its module's globals at each call
    exec("def _update_expert_weights_raw(**kwargs):\n    return update_expert_weights_single_layer(**kwargs)\n", updater.__dict__)
    for name, module in tree.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield updater, original
    adapter.uninstall()


def test_install_routes_sglang_calls_here_and_uninstall_restores(fake_sglang):
    updater, original = fake_sglang
    replaced = adapter.install()
    assert replaced == {"sglang.srt.eplb.expert_location_updater.update_expert_weights_single_layer": original}
    weights = [torch.arange(12, dtype=torch.float32).reshape(3, 4)]
    want = weights[0][[2, 0, 1]].clone()
    result = updater._update_expert_weights_raw(  # one rank, no process group
        routed_experts_weights=weights,
        temp_buffers=poisoned_like(weights, 0),
        old_physical_to_logical_map=[0, 1, 2],
        new_physical_to_logical_map=[2, 0, 1],
        num_local_physical_experts=3,
        num_gpu_per_node=1,
        rank=0,
    )
    assert result is None and torch.equal(byte_view(weights[0]), byte_view(want))
    with pytest.raises(RuntimeError, match="already installed"):
        adapter.install()
    assert adapter.uninstall() == list(replaced)
    assert updater.update_expert_weights_single_layer is original
    assert updater._update_expert_weights_raw() == "sglang's own"


def test_install_without_sglang_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(ImportError):
        adapter.install()


def _rank_bad(rank, world):
    weights = [torch.zeros(2, 3)]
    try:
        adapter.update_expert_weights_single_layer(weights, poisoned_like(weights, 0), [0, 1, 2, 3], [0, 1, 2, 9], 2, 1, rank)
    except ValueError as exc:
        return str(exc)
    return None


def test_bad_map_raises_the_same_error_on_every_rank(distributed):
    messages = distributed(2, _rank_bad)
    assert messages[0] is not None and messages[0] == messages[1]

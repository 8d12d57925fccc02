"""Planner: route validity, sender balance (vs brute force and an exact flow), nodes, rounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb_triton import plan_rearrangement
from eplb_triton.plan import plan_layer, rank_views
from eplb_triton.testing.balancer import placement_sequence
from eplb_triton.plan import balance_assignment

# ---------------------------------------------------------------------------------------
# Map generation
# ---------------------------------------------------------------------------------------


def make_maps(rng, layers, ep, num_local, logical, empty_frac=0.15):
    slots = ep * num_local
    old = rng.integers(0, logical, (layers, slots))
    new = rng.integers(0, logical, (layers, slots))
    old[rng.random(old.shape) < empty_frac] = -1
    new[rng.random(new.shape) < empty_frac] = -1
    for l in range(layers):
        if not (old[l] >= 0).any():
            old[l, 0] = 0
        held = np.unique(old[l][old[l] >= 0])
        bad = (new[l] >= 0) & ~np.isin(new[l], held)
        new[l][bad] = rng.choice(held, bad.sum())
    return old, new


@st.composite
def map_cases(draw, max_ep=6, max_local=4):
    ep = draw(st.integers(1, max_ep))
    num_local = draw(st.integers(1, max_local))
    layers = draw(st.integers(1, 3))
    logical = draw(st.integers(1, ep * num_local + 2))
    seed = draw(st.integers(0, 2**31))
    rpn = draw(st.sampled_from([None] + [d for d in range(1, ep + 1) if ep % d == 0]))
    old, new = make_maps(np.random.default_rng(seed), layers, ep, num_local, logical)
    return old, new, ep, rpn


# ---------------------------------------------------------------------------------------
# Independent checks of a layer plan
# ---------------------------------------------------------------------------------------


def check_layer(layer, old, new, ep):
    n = old.size // ep
    slots = np.arange(old.size)
    rank = slots // n
    route = layer.route
    # Route validity: empty stays empty, unchanged slots route to themselves, others to an
    # old slot holding the right expert.
    assert np.array_equal(route < 0, new < 0)
    assert np.array_equal(old[route[new >= 0]], new[new >= 0])
    keep = (new >= 0) & (new == old)
    assert np.array_equal(route[keep], slots[keep])
    # Deliveries: every changed slot written exactly once (delivery or duplicate fill).
    written = np.concatenate([layer.dst_slot, layer.dup_dst_slot])
    changed = slots[(new >= 0) & (new != old)]
    assert np.array_equal(np.sort(written), changed)
    assert np.array_equal(old[layer.src_slot], new[layer.dst_slot])
    net = layer.is_network
    src_rank, dst_rank = layer.src_slot // n, layer.dst_slot // n
    assert np.array_equal(net, src_rank != dst_rank)
    # Each (rank, expert) that needs content gets one delivery; a network one only if the
    # rank held no copy of the expert.
    pairs = dst_rank * (new.max() + 2) + new[layer.dst_slot]
    assert np.unique(pairs).size == pairs.size
    for d, e, is_net in zip(dst_rank, new[layer.dst_slot], net):
        assert is_net == (not (old[rank == d] == e).any())
    # Duplicate fills copy a delivery of the same rank and expert.
    dup_from = layer.dst_slot[layer.dup_delivery]
    assert np.array_equal(dup_from // n, layer.dup_dst_slot // n)
    assert np.array_equal(new[dup_from], new[layer.dup_dst_slot])
    # Traffic from the route alone: distinct (receiver, expert) pairs per source rank.
    traffic = np.zeros((ep, ep), dtype=np.int64)
    moved = (new >= 0) & (route >= 0) & (route // n != rank)
    seen = set()
    for p in slots[moved]:
        key = (rank[p], new[p])
        if key not in seen:
            seen.add(key)
            traffic[route[p] // n, rank[p]] += 1
    local_writes = np.bincount(rank[(new >= 0) & (new != old)], minlength=ep) - traffic.sum(axis=0)
    traffic[np.diag_indices(ep)] = local_writes
    assert np.array_equal(layer.traffic, traffic)
    # Wire order: network deliveries first, sorted by (src rank, dst slot).
    k = layer.num_network
    assert net[:k].all() and not net[k:].any()
    assert np.array_equal(np.lexsort((layer.dst_slot[:k], src_rank[:k])), np.arange(k))
    # Rank views agree pairwise.
    for s in range(ep):
        for d, rows in layer.rank(s).send_rows.items():
            assert len(layer.rank(d).recv_rows[s]) == len(rows)


def brute_force_bottleneck(old, new, ep):
    """Smallest max network send/receive count over every choice of senders."""
    n = old.size // ep
    rank = np.arange(old.size) // n
    needs = sorted({(int(rank[p]), int(new[p])) for p in range(new.size) if new[p] >= 0 and new[p] != old[p]})
    needs = [(d, e) for d, e in needs if not (old[rank == d] == e).any()]
    recv = np.zeros(ep, dtype=np.int64)
    options = []
    for d, e in needs:
        recv[d] += 1
        options.append(sorted({int(r) for r in rank[old == e]}))
    best = None
    for choice in itertools.product(*options):
        send = np.bincount(np.array(choice, dtype=np.int64), minlength=ep) if choice else np.zeros(ep, dtype=np.int64)
        value = int(max(send.max(initial=0), recv.max(initial=0)))
        best = value if best is None else min(best, value)
    return 0 if best is None else best


def exact_min_max_load(item_layer, pair_item, pair_rank, ep):
    """Per layer, smallest maximum load: capacity-expanded bipartite matching (Kuhn), test reference."""

    def feasible(items, cands, cap):
        match = {}

        def place(i, seen):
            for r in cands[i]:
                for c in range(cap):
                    slot = (r, c)
                    if slot in seen:
                        continue
                    seen.add(slot)
                    if slot not in match or place(match[slot], seen):
                        match[slot] = i
                        return True
            return False

        return all(place(i, set()) for i in items)

    result = {}
    for layer in np.unique(item_layer):
        items = np.flatnonzero(item_layer == layer).tolist()
        cands = {i: sorted(set(pair_rank[pair_item == i].tolist())) for i in items}
        cap = 0
        while not feasible(items, cands, cap):
            cap += 1
        result[int(layer)] = cap
    return result


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(map_cases(), st.sampled_from(["balanced", "vllm"]), st.sampled_from([False, True, "pair", "expert"]))
def test_plan_properties(case, policy, rounds):
    old, new, ep, rpn = case
    if policy == "vllm":
        rpn = None
    plan = plan_rearrangement(old, new, ep, sender_policy=policy, ranks_per_node=rpn, rounds=rounds)
    assert plan.num_layers == old.shape[0]
    for l, layer in enumerate(plan.layers):
        check_layer(layer, old[l], new[l], ep)
        if rounds:
            check_rounds(layer, "pair" if rounds is True else rounds)


@settings(max_examples=150, deadline=None)
@given(map_cases())
def test_balanced_never_worse_than_vllm(case):
    old, new, ep, _ = case
    balanced = plan_rearrangement(old, new, ep)
    vllm = plan_rearrangement(old, new, ep, sender_policy="vllm")
    assert (balanced.bottlenecks <= vllm.bottlenecks).all()
    assert balanced.network_copies == vllm.network_copies  # senders change, receivers do not


@settings(max_examples=120, deadline=None)
@given(map_cases(max_ep=4, max_local=3))
def test_balanced_matches_brute_force(case):
    old, new, ep, _ = case
    plan = plan_rearrangement(old, new, ep)
    for l, layer in enumerate(plan.layers):
        assert layer.max_rank_load() == brute_force_bottleneck(old[l], new[l], ep)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(2, 8),
    st.integers(1, 40),
    st.integers(0, 2**31),
)
def test_balance_assignment_is_min_max(layers, ep, items, seed):
    """With target 0 the balancer reaches the exact smallest maximum load (max-flow reference)."""
    rng = np.random.default_rng(seed)
    item_layer = np.sort(rng.integers(0, layers, items))
    cand = [np.unique(rng.integers(0, ep, rng.integers(1, 4))) for _ in range(items)]
    pair_item = np.repeat(np.arange(items), [c.size for c in cand])
    pair_rank = np.concatenate(cand)
    start = np.cumsum([c.size for c in cand]) - np.array([c.size for c in cand])
    choice = start.copy()  # everyone on its first candidate: a bad start
    out = balance_assignment(item_layer, pair_item, pair_rank, choice, np.zeros(layers, dtype=np.int64), layers, ep)
    assert (pair_item[out] == np.arange(items)).all()
    load = np.zeros((layers, ep), dtype=np.int64)
    np.add.at(load, (item_layer, pair_rank[out]), 1)
    exact = exact_min_max_load(item_layer, pair_item, pair_rank, ep)
    for layer, value in exact.items():
        assert load[layer].max() == value


def test_balanced_beats_vllm_on_eplb_sequence():
    seq = placement_sequence(3, 8, 64, 16, 16, seed=3)
    for t in range(1, 3):
        balanced = plan_rearrangement(seq[t - 1], seq[t], 16)
        vllm = plan_rearrangement(seq[t - 1], seq[t], 16, sender_policy="vllm")
        assert (balanced.bottlenecks <= vllm.bottlenecks).all()
        assert balanced.bottlenecks.sum() < vllm.bottlenecks.sum()


def test_all_layers_equal_single_layer_plans():
    rng = np.random.default_rng(5)
    old, new = make_maps(rng, 5, 4, 3, 9)
    plan = plan_rearrangement(old, new, 4, rounds=True)
    for l in range(5):
        single = plan_layer(old[l], new[l], 4, rounds=True)
        got = plan.layers[l]
        for name in ("route", "traffic", "src_slot", "dst_slot", "is_network", "dup_dst_slot", "dup_delivery"):
            assert np.array_equal(getattr(got, name), getattr(single, name)), name
        assert [r.tolist() for r in got.rounds] == [r.tolist() for r in single.rounds]


def test_sparse_large_ids_plan_like_dense_ones():
    rng = np.random.default_rng(11)
    old, new = make_maps(rng, 3, 4, 3, 7)
    big = 1_000_003  # sparse ids: dense tables over ids would be large without renumbering
    old_b, new_b = np.where(old >= 0, old * big + 5, -1), np.where(new >= 0, new * big + 5, -1)
    for kwargs in ({}, {"sender_policy": "vllm"}, {"ranks_per_node": 2, "rounds": True}):
        a = plan_rearrangement(old, new, 4, **kwargs)
        b = plan_rearrangement(old_b, new_b, 4, **kwargs)
        for x, y in zip(a.layers, b.layers):
            assert np.array_equal(x.route, y.route) and np.array_equal(x.src_slot, y.src_slot)
            assert np.array_equal(x.traffic, y.traffic)


def test_binary_search_lookups_match_dense_ones(monkeypatch):
    import eplb_triton.plan as plan_module

    rng = np.random.default_rng(12)
    old, new = make_maps(rng, 4, 4, 3, 10)
    dense = plan_rearrangement(old, new, 4, ranks_per_node=2)
    monkeypatch.setattr(plan_module, "_DENSE_LOOKUP_CELLS", 0)  # the path of very large maps
    searched = plan_rearrangement(old, new, 4, ranks_per_node=2)
    for x, y in zip(dense.layers, searched.layers):
        for name in ("route", "traffic", "src_slot", "dst_slot", "is_network", "dup_dst_slot", "dup_delivery"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), name


def test_with_rounds_on_restricted_plan():
    from eplb_triton.plan import with_rounds

    seq = placement_sequence(2, 2, 32, 8, 8, seed=5)
    layer = plan_rearrangement(seq[0], seq[1], 8).layers[1]
    half = np.arange(0, layer.num_deliveries, 2)
    for kind in ("pair", "expert"):
        check_rounds(with_rounds(layer.restrict(half), kind), kind)


def test_deterministic():
    seq = placement_sequence(2, 4, 32, 8, 8, seed=9)
    a = plan_rearrangement(seq[0], seq[1], 8, ranks_per_node=4, rounds=True)
    b = plan_rearrangement(seq[0], seq[1], 8, ranks_per_node=4, rounds=True)
    for x, y in zip(a.layers, b.layers):
        assert np.array_equal(x.src_slot, y.src_slot) and np.array_equal(x.dst_slot, y.dst_slot)
        assert [r.tolist() for r in x.rounds] == [r.tolist() for r in y.rounds]


# ---------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(map_cases(max_ep=6, max_local=3))
def test_ranks_per_node_prefers_same_node(case):
    """Nodes never cost bottleneck; a delivery leaves its node despite a same-node holder
    only when same-node senders alone cannot reach the best bottleneck."""
    old, new, ep, rpn = case
    if rpn is None:
        rpn = 1
    plan = plan_rearrangement(old, new, ep, ranks_per_node=rpn)
    flat = plan_rearrangement(old, new, ep)
    assert np.array_equal(plan.bottlenecks, flat.bottlenecks)
    n = old.shape[1] // ep
    for l, layer in enumerate(plan.layers):
        check_layer(layer, old[l], new[l], ep)
        k = layer.num_network
        src_rank, dst_rank = layer.src_slot[:k] // n, layer.dst_slot[:k] // n
        full, restricted, left_node = [], [], False
        for s_rank, d_rank, s in zip(src_rank, dst_rank, layer.src_slot[:k]):
            holders = np.unique(np.flatnonzero(old[l] == old[l, s]) // n)
            near = holders[holders // rpn == d_rank // rpn]
            full.append(holders)
            restricted.append(near if near.size else holders)
            left_node |= bool(near.size) and s_rank // rpn != d_rank // rpn
        if not left_node:
            continue
        items = np.zeros(k, dtype=np.int64)

        def optimum(cands):
            pair_item = np.repeat(np.arange(k), [c.size for c in cands])
            return exact_min_max_load(items, pair_item, np.concatenate(cands), ep)[0]

        target = int(layer.network_receives.max())
        assert optimum(restricted) > max(target, optimum(full))


def test_ranks_per_node_cuts_inter_node_copies():
    seq = placement_sequence(2, 8, 64, 16, 16, seed=4)
    flat = plan_rearrangement(seq[0], seq[1], 16)
    nodes = plan_rearrangement(seq[0], seq[1], 16, ranks_per_node=4)
    mask = np.kron(1 - np.eye(4, dtype=np.int64), np.ones((4, 4), dtype=np.int64))
    inter = lambda p: int((p.traffic * mask).sum())  # noqa: E731
    assert inter(nodes) < inter(flat)
    assert nodes.network_copies == flat.network_copies


# ---------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------


def check_rounds(layer, kind="pair"):
    n = layer.num_local
    k = layer.num_network
    rounds = layer.rounds
    assert rounds is not None
    got = np.sort(np.concatenate(rounds)) if rounds else np.zeros(0, dtype=np.int64)
    assert np.array_equal(got, np.arange(k))  # each network delivery in exactly one round
    src, dst = layer.src_slot // n, layer.dst_slot // n
    degree = 0
    if k:
        pairs = np.unique(src[:k] * layer.ep_size + dst[:k])
        degree = max(np.bincount(pairs // layer.ep_size).max(), np.bincount(pairs % layer.ep_size).max())
    if kind == "pair":
        assert len(rounds) == degree  # the fewest possible (Konig)
    else:
        assert len(rounds) == layer.max_rank_load()  # = the bottleneck, the fewest possible
    for r in rounds:
        assert np.array_equal(r, np.sort(r))
        pairs = np.unique(src[r] * layer.ep_size + dst[r])
        assert np.unique(pairs // layer.ep_size).size == pairs.size  # one peer per sender
        assert np.unique(pairs % layer.ep_size).size == pairs.size  # one peer per receiver
        if kind == "pair":  # whole pairs: no pair is split across rounds
            whole = np.isin(src[:k] * layer.ep_size + dst[:k], pairs)
            assert np.array_equal(np.flatnonzero(whole), r)
        else:  # one expert per sender and per receiver
            assert np.unique(src[r]).size == r.size and np.unique(dst[r]).size == r.size
        sub = layer.restrict(r)
        for rank in range(layer.ep_size):
            view = sub.rank(rank)
            assert len(view.send_rows) <= 1 and len(view.recv_rows) <= 1
    for rank in range(layer.ep_size):
        peers = layer.round_peers(rank)
        assert len(peers) == len(rounds)
        sends = [s for s, _ in peers if s >= 0]
        rows = layer.rank(rank).send_rows
        if kind == "pair":
            assert sorted(sends) == sorted(rows)
        else:  # one round per row sent
            assert sorted(sends) == sorted(p for p, r in rows.items() for _ in range(len(r)))
        # round_slices: the slices of the per-peer buffers cover each buffer exactly once,
        # and a sender's positions are its receiver's positions in the same round
        view = layer.rank(rank)
        sent = {p: [] for p in view.send_rows}
        got = {p: [] for p in view.recv_rows}
        for (send_peer, send_pos, recv_peer, recv_pos), r in zip(layer.round_slices(rank), rounds):
            if send_peer >= 0:
                sent[send_peer].extend(send_pos.tolist())
                peer_step = layer.round_slices(send_peer)[[i for i, x in enumerate(rounds) if x is r][0]]
                assert peer_step[2] == rank and np.array_equal(peer_step[3], send_pos)
            if recv_peer >= 0:
                got[recv_peer].extend(recv_pos.tolist())
        for p, rows_p in view.send_rows.items():
            assert sorted(sent[p]) == list(range(len(rows_p)))
            if kind == "expert":  # a pair's experts travel in buffer order
                assert sent[p] == list(range(len(rows_p)))
        for p, rows_p in view.recv_rows.items():
            assert sorted(got[p]) == list(range(len(rows_p)))


@pytest.mark.parametrize(
    "ep,layers,experts,redundant",
    [pytest.param(8, 4, 32, 8, id="E32+8-W8"), pytest.param(16, 2, 64, 16, id="E64+16-W16")],
)
def test_rounds_on_eplb_sequence(ep, layers, experts, redundant):
    seq = placement_sequence(2, layers, experts, redundant, ep, seed=1)
    for kind in ("pair", "expert"):
        plan = plan_rearrangement(seq[0], seq[1], ep, rounds=kind)
        for layer in plan.layers:
            check_rounds(layer, kind)
    assert plan_rearrangement(seq[0], seq[1], ep).layers[0].rounds is None


def test_round_peers_needs_rounds():
    plan = plan_rearrangement(np.array([0, 1]), np.array([1, 0]), 2)
    with pytest.raises(ValueError, match="rounds=True"):
        plan.layers[0].round_peers(0)


# ---------------------------------------------------------------------------------------
# Bad options
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        pytest.param({"sender_policy": "random"}, ValueError, "sender_policy", id="policy"),
        pytest.param({"ranks_per_node": 3}, ValueError, "divisor", id="rpn-not-divisor"),
        pytest.param({"ranks_per_node": 0}, ValueError, "divisor", id="rpn-zero"),
        pytest.param({"ranks_per_node": 2.0}, TypeError, "ranks_per_node", id="rpn-float"),
        pytest.param({"ranks_per_node": 2, "sender_policy": "vllm"}, ValueError, "balanced", id="rpn-vllm"),
        pytest.param({"rounds": "peer"}, ValueError, "rounds", id="rounds-kind"),
    ],
)
def test_bad_options(kwargs, exc, match):
    old = np.arange(8)
    with pytest.raises(exc, match=match):
        plan_rearrangement(old, old[::-1].copy(), 4, **kwargs)


def _same_view(a, b) -> bool:
    """RankPlans equal field by field (values, dtypes and per-peer order)."""
    if a.rank != b.rank or sorted(a.send_rows) != sorted(b.send_rows) or sorted(a.recv_rows) != sorted(b.recv_rows):
        return False
    pairs = [(a.send_rows[p], b.send_rows[p]) for p in a.send_rows] + [(a.recv_rows[p], b.recv_rows[p]) for p in a.recv_rows]
    pairs += [(getattr(a, f), getattr(b, f)) for f in ("local_src_rows", "local_dst_rows", "dup_src_rows", "dup_dst_rows")]
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in pairs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(map_cases())
def test_rank_views_of_all_layers_equal_one_layer_views(case):
    """The all-layers view (one numpy pass) equals each layer's own view on every rank:
    replicas, -1 slots, local moves, duplicate fills, worlds of any size."""
    old, new, ep, _ = case
    together = plan_rearrangement(old, new, ep)
    alone = plan_rearrangement(old, new, ep)
    for rank in range(ep):
        views = rank_views(together.layers, rank)
        for layer, view in zip(alone.layers, views):
            assert _same_view(view, layer._build_rank_view(rank))
        assert all(rank in layer._rank_cache for layer in together.layers)


def test_rank_views_needs_one_plan_and_a_valid_rank():
    rng = np.random.default_rng(3)
    a = plan_rearrangement(*make_maps(rng, 2, 2, 4, 8), 2)
    b = plan_rearrangement(*make_maps(rng, 2, 4, 2, 8), 4)
    with pytest.raises(ValueError, match="same ep_size and num_local"):
        rank_views([a.layers[0], b.layers[0]], 0)
    with pytest.raises(ValueError, match="out of range"):
        rank_views(a.layers, 2)


@pytest.mark.parametrize("ep,layers,num_local", [pytest.param(8, 6, 4, id="ep8-L6"), pytest.param(2, 16, 16, id="ep2-L16")])
def test_rank_views_large_worlds(ep, layers, num_local):
    rng = np.random.default_rng(ep * 100 + layers)
    old, new = make_maps(rng, layers, ep, num_local, ep * num_local - 3)  # replicas and -1 slots
    together, alone = plan_rearrangement(old, new, ep), plan_rearrangement(old, new, ep)
    for rank in range(ep):
        for layer, view in zip(alone.layers, rank_views(together.layers, rank)):
            assert _same_view(view, layer._build_rank_view(rank))


def test_single_holders_skip_the_balancing(monkeypatch):
    """Where every needed expert has one old holder the sender is forced: no balancing runs, and
    each network delivery reads the one old slot holding its expert."""
    import eplb_triton.plan as plan_mod

    calls = []
    balanced = plan_mod._balanced_choice
    monkeypatch.setattr(plan_mod, "_balanced_choice", lambda *a: calls.append(1) or balanced(*a))
    rng = np.random.default_rng(3)
    old = np.stack([rng.permutation(16) for _ in range(4)])  # no replicas: one holder each
    new = np.stack([rng.permutation(16) for _ in range(4)])
    plan = plan_mod.plan_rearrangement(old, new, 4)
    assert calls == []
    for l, layer in enumerate(plan.layers):
        net = layer.is_network
        assert net.any()
        expert = new[l, layer.dst_slot[net]]
        holder = np.argsort(old[l])[expert]  # the slot of each expert in the old map
        assert layer.src_slot[net].tolist() == holder.tolist()
    replicas = old.copy()
    replicas[:, 4] = replicas[:, 0]  # expert old[:, 0] held by ranks 0 and 1: the balancing runs
    replicas_new = replicas[:, ::-1].copy()
    plan_mod.plan_rearrangement(replicas, replicas_new, 4)
    assert calls


@pytest.mark.parametrize(
    "ep,layers,num_local,logical,policy,rounds,ranks_per_node",
    [
        pytest.param(2, 9, 4, 6, "balanced", False, None, id="W2-L9-replicas"),
        pytest.param(4, 7, 5, 12, "balanced", "pair", 2, id="W4-L7-rounds-nodes"),
        pytest.param(8, 5, 3, 20, "vllm", False, None, id="W8-L5-vllm"),
    ],
)
def test_plan_in_runs_of_layers_equals_one_run(monkeypatch, ep, layers, num_local, logical, policy, rounds, ranks_per_node):
    """plan_from_maps plans at most _PLAN_SLOTS slots at a time (small numpy temporaries); the
    layers' plans are the same as from one run over every layer (replicas, -1 slots)."""
    from map_cases import random_maps

    from eplb_triton import plan as plan_module
    from eplb_triton.maps import normalize_maps

    old, new = random_maps(np.random.default_rng(ep * 100 + layers), layers, ep, num_local, logical)
    maps = normalize_maps(old, new, ep)
    whole = plan_module._plan_all(maps.old, maps.new, ep, policy, ranks_per_node, rounds)
    for slots in (1, 2 * ep * num_local, 3 * ep * num_local):  # one layer, two and three layers per run
        monkeypatch.setattr(plan_module, "_PLAN_SLOTS", slots)
        runs = plan_module.plan_from_maps(maps, sender_policy=policy, ranks_per_node=ranks_per_node, rounds=rounds).layers
        assert len(runs) == layers
        for a, b in zip(whole, runs):
            for name in ("route", "traffic", "src_slot", "dst_slot", "is_network", "dup_dst_slot", "dup_delivery"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{name} (runs of {slots} slots)")
            if rounds:
                assert len(a.rounds) == len(b.rounds) and all(np.array_equal(x, y) for x, y in zip(a.rounds, b.rounds))

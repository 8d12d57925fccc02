"""Bad input: the same clear error on every rank, raised before any weight is touched.

Every row of issue 13's table has a test here, on spawned gloo ranks with short timeouts;
weights are compared byte for byte afterwards to show nothing was written. The input stage
itself (one process) is tested in test_inputs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb_triton import TransferWorker, plan_rearrangement, rearrange_expert_weights_inplace
from eplb_triton.comm import PeerTimeoutError
from eplb_triton.testing.launch import free_port, run_ranks
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches

SPECS = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((2,), torch.int32)]
OLD = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
NEW = np.array([[4, 5, 6, 7, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3]])


def _break(case, rank, old, new, weights):
    """Return (old, new, weights) spoiled as `case` says; some cases spoil only rank 1."""
    if case == "shape-mismatch":
        return old, new[:, :6], weights
    if case == "layer-count":
        return old, new, weights[:1]
    if case == "num-local":  # 6 slots over 2 ranks = 3 rows, but the tensors have 4
        six = np.array([[0, 1, 2, 3, 4, 5]] * 2)
        return six, six[:, ::-1].copy(), weights
    if case == "id-below-minus-one":
        new = new.copy()
        new[1, 3] = -2
        return old, new, weights
    if case == "unknown-expert":
        new = new.copy()
        new[0, 2] = 9
        return old, new, weights
    if case == "float-map":
        return old.astype(np.float32), new, weights
    if case == "rows-disagree":
        weights[1][1] = torch.empty((3, 2), dtype=torch.int32).random_(1, 99)
        return old, new, weights
    if case == "non-contiguous-rows-on-rank-1":
        if rank == 1:
            weights[0][0] = torch.empty((4, 5, 3), dtype=torch.bfloat16).transpose(1, 2)
        return old, new, weights
    if case == "different-devices":
        weights[1][1] = torch.empty((4, 2), dtype=torch.int32, device="meta")
        return old, new, weights
    if case == "budget-below-one-expert":
        return old, new, weights
    if case == "uint64-beyond-int64":
        big = old.astype(np.uint64)
        big[0, 0] = 2**63
        return big, new.astype(np.uint64), weights
    if case in ("memory-error-on-rank-1", "index-error-on-rank-1"):
        if rank == 1:  # what a huge table or odd container raised before issue 13, on one rank only
            _explode_in_check(MemoryError("Unable to allocate 1.00 TiB") if case.startswith("memory") else IndexError("list index out of range"))
        return old, new, weights
    if case == "same-bytes-other-dtype-on-rank-1":  # float16 rows have the shape and bytes of bfloat16's
        if rank == 1:
            weights[0][0] = torch.randn(4, 3, 5).to(torch.float16)
        return old, new, weights
    if case == "verify-differs-on-rank-1":
        return old, new, weights
    if case in ("pieces-differ-on-rank-1", "pieces-invalid-on-rank-1") and rank == 1:
        os.environ["EPLB_TRITON_CHUNK_BYTES"] = "256" if case.startswith("pieces-differ") else "lots"  # forked rank
    if case.startswith(("pieces-", "ranks-per-node-", "staging-", "kernel-backend-")):
        return old, new, weights
    if case == "expanded-on-rank-1":
        if rank == 1:
            weights[1][1] = torch.empty((1, 2), dtype=torch.int32).random_(1, 99).expand(4, 2)
        return old, new, weights
    if case == "maps-differ-on-rank-1":
        if rank == 1:
            new = new.copy()
            new[1] = new[1][::-1]
        return old, new, weights
    if case == "zero-layers-on-rank-1":
        return (old[:0], new[:0], []) if rank == 1 else (old, new, weights)
    raise AssertionError(case)


def _explode_in_check(exc: BaseException) -> None:
    import eplb_triton.inputs

    def explode(*args, **kwargs):
        raise exc

    eplb_triton.inputs.normalize_maps = explode  # this forked rank only


def _rank_bad_input(rank, world, case):
    weights = make_rank_weights(SPECS, 2, 4)
    fill_rank_weights(weights, OLD, rank)
    before = [[t.clone() for t in layer] for layer in weights]
    old, new, spoiled = _break(case, rank, OLD, NEW, [list(layer) for layer in weights])
    budget = 16 if case == "budget-below-one-expert" else None
    options = {"verify": rank == 1} if case == "verify-differs-on-rank-1" else {}
    if case == "ranks-per-node-differs-on-rank-1" and rank == 1:
        options = {"ranks_per_node": 1}
    if case == "staging-too-small-on-rank-1" and rank == 1:
        options = {"staging": torch.empty(8, dtype=torch.uint8)}
    if case == "kernel-backend-invalid-on-rank-1" and rank == 1:
        options = {"backend": "cuda"}
    try:
        rearrange_expert_weights_inplace(old, new, spoiled, max_buffer_bytes=budget, timeout_s=20.0, **options)
    except (ValueError, TypeError) as exc:
        error = (type(exc).__name__, str(exc))
    else:
        error = None
    unchanged = all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for la, lb in zip(weights, before) for a, b in zip(la, lb)
    )
    return error, unchanged


@pytest.mark.parametrize(
    "case,kind,message",
    [
        pytest.param("shape-mismatch", "ValueError", "differ in shape", id="maps-differ-in-shape"),
        pytest.param("layer-count", "ValueError", "expert_weights has 1 layers but the maps have 2", id="layer-count"),
        pytest.param("num-local", "ValueError", "num_physical must equal ep_size * num_local", id="num-physical"),
        pytest.param("id-below-minus-one", "ValueError", "expert id -2 < -1", id="id-below-minus-one"),
        pytest.param("unknown-expert", "ValueError", "names expert 9", id="unknown-expert"),
        pytest.param("float-map", "TypeError", "integer expert ids", id="float-map"),
        pytest.param("rows-disagree", "ValueError", "disagree on num_local", id="num-local-disagrees"),
        pytest.param("non-contiguous-rows-on-rank-1", "ValueError", "rank 1: layer 0, tensor 0: rows are not contiguous", id="non-contiguous-one-rank"),
        pytest.param("different-devices", "ValueError", "different devices", id="different-devices"),
        pytest.param("budget-below-one-expert", "ValueError", "smaller than one packed expert", id="budget-too-small"),
        pytest.param("uint64-beyond-int64", "ValueError", "expert id 9223372036854775808 at layer 0, slot 0, outside the int64 range", id="uint64-2^63"),
        pytest.param("memory-error-on-rank-1", "ValueError", "rank 1: input check failed with MemoryError: Unable to allocate", id="MemoryError-one-rank"),
        pytest.param("index-error-on-rank-1", "ValueError", "rank 1: input check failed with IndexError", id="IndexError-one-rank"),
        pytest.param("same-bytes-other-dtype-on-rank-1", "ValueError", "weight layouts differ on rank 1 (vs rank 0): rank 1 has layer 0, tensor 0: float16 (4, 3, 5) where rank 0 has layer 0, tensor 0: bfloat16 (4, 3, 5)", id="same-bytes-other-dtype-one-rank"),
        pytest.param("expanded-on-rank-1", "ValueError", "rank 1: layer 1, tensor 1: rows overlap", id="expanded-one-rank"),
        pytest.param("maps-differ-on-rank-1", "ValueError", "maps differ on rank 1 (vs rank 0): rank 1 has layer 1 new map [3 2 1 0", id="maps-differ-one-rank"),
        pytest.param("verify-differs-on-rank-1", "ValueError", "options differ on rank 1 (vs rank 0): rank 1 has verify=True where rank 0 has verify=False", id="options-differ-one-rank"),
        pytest.param("pieces-differ-on-rank-1", "ValueError", "options differ on rank 1 (vs rank 0): rank 1 has chunk_bytes=256 where rank 0 has chunk_bytes=0", id="pieces-differ-one-rank"),
        pytest.param("pieces-invalid-on-rank-1", "ValueError", "rank 1: EPLB_TRITON_CHUNK_BYTES must be an integer number of bytes, got 'lots'", id="pieces-env-invalid-one-rank"),
        pytest.param("ranks-per-node-differs-on-rank-1", "ValueError", "options differ on rank 1 (vs rank 0): rank 1 has ranks_per_node=1 where rank 0 has ranks_per_node=None", id="ranks-per-node-differs-one-rank"),
        pytest.param("staging-too-small-on-rank-1", "ValueError", "rank 1: staging holds 8 bytes, less than one packed expert", id="staging-too-small-one-rank"),
        pytest.param("zero-layers-on-rank-1", "ValueError", "maps differ on rank 1 (vs rank 0): rank 1 has maps of shape (0, 8)", id="zero-layers-one-rank"),
        pytest.param("kernel-backend-invalid-on-rank-1", "ValueError", "rank 1: backend must be one of ('auto', 'triton', 'torch'), got 'cuda'", id="kernel-backend-invalid-one-rank"),
    ],
)
def test_bad_input_same_error_everywhere_weights_unchanged(distributed, case, kind, message):
    results = distributed(2, _rank_bad_input, case)
    for rank, (error, unchanged) in enumerate(results):
        assert error is not None, f"rank {rank} raised nothing"
        assert error[0] == kind and message in error[1], f"rank {rank}: {error}"
        assert unchanged, f"rank {rank}: weights changed"
    assert results[0][0] == results[1][0], "ranks disagree on the verdict"


def test_plan_rejects_bad_ep_size():
    with pytest.raises(ValueError, match="multiple of ep_size"):
        plan_rearrangement(np.arange(6), np.arange(6), 4)
    with pytest.raises(TypeError, match="ep_size must be an int"):
        plan_rearrangement(np.arange(6), np.arange(6), 2.0)


def test_plan_accepts_torch_and_one_layer():
    old = torch.tensor([0, 1, 2, 3])
    plan = plan_rearrangement(old, torch.tensor([1, 0, 2, 2]), 2)
    assert plan.num_layers == 1
    assert plan.layers[0].route.tolist() == [1, 0, 2, 2]


# -- valid but odd input ---------------------------------------------------------------------------

BIG = 2**40


def _expert_rows(layer_map: np.ndarray, layer: int, width: int) -> dict[int, torch.Tensor]:
    """A random row per expert id of ``layer_map`` (seeded by layer and id: same on every rank)."""
    rows = {}
    for expert in np.unique(layer_map[layer_map >= 0]).tolist():
        gen = torch.Generator().manual_seed((expert * 7919 + layer) % (2**63))
        rows[expert] = torch.randn(width, generator=gen)
    return rows


def _rank_huge_ids(rank, world):
    old = np.array([[BIG + 3, BIG, -1, BIG + 9, 2**62, BIG, 5, BIG + 3]])
    new = np.array([[BIG, 2**62, BIG + 3, 5, BIG + 9, -1, BIG, BIG]])
    num_local = old.shape[1] // world
    rows = _expert_rows(old, 0, 6)
    weights = torch.full((num_local, 6), float("nan"))  # poisoned: every row below is assigned
    for row in range(num_local):
        slot = rank * num_local + row
        weights[row] = rows[int(old[0, slot])] if old[0, slot] >= 0 else torch.randn(6)
    before = weights.clone()
    rearrange_expert_weights_inplace(old, new, [[weights]], timeout_s=20.0)
    for row in range(num_local):
        expert = int(new[0, rank * num_local + row])
        expected = rows[expert] if expert >= 0 else before[row]
        assert torch.equal(weights[row], expected), (rank, row, expert)
    return True


def test_ids_near_2_pow_40_move_like_small_ones(distributed):
    assert distributed(2, _rank_huge_ids) == [True, True]


def _rank_zero_layers(rank, world):
    empty = np.zeros((0, 4 * world), dtype=np.int64)
    stats = rearrange_expert_weights_inplace(empty, empty, [], timeout_s=20.0)
    with TransferWorker([], timeout_s=20.0) as worker:
        worker.submit(torch.from_numpy(empty), torch.from_numpy(empty))
        busy = worker.busy
        worker_stats = worker.wait()
    return stats.p2p_ops, stats.layer_times_s, busy, worker_stats.p2p_ops


def test_zero_layers_is_a_no_op_on_both_apis(distributed):
    assert distributed(2, _rank_zero_layers) == [(0, [], False, 0)] * 2


# -- TransferWorker: checked at construction, bounded by timeout_s ---------------------------------


def _worker_weights(case, rank):
    good = [[torch.randn(4, 3, 5).to(torch.bfloat16), torch.randint(0, 99, (4, 2), dtype=torch.int32)]]
    if case == "none":
        return None
    if case == "bare-tensor":
        return torch.randn(4, 6)
    if case == "list-of-tensors":
        return [torch.randn(4, 6)]
    if case == "non-contiguous-rows-on-rank-1" and rank == 1:
        good[0][0] = torch.randn(4, 5, 3).to(torch.bfloat16).transpose(1, 2)
    if case == "other-dtype-on-rank-1" and rank == 1:
        good[0][0] = good[0][0].to(torch.float16)
    return good


def _rank_worker_construction(rank, world, case):
    weights = _worker_weights(case, rank)
    before = [[t.clone() for t in layer] for layer in weights] if isinstance(weights, list) and weights and isinstance(weights[0], list) else None
    backend = "cuda" if case == "kernel-backend-invalid-on-rank-1" and rank == 1 else None
    try:
        TransferWorker(weights, timeout_s=20.0, backend=backend).close()
    except (TypeError, ValueError) as exc:
        error = (type(exc).__name__, str(exc))
    else:
        error = None
    unchanged = before is None or all(torch.equal(a, b) for la, lb in zip(weights, before) for a, b in zip(la, lb))
    return error, unchanged


@pytest.mark.parametrize(
    "case,kind,message",
    [
        pytest.param("none", "TypeError", "expert_weights must be a list (one entry per layer) of lists of tensors, got NoneType", id="None"),
        pytest.param("bare-tensor", "TypeError", "got Tensor", id="bare-tensor"),
        pytest.param("list-of-tensors", "TypeError", "layer 0: expected a list or tuple of tensors", id="list-of-tensors"),
        pytest.param("non-contiguous-rows-on-rank-1", "ValueError", "rank 1: layer 0, tensor 0: rows are not contiguous", id="non-contiguous-one-rank"),
        pytest.param("other-dtype-on-rank-1", "ValueError", "weight layouts differ on rank 1 (vs rank 0): rank 1 has layer 0, tensor 0: float16", id="other-dtype-one-rank"),
        pytest.param("kernel-backend-invalid-on-rank-1", "ValueError", "rank 1: backend must be one of ('auto', 'triton', 'torch'), got 'cuda'", id="kernel-backend-invalid-one-rank"),
    ],
)
def test_worker_checks_weights_at_construction_on_every_rank(distributed, case, kind, message):
    results = distributed(2, _rank_worker_construction, case)
    for rank, (error, unchanged) in enumerate(results):
        assert error is not None and error[0] == kind and message in error[1], f"rank {rank}: {error}"
        assert unchanged, f"rank {rank}: weights changed"
    assert results[0][0] == results[1][0], "ranks disagree on the verdict"


def _rank_replaced_after_construction(rank, world):
    weights = make_rank_weights(SPECS, 2, 4)
    fill_rank_weights(weights, OLD, rank)
    with TransferWorker(weights, timeout_s=20.0) as worker:
        if rank == 1:
            weights[1][0] = weights[1][0].clone()  # the runtime re-allocates one tensor
        before = [[t.clone() for t in layer] for layer in weights]
        try:
            worker.submit(OLD, NEW)
        except ValueError as exc:
            error = str(exc)
        else:
            error = None
            worker.wait()
        busy = worker.busy
    unchanged = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for la, lb in zip(weights, before) for a, b in zip(la, lb))
    return error, busy, unchanged


def test_worker_refuses_a_tensor_replaced_after_construction_on_every_rank(distributed):
    results = distributed(2, _rank_replaced_after_construction)
    for rank, (error, busy, unchanged) in enumerate(results):
        assert error is not None and "rank 1: layer 1, tensor 0 of expert_weights was replaced" in error, f"rank {rank}: {error}"
        assert not busy and unchanged, f"rank {rank}: busy={busy}, unchanged={unchanged}"


def _rank_peer_never_constructs(rank, world, timeout_s):
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    weights = [[torch.randn(4, 6)]]
    if rank == 1:  # constructs only after rank 0 gave up: it must not go on alone either
        store.wait(["rank0-gave-up"])
    start = time.monotonic()
    try:
        TransferWorker(weights, timeout_s=timeout_s)
    except PeerTimeoutError as exc:
        outcome = (str(exc), time.monotonic() - start)
    else:
        outcome = None
    if rank == 0:
        store.set("rank0-gave-up", "1")
    # nothing was created: the next construction on every rank works and moves data
    expected = weights[0][0][[3, 2, 1, 0]].clone()
    with TransferWorker(weights, timeout_s=20.0) as worker:
        worker.submit(np.array([[3, 2, 1, 0, 7, 6, 5, 4]]), np.array([[0, 1, 2, 3, 4, 5, 6, 7]]))
        worker.wait()
    return outcome, torch.equal(weights[0][0], expected)


def test_worker_constructor_is_bounded_by_timeout_s(distributed):
    timeout_s = 1.5
    results = distributed(2, _rank_peer_never_constructs, timeout_s)
    for rank, (outcome, moved) in enumerate(results):
        assert outcome is not None, f"rank {rank}: constructed without its peer"
        message, waited = outcome
        assert f"waited {timeout_s:g} s (timeout_s) for EP rank(s) [{1 - rank}] to construct" in message
        # a hang guard, not a speed test: the group's own timeout (what blocked before) is 60 s
        assert waited < timeout_s + 15.0, f"rank {rank}: raised after {waited:.1f} s"
        assert moved, f"rank {rank}: the worker built afterwards did not move the rows"


# -- process exit right after an input error -------------------------------------------------------

def _rank_agreement_without_all_gather(rank, world):
    import torch.distributed as dist

    def forbidden(*args, **kwargs):
        raise AssertionError("the input agreement used an all-gather")

    for name in ("all_gather", "all_gather_object", "all_gather_into_tensor"):
        setattr(dist, name, forbidden)
    errors = []
    weights = [[torch.randn(4, 6)]]
    for new, verify in ((NEW[:1].astype(np.float32) if rank else NEW[:1], False), (NEW[:1], rank == 1)):
        try:
            rearrange_expert_weights_inplace(OLD[:1], new, weights, timeout_s=20.0, verify=verify)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    return errors


def test_agreement_uses_no_all_gather(distributed):
    """The failing agreement shares messages by all-reduce: all_gather_object's tensors are
    internal, so nothing could wait until gloo let go of them (see the next test)."""
    for errors in distributed(2, _rank_agreement_without_all_gather):
        assert len(errors) == 2, errors
        assert "rank 1: new_global_expert_indices must hold integer expert ids" in errors[0]
        assert "options differ on rank 1" in errors[1]


def _rank_gloo_lets_go(rank, world):
    from eplb_triton.comm import Communicator

    comm = Communicator.from_group(None)
    held = 0
    for attempt in range(200):
        values = torch.zeros(world, 8, dtype=torch.int64)
        values[rank] = attempt
        references = values._use_count()
        comm.all_reduce_max(values, timeout_s=None if attempt % 2 else 20.0)
        held += values._use_count() > references  # gloo's worker thread still holds it
    return held


@pytest.mark.skipif(not hasattr(torch.Tensor, "_use_count"), reason="this torch has no Tensor._use_count")
def test_gloo_all_reduce_returns_after_gloo_let_go_of_the_tensor(distributed):
    """The cause of the exit abort: gloo's worker thread drops its reference to a collective's
    tensor after waking the caller (about 1 call in 3 returned first, measured), and that drop
    takes the GIL; at interpreter exit that kills the thread and aborts the process. The
    library's collectives wait for the drop."""
    assert distributed(2, _rank_gloo_lets_go) == [0, 0]


_EXIT_SCRIPT = textwrap.dedent(
    """
    import datetime, sys
    import numpy as np, torch, torch.distributed as dist
    from eplb_triton import rearrange_expert_weights_inplace
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    old = np.arange(8)[None]
    new = old[:, ::-1].copy().astype(np.float32 if rank == 1 else np.int64)
    try:
        rearrange_expert_weights_inplace(old, new, [[torch.randn(4, 6)]], timeout_s=20.0)
    except TypeError as exc:
        print(f"rank {rank}: {exc}")
    # no destroy_process_group(): the interpreter's own teardown must not abort
    """
)


def test_exit_right_after_an_input_error_does_not_abort():
    """Before issue 13 a process that exited right after an input error aborted in about 1
    of 3 runs ("terminate called without an active exception": gloo's worker thread taking
    the GIL during interpreter exit, see the test above). Separate processes, because the
    abort is in the interpreter's exit (forked test ranks leave through os._exit). The abort
    is a race: a regression fails here in most runs, not all; the two tests above are the
    deterministic guards."""
    for attempt in range(4):
        port = str(free_port())
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _EXIT_SCRIPT, str(rank), port], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            for rank in range(2)
        ]
        outputs = [proc.communicate(timeout=120)[0].decode() for proc in procs]
        for rank, (proc, output) in enumerate(zip(procs, outputs)):
            assert f"rank {rank}: rank 1: new_global_expert_indices must hold integer expert ids" in output, output
            assert proc.returncode == 0, f"attempt {attempt}, rank {rank}: exit code {proc.returncode}\n{output}"


# -- fuzz: one rank's input perturbed at random --------------------------------------------------

PERTURBATIONS = [
    "map-slot", "map-float", "map-uint64", "map-drop-slot", "map-extra-layer", "map-3d",
    "weights-dtype", "weights-shape", "weights-transpose", "weights-expand", "weights-drop-tensor",
    "weights-drop-layer", "weights-not-a-tensor", "weights-meta", "weights-shared",
    "option-verify", "option-budget", "option-rounds", "option-timeout", "option-bad-timeout",
]


@st.composite
def perturbations(draw):
    return {
        "kind": draw(st.sampled_from(PERTURBATIONS)),
        "rank": draw(st.integers(0, 1)),
        "which": draw(st.sampled_from(["old", "new"])),
        "layer": draw(st.integers(0, 1)),
        "slot": draw(st.integers(0, 7)),
        "tensor": draw(st.integers(0, 1)),
        "value": draw(st.one_of(st.integers(-3, 12), st.sampled_from([2**40, 2**62, 2**63 - 1]))),
        "dtype": draw(st.sampled_from([torch.float16, torch.int16, torch.uint8, torch.float32])),
    }


def _perturb(p, maps, weights, options):
    """Apply perturbation ``p`` (one rank's) to its maps, weights or options, in place."""
    kind, name = p["kind"], p["which"]
    if kind == "map-slot":
        maps[name] = maps[name].copy()
        maps[name][p["layer"], p["slot"]] = p["value"]
    elif kind == "map-float":
        maps[name] = maps[name].astype(np.float64)
    elif kind == "map-uint64":
        maps[name] = maps[name].astype(np.uint64)
        maps[name][p["layer"], p["slot"]] = 2**63 + p["slot"]
    elif kind == "map-drop-slot":
        maps[name] = maps[name][:, :-1]
    elif kind == "map-extra-layer":
        maps[name] = np.concatenate([maps[name], maps[name][:1]])
    elif kind == "map-3d":
        maps[name] = maps[name][None]
    elif kind == "weights-dtype":  # same shape, maybe the same bytes per row
        t = weights[p["layer"]][p["tensor"]]
        weights[p["layer"]][p["tensor"]] = torch.zeros(t.shape, dtype=p["dtype"]).random_(0, 100)
    elif kind == "weights-shape":
        t = weights[p["layer"]][p["tensor"]]
        weights[p["layer"]][p["tensor"]] = torch.zeros((t.shape[0], 2 * t[0].numel()), dtype=t.dtype)
    elif kind == "weights-transpose":
        t = weights[p["layer"]][0]  # (4, 3, 5) -> same shape, rows not contiguous
        weights[p["layer"]][0] = t.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "weights-expand":
        t = weights[p["layer"]][p["tensor"]]
        weights[p["layer"]][p["tensor"]] = t[:1].expand(t.shape)
    elif kind == "weights-drop-tensor":
        weights[p["layer"]].pop(p["tensor"])
    elif kind == "weights-drop-layer":
        weights.pop(p["layer"])
    elif kind == "weights-not-a-tensor":
        weights[p["layer"]][p["tensor"]] = weights[p["layer"]][p["tensor"]].tolist()
    elif kind == "weights-meta":
        t = weights[p["layer"]][p["tensor"]]
        weights[p["layer"]][p["tensor"]] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    elif kind == "weights-shared":
        weights[1 - p["layer"]][p["tensor"]] = weights[p["layer"]][p["tensor"]]
    elif kind == "option-verify":
        options["verify"] = True
    elif kind == "option-budget":
        options["max_buffer_bytes"] = 1 << (p["slot"] + 10)
    elif kind == "option-rounds":
        options["rounds"] = ["pair", "expert", True][p["slot"] % 3]
    elif kind == "option-timeout":  # not something ranks must agree on
        options["timeout_s"] = 5.0 + p["slot"]
    elif kind == "option-bad-timeout":
        options["timeout_s"] = [-1.0, 0, float("nan"), "10"][p["slot"] % 4]


def _perturbed_example(rank, world, p):
    weights = make_rank_weights(SPECS, 2, 4)
    fill_rank_weights(weights, OLD, rank)
    before = [[t.clone() for t in layer] for layer in weights]
    maps, inputs, options = {"old": OLD, "new": NEW}, [list(layer) for layer in weights], {"timeout_s": 20.0}
    if rank == p["rank"]:
        _perturb(p, maps, inputs, options)
    try:
        rearrange_expert_weights_inplace(maps["old"], maps["new"], inputs, **options)
    except (TypeError, ValueError) as exc:
        unchanged = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for la, lb in zip(weights, before) for a, b in zip(la, lb))
        return type(exc).__name__, unchanged
    # accepted (the perturbation changed nothing the ranks must agree on): it must be right
    return "ok", not row_mismatches(weights, OLD, NEW, rank)


def _fuzz_perturbations_rank(rank, world, max_examples):
    import torch.distributed as dist

    def share(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    if rank != 0:
        while (p := share(None)) is not None:
            dist.all_gather_object([None] * world, _perturbed_example(rank, world, p))
        return None

    seen = []

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(perturbations())
    def check(p):
        share(p)
        verdicts = [None] * world
        dist.all_gather_object(verdicts, _perturbed_example(0, world, p))
        seen.append(verdicts[0][0])
        assert all(v[0] == verdicts[0][0] for v in verdicts), (p, verdicts)  # same class everywhere
        assert all(ok for _, ok in verdicts), (p, verdicts)  # nothing written / right result

    try:
        check()
    finally:
        share(None)
    return seen


def test_fuzz_one_rank_perturbed_same_error_class_everywhere():
    seen = run_ranks(2, _fuzz_perturbations_rank, 150, backend="gloo", timeout_s=300.0, group_timeout_s=60.0)[0]
    assert len(seen) >= 75 and {"ok", "ValueError", "TypeError"} <= set(seen), seen

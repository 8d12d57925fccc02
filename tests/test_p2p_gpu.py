"""The p2p transport on two GPUs: symmetric memory, copy-engine pulls, device barriers.

Two NCCL ranks (one process per GPU, NVLink multicast off in every process). In order:

* ``test_p2p_layers_one_by_one``: the transport's building blocks alone (symmetric memory
  present, rendezvous, a barrier, one pull of a peer's bytes), each step logged, so a failure
  says which step broke before the library paths are tried;
* both APIs with ``transport="p2p"`` on random maps (replicas, empty slots) for several
  weight layouts (odd row bytes, 3-D rows, fp8 weights with fp32 scales, mixed layouts per
  layer) and budgets (several staging passes), with and without ``verify``: byte for byte
  equal to the expected experts and to the NCCL transport's result;
* a corrupted message with ``verify``: ``ChecksumMismatchError`` on every rank, layers whole;
* a peer that stalls past ``timeout_s``: ``PeerTimeoutError`` naming the layer, within a bound;
* creating and closing several p2p workers does not grow device memory.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from functools import partial

import numpy as np
import pytest
import torch

from eplb_triton.testing.launch import run_ranks
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches
from map_cases import packed_expert_bytes, random_maps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

WORLD = 2
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FP8 = getattr(torch, "float8_e4m3fn", torch.uint8)

ODD = [TensorSpec((3, 5), torch.bfloat16), TensorSpec((7,), torch.float32)]  # 30 and 28 bytes a row
THREE_D = [TensorSpec((96, 70), torch.bfloat16), TensorSpec((33, 17, 3), torch.uint8)]
FP8_SCALED = [TensorSpec((64, 112), FP8), TensorSpec((64, 112), FP8), TensorSpec((2, 7), torch.float32)]

# (id, per-layer specs, layers, num_local, logical experts, budget in packed experts or None, verify)
CONFIGS = [
    ("odd-L3-N6", [ODD] * 3, 3, 6, 9, None, False),
    ("3d-L4-N8-budget3", [THREE_D] * 4, 4, 8, 12, 3, False),
    ("fp8-L3-N8-verify", [FP8_SCALED] * 3, 3, 8, 11, None, True),
    ("mixed-L3-N6-budget2-verify", [ODD, THREE_D, FP8_SCALED], 3, 6, 8, 2, True),
    # room for stacks: consecutive layers share one pull per peer (eplb_triton.stacked)
    ("odd-L6-N6-stacked", [ODD] * 6, 6, 6, 9, 1000, False),
]


@pytest.fixture(autouse=True)
def _no_multicast(monkeypatch):
    for name, value in NCCL_ENV.items():
        monkeypatch.setenv(name, value)  # inherited by the spawned ranks


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank-process %(process)d %(name)s: %(message)s")
    logging.getLogger("eplb_triton.p2p").setLevel(logging.DEBUG)


# -- the building blocks --------------------------------------------------------------------
def _rank_layers_one_by_one(rank, world):
    _log_to_stderr()
    from eplb_triton import p2p
    from eplb_triton.comm import Communicator

    steps = [f"torch {torch.__version__}, device {torch.cuda.current_device()}, env " + ", ".join(
        f"{k}={os.environ.get(k)}" for k in NCCL_ENV
    )]
    symm_mem = p2p.symmetric_memory()
    steps.append(f"symmetric memory module: {'present' if symm_mem is not None else 'MISSING'}")
    comm = Communicator.from_group(None)
    device = torch.device("cuda", torch.cuda.current_device())
    transport = p2p.P2PTransport.create(comm, device, 8 << 20)
    steps.append(f"rendezvous: {transport.nbytes} bytes, signal pads {'yes' if hasattr(transport.handle, 'get_signal_pad') else 'no'}")
    mine = torch.arange(1 << 20, device=device, dtype=torch.int64).to(torch.uint8) ^ (rank + 1)
    transport.buffer[: mine.numel()].copy_(mine)
    transport.barrier()
    steps.append("barrier 1 queued")
    peer = 1 - rank
    got = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    got.copy_(transport.peer_bytes(peer, 0, got.numel()))
    transport.barrier()
    torch.cuda.synchronize()
    steps.append("pull and barrier 2 done")
    want = torch.arange(1 << 20, device=device, dtype=torch.int64).to(torch.uint8) ^ (peer + 1)
    equal = bool(torch.equal(got, want))
    steps.append(f"pulled bytes equal the peer's: {equal}")
    transport.close()
    return dict(steps=steps, equal=equal)


def test_p2p_layers_one_by_one():
    results = run_ranks(WORLD, _rank_layers_one_by_one, backend="nccl", timeout_s=75.0)
    for rank, res in enumerate(results):
        print(f"rank {rank}:\n  " + "\n  ".join(res["steps"]))
        assert res["equal"], f"rank {rank}: the pulled bytes differ from the peer's: {res['steps']}"


# -- both APIs, byte for byte ---------------------------------------------------------------
def _budget(specs_per_layer, rows, verify):
    if rows is None:
        return None
    return rows * (max(packed_expert_bytes(specs) for specs in specs_per_layer) + (16 if verify else 0))


def _bytes_of(weights):
    return [[t.contiguous().view(torch.uint8).clone() for t in layer] for layer in weights]


def _same(a, b):
    return all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


def _rank_configs(rank, world, configs):
    _log_to_stderr()
    from eplb_triton import TransferWorker, rearrange_expert_weights_inplace

    out = {}
    for name, specs, layers, num_local, logical, rows, verify in configs:
        rng = np.random.default_rng(sum(map(ord, name)))  # the same maps on both ranks
        old, new = random_maps(rng, layers, world, num_local, logical)
        budget = _budget(specs, rows, verify)
        seed = 13
        weights = lambda: make_rank_weights(specs, layers, num_local, "cuda")  # noqa: E731
        reference = weights()
        fill_rank_weights(reference, old, rank, seed)
        rearrange_expert_weights_inplace(old, new, reference, max_buffer_bytes=budget, verify=verify, transport="nccl")
        blocking = weights()
        fill_rank_weights(blocking, old, rank, seed)
        stats = rearrange_expert_weights_inplace(
            old, new, blocking, max_buffer_bytes=budget, verify=verify, transport="p2p", timeout_s=30.0
        )
        torch.cuda.synchronize()
        background = weights()
        fill_rank_weights(background, old, rank, seed)
        with TransferWorker(background, max_buffer_bytes=budget, verify=verify, transport="p2p", timeout_s=30.0) as worker:
            worker.submit(old, new)
            worker.wait()
            torch.cuda.synchronize()
            first_rows = row_mismatches(background, old, new, rank, seed)
            first_equal = _same(_bytes_of(background), _bytes_of(reference))
            # a second submit on the same worker (its buffer is reused or grown), from where the
            # first one left the rows to a shuffle of them
            state = np.where(new >= 0, new, old)
            again = np.stack([layer[np.random.default_rng(7).permutation(layer.size)] for layer in state])
            worker.submit(state, again)
            worker.wait()
            torch.cuda.synchronize()
            back_rows = row_mismatches(background, state, again, rank, seed)
        out[name] = dict(
            reference_rows=row_mismatches(reference, old, new, rank, seed),
            blocking_rows=row_mismatches(blocking, old, new, rank, seed),
            blocking_equal=_same(_bytes_of(blocking), _bytes_of(reference)),
            worker_rows=first_rows,
            worker_equal=first_equal,
            worker_back_rows=back_rows,
            moved=int(stats.total_bytes_received),
            rounds=int(stats.rounds),
            stacked=int(stats.stacked_layers),
        )
    return out


def test_p2p_equals_nccl_and_expected_on_both_apis():
    results = run_ranks(WORLD, _rank_configs, CONFIGS, backend="nccl", timeout_s=150.0)
    for rank, per_config in enumerate(results):
        for name, res in per_config.items():
            where = f"rank {rank}, {name}"
            assert res["reference_rows"] == [], f"{where}: the NCCL reference itself is wrong"
            assert res["blocking_rows"] == [] and res["blocking_equal"], f"{where}: blocking p2p {res['blocking_rows'][:6]}"
            assert res["worker_rows"] == [] and res["worker_equal"], f"{where}: worker p2p {res['worker_rows'][:6]}"
            assert res["worker_back_rows"] == [], f"{where}: second worker submit {res['worker_back_rows'][:6]}"
    assert all(res["moved"] > 0 for res in results[0].values()), "some config moved nothing over the network"
    assert results[0]["3d-L4-N8-budget3"]["rounds"] > 4, "the small budget should split layers into passes"
    assert results[0]["odd-L6-N6-stacked"]["stacked"] >= 2, "the large budget should stack layers"


# -- pushed passes: the pack kernel writes into the receivers' slots (EPLB_TRITON_P2P_PUSH=1) ---
def _rank_pushed(rank, world, cases):
    _log_to_stderr()
    from eplb_triton import rearrange_expert_weights_inplace

    out = {}
    for name, specs, (old, new), rows, pair in cases:
        os.environ["EPLB_TRITON_PAIR_LAUNCH"] = str(int(pair))
        layers, num_local = old.shape[0], old.shape[1] // world
        budget = _budget([specs], rows, False)
        reference = make_rank_weights(specs, layers, num_local, "cuda")
        fill_rank_weights(reference, old, rank, 3)
        os.environ["EPLB_TRITON_DIRECT_SENDS"] = "0"
        packed = rearrange_expert_weights_inplace(old, new, reference, max_buffer_bytes=budget, transport="nccl")
        weights = make_rank_weights(specs, layers, num_local, "cuda")
        fill_rank_weights(weights, old, rank, 3)
        stats = rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=budget, transport="p2p", timeout_s=30.0)
        torch.cuda.synchronize()
        out[name] = dict(
            rows=row_mismatches(weights, old, new, rank, 3),
            equal=_same(_bytes_of(weights), _bytes_of(reference)),
            ops=(int(stats.p2p_ops), int(packed.p2p_ops)),
            overlapped=int(stats.overlapped_layers),
        )
    return out


def test_p2p_pushed_passes_are_bit_exact():
    """Pushed passes (the default): each sender's pack kernel writes its messages into the
    receivers' slots over NVLink. Rotations with local moves, replicas and empty slots, odd
    rows, 3-D rows and fp8 with scales, in two slots (default budget) and in one (a budget of 3
    experts); the bytes equal the NCCL transport's packed result. In two slots each layer's
    unpack and the next layer's pack are one launch (move_rows_pair_kernel; counted as
    overlapped), or two with ``EPLB_TRITON_PAIR_LAUNCH=0``."""
    from map_cases import rotation_maps

    cases = [
        ("odd-default", ODD, rotation_maps(4, WORLD, 6, 2), None, True),
        ("odd-default-two-launches", ODD, rotation_maps(4, WORLD, 6, 2), None, False),
        ("3d-default", THREE_D, rotation_maps(3, WORLD, 8, 3), None, True),
        ("fp8-default", FP8_SCALED, rotation_maps(4, WORLD, 8, 1), None, True),
        ("fp8-one-slot", FP8_SCALED, rotation_maps(3, WORLD, 6, 1), 3, True),
    ]
    results = run_ranks(WORLD, _rank_pushed, cases, backend="nccl", timeout_s=150.0)
    for rank, per_case in enumerate(results):
        for (name, specs, (old, _), rows, pair), res in zip(cases, per_case.values()):
            assert res["rows"] == [] and res["equal"], f"rank {rank}, {name}: pushed p2p {res['rows'][:6]}"
            ops, packed_ops = res["ops"]  # one pass per layer (staging for the receives only)
            assert ops == 2 * old.shape[0] <= packed_ops, f"{name}: {res['ops']} ops"
            paired = old.shape[0] - 1 if rows is None and pair else 0  # one peer: every layer but the first
            assert res["overlapped"] == paired, f"{name}: {res['overlapped']} overlapped, expected {paired}"


# -- verify catches a corrupted message ----------------------------------------------------
def _corrupt(where, **info):
    if info["rank"] == 1 and where == "in_flight" and info["layer"] == 1 and info["pass_index"] == 0:
        _, data = sorted(info["received"].items())[-1]
        data[7] ^= 0x40  # one bit of the first expert received


def _rank_corrupted(rank, world, paths):
    return {path: _corrupted(rank, world, path) for path in paths}  # a mismatch leaves the group usable


def _corrupted(rank, world, path):
    _log_to_stderr()
    from eplb_triton import TransferWorker, rearrange_expert_weights_inplace, transfer
    from test_reliability import layer_states

    specs, layers, num_local = [THREE_D] * 3, 3, 6
    old, new = random_maps(np.random.default_rng(5), layers, world, num_local, 8)
    weights = make_rank_weights(specs, layers, num_local, "cuda")
    fill_rank_weights(weights, old, rank, 3)
    error = None
    if path == "blocking":
        transfer.fault_hook = _corrupt
        try:
            rearrange_expert_weights_inplace(old, new, weights, verify=True, transport="p2p", timeout_s=30.0)
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            error = exc
        finally:
            transfer.fault_hook = None
    else:
        transfer.fault_hook = _corrupt
        job = TransferWorker(weights, verify=True, transport="p2p", timeout_s=30.0)
        try:
            job.submit(old, new)
            job.wait()
        except Exception as exc:  # noqa: BLE001
            error = exc
        finally:
            job.close()
            transfer.fault_hook = None
    torch.cuda.synchronize()
    return dict(error=None if error is None else (type(error).__name__, str(error), getattr(error, "layer", None)),
                states=layer_states(weights, old, new, rank, 3))


def test_p2p_verify_reports_a_corrupted_message_on_every_rank():
    results = run_ranks(WORLD, _rank_corrupted, ["blocking", "worker"], backend="nccl", timeout_s=90.0)
    for path in ("blocking", "worker"):
        for rank, per_path in enumerate(results):
            res = per_path[path]
            assert res["error"] is not None and res["error"][0] == "ChecksumMismatchError", (path, rank, res)
            assert "layer 1" in res["error"][1], f"{path}, rank {rank}: the error should name layer 1: {res['error']}"
            assert all(s in ("old", "new", "unchanged") for s in res["states"]), (path, rank, res["states"])
        assert results[1][path]["error"][2] == 1, results[1][path]["error"]  # the rank whose check failed
        assert results[1][path]["states"][1] in ("old", "unchanged"), (path, results[1][path]["states"])


# -- a stalled peer --------------------------------------------------------------------------
TIMEOUT_S = 3.0
REPORT_WITHIN_S = TIMEOUT_S + 5.0
STALL_S = REPORT_WITHIN_S + 2.0


def _stall(reached, where, **info):
    if where == "layer_start" and info.get("layer") == 1 and not reached:
        reached.append(time.monotonic())
    if info["rank"] == 1 and where == "before_send" and info.get("layer") == 1:
        time.sleep(STALL_S)
        raise RuntimeError("the stalled rank gives up")


def _rank_stalled(rank, world, path, report_dir):
    _log_to_stderr()
    from eplb_triton import TransferWorker, rearrange_expert_weights_inplace, transfer
    from test_reliability import layer_states

    specs, layers, num_local = [THREE_D] * 3, 3, 6
    old, new = random_maps(np.random.default_rng(8), layers, world, num_local, 8)
    weights = make_rank_weights(specs, layers, num_local, "cuda")
    budget = 2 * packed_expert_bytes(THREE_D)
    fill_rank_weights(weights, old, rank, 4)  # warm-up: mapping, kernel compilation
    if path == "blocking":
        rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=budget, transport="p2p")
    else:
        with TransferWorker(weights, max_buffer_bytes=budget, transport="p2p") as warm:
            warm.submit(old, new)
            warm.wait()
    fill_rank_weights(weights, old, rank, 4)
    torch.cuda.synchronize()
    reached: list[float] = []
    hook = partial(_stall, reached)
    error, error_at, applied = None, None, []
    if path == "blocking":
        transfer.fault_hook = hook
        try:
            rearrange_expert_weights_inplace(old, new, weights, max_buffer_bytes=budget, transport="p2p", timeout_s=TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            error, error_at = exc, time.monotonic()
        finally:
            transfer.fault_hook = None
    else:
        transfer.fault_hook = hook
        job = TransferWorker(weights, max_buffer_bytes=budget, transport="p2p", timeout_s=TIMEOUT_S)
        try:
            job.submit(old, new)
            deadline = time.monotonic() + STALL_S + 30.0
            while job.busy and time.monotonic() < deadline:
                applied += job.step()
                time.sleep(0.002)
        except Exception as exc:  # noqa: BLE001
            error, error_at = exc, time.monotonic()
        finally:
            job.close(timeout_s=3.0)
            transfer.fault_hook = None
    released = torch.cuda.current_stream().query() or _settles()
    report = dict(
        error=None if error is None else (type(error).__name__, str(error), getattr(error, "layer", None)),
        after_s=None if error_at is None or not reached else error_at - reached[0],
        states=layer_states(weights, old, new, rank, 4) if released else None,
        applied=applied,
        stream_free=released,
    )
    (report_dir / f"rank{rank}.pkl").write_bytes(pickle.dumps(report))
    return report


def _settles(seconds: float = 5.0) -> bool:
    """Whether the current stream drains within ``seconds`` (a stuck barrier would not)."""
    event = torch.cuda.Event()
    event.record()
    end = time.monotonic() + seconds
    while not event.query():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


# Failed on 2 x H200 before the release wrote the signal words by host-to-device copies: a fill_
# kernel's first launch (CUDA lazy loading) waited for the stuck barrier itself, and the survivor
# hung after naming the layer (bench/results/gpu-session-p2p-h200x2.log); passes since
# (bench/results/gpu-session-h200x2-last.log).
@pytest.mark.parametrize("path", ["blocking", "worker"])
def test_p2p_stalled_peer_times_out_naming_the_layer(tmp_path, path):
    # reports are written before teardown: a rank stuck in teardown is killed sooner
    run_ranks(WORLD, _rank_stalled, path, tmp_path, backend="nccl", timeout_s=75.0, allow_missing=True)
    reports = {r: pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD) if (tmp_path / f"rank{r}.pkl").exists()}
    assert 0 in reports, "the survivor wrote no report: it hung or crashed"
    survivor = reports[0]
    assert survivor["error"] is not None and survivor["error"][0] == "PeerTimeoutError", survivor
    if not survivor["error"][1].startswith("step agreement"):
        assert survivor["error"][2] == 1 and "layer 1" in survivor["error"][1], survivor["error"]
    assert survivor["after_s"] is not None and survivor["after_s"] < REPORT_WITHIN_S, survivor
    assert survivor["stream_free"], "the survivor's stream stayed blocked in a p2p barrier after the timeout"
    assert survivor["states"] is not None and all(s in ("old", "new", "unchanged") for s in survivor["states"]), survivor
    if path == "worker":
        assert all(layer < 1 for layer in survivor["applied"]), survivor["applied"]


# -- no leak across workers -------------------------------------------------------------------
def _rank_memory(rank, world):
    _log_to_stderr()
    from eplb_triton import TransferWorker, p2p, rearrange_expert_weights_inplace

    specs, layers, num_local = [THREE_D] * 2, 2, 8
    old, new = random_maps(np.random.default_rng(2), layers, world, num_local, 12)
    weights = make_rank_weights(specs, layers, num_local, "cuda")
    free = []
    for cycle in range(5):
        fill_rank_weights(weights, old, rank, 1)
        with TransferWorker(weights, transport="p2p") as worker:
            worker.submit(old, new)
            worker.wait()
        fill_rank_weights(weights, old, rank, 1)
        rearrange_expert_weights_inplace(old, new, weights, transport="p2p")
        p2p.release_cached()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free.append(torch.cuda.mem_get_info()[0])
    return dict(free=free, rows=row_mismatches(weights, old, new, rank, 1))


def test_p2p_workers_and_calls_release_their_memory():
    results = run_ranks(WORLD, _rank_memory, backend="nccl", timeout_s=90.0)
    for rank, res in enumerate(results):
        assert res["rows"] == []
        free = res["free"]
        lost = free[1] - free[-1]  # the first cycle may set up pools and communicators
        print(f"rank {rank}: free device memory after each cycle (MiB): {[f // 2**20 for f in free]}")
        assert lost < 64 << 20, f"rank {rank}: {lost / 2**20:.0f} MiB less free memory after 4 more p2p cycles: {free}"

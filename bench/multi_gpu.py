"""Multi-GPU validation and benchmark (issue 8): one process per GPU over NCCL, or gloo ranks on CPU.

    # a multi-GPU box (one process per GPU; NVLink multicast stays off, this script sets it):
    python bench/multi_gpu.py --backend nccl --json bench/results/multi_gpu-nccl-w$(nvidia-smi -L | wc -l).json
    # CPU smoke run (shapes scaled down automatically on gloo):
    python bench/multi_gpu.py --backend gloo --world-size 4 --quick --json /tmp/multi_gpu.json

All phases run in ONE launch of ``--world-size`` ranks, so the link peak is measured in the same
run as the transfers:

1. **correctness**: the blocking transfer (default budget, a tight ``max_buffer_bytes`` that
   forces rounds and stashes, ``verify=True``) and the :class:`TransferWorker` (default and
   tight budget) on random maps with replicas and ``-1`` slots, mixed dtypes (bf16 with odd row
   bytes, float8_e4m3fn, a 3-D uint8, float32 and an int32 per-expert scale), checked bit for bit
   with :func:`eplb_triton.testing.synthetic.row_mismatches` on every rank;
2. **link peak**: send/recv bandwidth from rank 0 to rank 1 with one large buffer (1 GiB on GPUs),
   one direction and both directions at once;
3. **end-to-end**: the four reference layer configs (``local`` experts per rank, ``moved`` of
   them received from the other ranks, spread over all peers) and the DeepSeek-V3 / Qwen3 presets
   (``make_placements``, a few layers): time per layer (slowest rank, median) and GB/s of the
   busiest rank for this library vs the per-expert baseline, and % of the link peak. Targets
   (reported, never asserted): >= 85% of the link peak; >= 3x the per-expert baseline on
   small/tiny; never slower on the large configs;
4. **background**: a TransferWorker rearranges while the main thread runs a matmul loop plus an
   ``all_reduce`` on another process group each iteration (GPU: main stream + NCCL; gloo: CPU
   matmul + gloo), calling ``step()`` between iterations: completes (no deadlock), bit-exact,
   and the slowdown of the loop's iterations vs the same loop without a transfer.

Prints a ``Machine:`` line and tables; writes JSON (``--json``; default ``$OUT/multi_gpu.json``
when ``OUT`` is set). Exit status 1 if any correctness check failed or a phase did not finish.
If a phase hangs or crashes, the phases finished before it are still written (``error`` says
what happened).

Notes: every TransferWorker here but one gets the run's shared process groups
(``transfer_group``, and a gloo ``ep_group`` for its agreements on NCCL); one correctness case
(``worker-own-groups``) lets the worker make its own. (A second worker with its own groups
once hung in its constructor at world 4 on gloo: fixed in the library by pooling process groups
instead of destroying them, with a regression test in tests/test_worker.py; sharing the groups
here only saves their set-up time.) On gloo the
"link peak" is loopback TCP between two processes and the timings of 4 ranks on 2 cores say
nothing about GPUs: only the NCCL run's numbers count for the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# NVLink multicast must stay off on the shared multi-GPU hosts (device docs); set before torch /
# NCCL is loaded here and inherited by every spawned rank.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from eplb_triton import TransferWorker, rearrange_expert_weights_inplace  # noqa: E402
from eplb_triton.testing.baseline import rearrange_per_expert  # noqa: E402
from eplb_triton.testing.balancer import make_placements  # noqa: E402
from eplb_triton.testing.shapes import LAYER_CONFIGS, PRESETS, scaled  # noqa: E402
from eplb_triton.testing.launch import run_ranks  # noqa: E402
from eplb_triton.testing.machine import machine_line  # noqa: E402
from eplb_triton.layout import ExpertLayout  # noqa: E402
from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches  # noqa: E402

BF16, FP8, U8, F32, I32 = torch.bfloat16, torch.float8_e4m3fn, torch.uint8, torch.float32, torch.int32

LARGE = ("qwen3-30b-a3b-bf16", "deepseek-v3-fp8")  # target: never slower than per-expert
SMALL = ("small-bf16", "tiny-bf16")  # target: >= 3x faster than per-expert
PRESET_NAMES = ("deepseek-v3", "qwen3-30b-a3b")
PEAK_TARGET = 0.85
SMALL_SPEEDUP_TARGET = 3.0

# correctness: odd row bytes (bf16 3x5 = 30 B), float8, a 3-D uint8, float32, an int32 scale
CHECK_SPECS_CPU = [
    TensorSpec((3, 5), BF16),
    TensorSpec((7, 9), FP8),
    TensorSpec((2, 3, 3), U8),
    TensorSpec((5,), F32),
    TensorSpec((1,), I32),
]
CHECK_SPECS_GPU = [
    TensorSpec((37, 129), BF16),
    TensorSpec((64, 129), FP8),
    TensorSpec((3, 5, 7), U8),
    TensorSpec((2, 16), F32),
    TensorSpec((1,), I32),
]


# ---------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------
def random_maps(rng: np.random.Generator, layers: int, world: int, num_local: int, empty_frac: float = 0.15):
    """Old/new maps with replicas and ``-1`` slots; new names only experts the old layer holds."""
    slots = world * num_local
    logical = max(1, (3 * slots) // 4)  # fewer experts than slots: replicas
    old = np.stack(
        [rng.permutation(np.r_[np.arange(logical), rng.integers(0, logical, slots - logical)]) for _ in range(layers)]
    ).astype(np.int64)
    old[rng.random(old.shape) < empty_frac] = -1
    for layer in range(layers):  # keep at least one expert per layer
        if (old[layer] < 0).all():
            old[layer, 0] = 0
    new = np.empty_like(old)
    for layer in range(layers):
        held = np.unique(old[layer][old[layer] >= 0])
        new[layer] = rng.choice(held, slots)
    new[rng.random(new.shape) < empty_frac] = -1
    return old, new


def budget_bytes(weights, layers: float) -> int:
    """``max_buffer_bytes`` of ``layers`` layers' local rows, packed (the library's default is 1;
    2 gives the blocking loop two staging slots on the reference configs)."""
    layout = ExpertLayout(weights[0])
    return int(layers * layout.num_local * layout.expert_bytes)


def ref_call_parser(description: str, layers: int) -> argparse.ArgumentParser:
    """A parser with the options :func:`warmed_ref_call` reads: ``--config``, ``--layers`` (default
    ``layers``) and ``--budget-layers`` (the diagnostic scripts add their own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="qwen3-30b-a3b-bf16", choices=list(LAYER_CONFIGS))
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument(
        "--budget-layers", type=float, default=None, help="max_buffer_bytes of this many layers' local rows (default: the library's)"
    )
    return parser


def warmed_ref_call(rank: int, world: int, args: dict, device, scale: int = 1):
    """The diagnostic scripts' set-up (``args``: ``config``, ``layers``, ``budget_layers``): the
    config's reference maps and weights (dimensions divided by ``scale``), ``max_buffer_bytes`` of
    ``budget_layers`` layers (None: the library's default), and three blocking calls back and
    forth (communicator set-up, kernels compiled). Returns ``weights, [old, new], budget``, the
    maps in the order the next call takes them."""
    local, moved, specs = LAYER_CONFIGS[args["config"]]
    old, new = ref_maps(args["layers"], world, local, moved)
    weights = make_rank_weights(scaled(specs, scale), args["layers"], local, device)
    fill_rank_weights(weights, old, rank, 1)
    budget = budget_bytes(weights, args["budget_layers"]) if args.get("budget_layers") else None
    maps = [old, new]
    for _ in range(3):
        rearrange_expert_weights_inplace(maps[0], maps[1], weights, max_buffer_bytes=budget)
        maps.reverse()
    return weights, maps, budget


def ref_maps(layers: int, world: int, num_local: int, moved: int):
    """Identity -> each rank's first ``moved`` rows take the experts of the same rows on the other
    ranks (row ``i`` from rank ``r + 1 + i % (world - 1)``): a permutation, so every rank sends and
    receives ``moved`` experts per layer, spread over all its peers. One rank: halves swap locally."""
    old = np.arange(world * num_local, dtype=np.int64)
    new = old.copy()
    if world == 1:
        half = moved // 2
        new[:half], new[half : 2 * half] = old[half : 2 * half], old[:half]
    else:
        for r in range(world):
            for i in range(moved):
                src = (r + 1 + i % (world - 1)) % world
                new[r * num_local + i] = old[src * num_local + i]
    return np.tile(old, (layers, 1)), np.tile(new, (layers, 1))


# ---------------------------------------------------------------------------------------------
# rank side
# ---------------------------------------------------------------------------------------------
def _device(cfg: dict) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cfg["backend"] == "nccl" else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase_correctness(rank: int, world: int, cfg: dict, device: torch.device) -> list[dict]:
    specs = CHECK_SPECS_GPU if device.type == "cuda" and not cfg["quick"] else CHECK_SPECS_CPU
    layers, num_local = (2, 5) if cfg["quick"] else (3, 6)
    seeds = range(cfg["check_seeds"])
    out = []
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)  # same maps on every rank
        old, new = random_maps(rng, layers, world, num_local)
        weights = make_rank_weights(specs, layers, num_local, device)
        expert_bytes = ExpertLayout(weights[0]).expert_bytes
        tight = 3 * (expert_bytes + 16)  # a few experts per round: rounds, chains, stashes
        cases = [
            ("sync", {}),
            ("sync-tight-budget", {"max_buffer_bytes": tight}),
            ("sync-verify", {"verify": True}),
            ("worker", {}),
            ("worker-tight-budget", {"max_buffer_bytes": tight}),
        ]
        if seed == 0:  # once per run: the worker making its own process groups (see _GROUPS)
            cases.insert(3, ("worker-own-groups", {"own_groups": True}))
        for name, kwargs in cases:
            fill_rank_weights(weights, old, rank, seed)
            _sync(device)
            dist.barrier()
            if name.startswith("worker"):
                groups = {} if kwargs.pop("own_groups", False) else _worker_groups()
                with TransferWorker(weights, **groups, **kwargs) as worker:
                    worker.submit(old, new)
                    steps = 0
                    while worker.busy:  # the serving-thread protocol: step() until all swapped
                        worker.step()
                        steps += 1
                        time.sleep(0.001)
                    worker.wait()
            else:
                rearrange_expert_weights_inplace(old, new, weights, **kwargs)
            _sync(device)
            bad = row_mismatches(weights, old, new, rank, seed)
            out.append({"case": f"{name}/seed{seed}", "rank": rank, "bad_rows": len(bad), "first_bad": bad[:3]})
        del weights
    return out


def _time_p2p(rank: int, nbytes: int, iters: int, both: bool, device: torch.device) -> float | None:
    """Seconds per message from rank 0 to 1 (and 1 to 0 at once when ``both``); other ranks idle."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_() if rank < 2 else None
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device) if rank < 2 else None

    def once(n: int) -> None:
        if rank >= 2:
            return
        peer = 1 - rank
        ops = []
        for _ in range(n):
            if rank == 0 or both:
                ops.append(dist.P2POp(dist.isend, src, peer))
            if rank == 1 or both:
                ops.append(dist.P2POp(dist.irecv, dst, peer))
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        _sync(device)

    once(1)  # warm-up: connection set-up
    dist.barrier()
    _sync(device)
    begin = time.perf_counter()
    once(iters)
    elapsed = time.perf_counter() - begin
    times = [None] * dist.get_world_size()
    dist.all_gather_object(times, elapsed)
    return max(times[:2]) / iters  # both ends must be done


def _phase_link(rank: int, world: int, cfg: dict, device: torch.device) -> dict:
    if world < 2:
        return {"nbytes": 0, "unidirectional_GBps": None, "bidirectional_GBps_per_direction": None, "note": "needs 2 ranks"}
    nbytes = cfg["link_bytes"]
    uni = _time_p2p(rank, nbytes, cfg["link_iters"], False, device)
    bi = _time_p2p(rank, nbytes, cfg["link_iters"], True, device)
    return {
        "nbytes": nbytes,
        "iters": cfg["link_iters"],
        "unidirectional_GBps": nbytes / uni / 1e9,
        "bidirectional_GBps_per_direction": nbytes / bi / 1e9,
    }


def _methods(device: torch.device) -> dict:
    methods = {
        "eplb_triton": lambda o, n, w: rearrange_expert_weights_inplace(o, n, w),
        "per-expert": lambda o, n, w: rearrange_per_expert(o, n, w),
    }
    if device.type == "cuda":  # same packed path with torch ops instead of Triton kernels
        methods["packed-torch"] = lambda o, n, w: rearrange_expert_weights_inplace(o, n, w, backend="torch")
    return methods


def _bench_layers(rank: int, cfg: dict, device: torch.device, specs, old, new, seed: int) -> dict:
    num_local = old.shape[1] // dist.get_world_size()
    weights = make_rank_weights(specs, old.shape[0], num_local, device)
    out = {}
    for name, method in _methods(device).items():
        fill_rank_weights(weights, old, rank, seed)
        current, target = old, new
        times, sent, received, ops, bad = [], [], [], [], 0
        for repeat in range(cfg["repeats"] + 1):  # pass 0 warms up (Triton compiles, NCCL connects)
            _sync(device)
            dist.barrier()
            stats = method(current, target, weights)
            bad += len(row_mismatches(weights, current, target, rank, seed))
            if repeat:
                times.append(list(stats.layer_times_s))
                sent.append(stats.total_bytes_sent)
                received.append(stats.total_bytes_received)
                ops.append(stats.p2p_ops)
            current, target = target, current
        out[name] = {
            "layer_times_s": times,  # [repeat][layer]
            "bytes_sent": int(np.mean(sent)),
            "bytes_received": int(np.mean(received)),
            "p2p_ops": int(np.mean(ops)),
            "bad_rows": bad,
        }
    del weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _phase_e2e(rank: int, world: int, cfg: dict, device: torch.device) -> dict:
    out = {}
    for name in cfg["configs"]:
        local, moved, specs = LAYER_CONFIGS[name]
        old, new = ref_maps(cfg["ref_layers"], world, local, moved)
        out[name] = {"kind": "reference", "layers": cfg["ref_layers"], "local": local, "moved": moved,
                     "result": _bench_layers(rank, cfg, device, scaled(specs, cfg["ref_scale"]), old, new, seed=3)}
    for name in cfg["presets"]:
        preset = PRESETS[name]
        old, new = make_placements(cfg["preset_layers"], preset.num_logical, world, preset.redundant_per_rank, seed=5)
        out[name] = {"kind": "preset", "layers": cfg["preset_layers"], "local": old.shape[1] // world, "moved": None,
                     "result": _bench_layers(rank, cfg, device, preset.specs(cfg["preset_scale"]), old, new, seed=5)}
    return out



def serving_loop(device: torch.device, matmul: int, allreduce_elems: int):
    """One iteration of the stand-in serving loop (4 matmuls of ``matmul``^2, then an all_reduce
    of ``allreduce_elems`` on the "serve" group, which no worker uses); returns its seconds."""
    serve_group = _GROUPS["serve"]
    dtype = BF16 if device.type == "cuda" else F32
    a = torch.randn(matmul, matmul, device=device, dtype=dtype)
    b = torch.randn(matmul, matmul, device=device, dtype=dtype) / matmul**0.5
    grad = torch.randn(allreduce_elems, device=device, dtype=dtype)

    def iteration() -> float:
        begin = time.perf_counter()
        x = a
        for _ in range(4):
            x = x @ b
        dist.all_reduce(grad, group=serve_group)
        _sync(device)
        return time.perf_counter() - begin

    return iteration

def _phase_background(rank: int, world: int, cfg: dict, device: torch.device) -> dict:
    """Worker transfer while the main thread runs matmuls + all_reduce on another group."""
    local, moved, specs = LAYER_CONFIGS[cfg["bg_config"]]
    old, new = ref_maps(cfg["bg_layers"], world, local, moved)
    weights = make_rank_weights(scaled(specs, cfg["ref_scale"]), cfg["bg_layers"], local, device)
    fill_rank_weights(weights, old, rank, seed=7)
    iteration = serving_loop(device, cfg["bg_matmul"], cfg["bg_allreduce_elems"])

    for _ in range(3):
        iteration()
    base = [iteration() for _ in range(cfg["bg_base_iters"])]
    loaded, steps_with_swaps, iters = [], 0, 0
    with TransferWorker(weights, **_worker_groups()) as worker:
        _sync(device)
        dist.barrier()
        begin = time.perf_counter()
        worker.submit(old, new)
        while worker.busy and iters < cfg["bg_max_iters"]:  # busy is agreed: same count on every rank
            loaded.append(iteration())
            iters += 1
            if worker.step():
                steps_with_swaps += 1
        stats = worker.wait()
        _sync(device)
        transfer_s = time.perf_counter() - begin
    bad = row_mismatches(weights, old, new, rank, seed=7)
    after = [iteration() for _ in range(cfg["bg_base_iters"])]  # the loop still works afterwards
    return {
        "config": cfg["bg_config"],
        "layers": cfg["bg_layers"],
        "matmul_n": cfg["bg_matmul"],
        "allreduce_elems": cfg["bg_allreduce_elems"],
        "base_iter_s": statistics.median(base),
        "loaded_iter_s": statistics.median(loaded) if loaded else None,
        "after_iter_s": statistics.median(after),
        "iters_during_transfer": iters,
        "steps_with_swaps": steps_with_swaps,
        "transfer_s": transfer_s,
        "worker_layer_time_s": statistics.median(stats.layer_times_s) if stats.layer_times_s else None,
        "bytes_sent": stats.total_bytes_sent,
        "bytes_received": stats.total_bytes_received,
        "bad_rows": len(bad),
    }


# Process groups made once per run, before any TransferWorker. Workers get them explicitly:
# constructing a second TransferWorker with its own groups (after closing the first) hung at
# world 4 on gloo here (reported; see the module's notes), and groups per worker would leak NCCL
# communicators across the many workers of one run anyway.
_GROUPS: dict = {}


def _make_groups(world: int, backend: str, device: torch.device) -> None:
    ranks = list(range(world))
    _GROUPS["transfer"] = dist.new_group(ranks, backend=backend)
    _GROUPS["control"] = dist.new_group(ranks, backend="gloo") if backend != "gloo" else None
    _GROUPS["serve"] = dist.new_group(ranks, backend=backend)
    for name in ("transfer", "serve"):  # create the NCCL communicators now, not inside a timed region
        probe = torch.zeros(1, device=device)
        dist.all_reduce(probe, group=_GROUPS[name])
    _sync(device)


def _worker_groups() -> dict:
    """TransferWorker kwargs: p2p on the shared transfer group; agreements on a CPU (gloo) group."""
    if _GROUPS["transfer"] is None:  # one rank: nothing crosses ranks
        return {}
    if _GROUPS["control"] is None:  # gloo: the world group is the control group
        return {"transfer_group": _GROUPS["transfer"]}
    return {"ep_group": _GROUPS["control"], "transfer_group": _GROUPS["transfer"]}


PHASES = {"correctness": _phase_correctness, "link": _phase_link, "e2e": _phase_e2e, "background": _phase_background}


def _rank_main(rank: int, world: int, cfg: dict) -> dict:
    device = _device(cfg)
    done = {"machine": machine_line(world_size=world, dist_backend=cfg["backend"]) if rank == 0 else None}
    if world > 1:
        _make_groups(world, cfg["backend"], device)
    else:
        _GROUPS.update(transfer=None, control=None, serve=None)
    for phase in cfg["phases"]:
        begin = time.perf_counter()
        result = PHASES[phase](rank, world, cfg, device)
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        done[phase] = gathered
        done[f"{phase}_wall_s"] = time.perf_counter() - begin
        if rank == 0 and cfg.get("partial_path"):  # what finished survives a later hang
            Path(cfg["partial_path"]).write_text(json.dumps(done, default=_jsonable))
    return done


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ---------------------------------------------------------------------------------------------
# parent side: summary
# ---------------------------------------------------------------------------------------------
def summarise_correctness(per_rank: list[list[dict]]) -> list[dict]:
    cases: dict[str, dict] = {}
    for rank_rows in per_rank:
        for row in rank_rows:
            case = cases.setdefault(row["case"], {"case": row["case"], "bad_rows": 0, "first_bad": []})
            case["bad_rows"] += row["bad_rows"]
            case["first_bad"].extend([[row["rank"], *b] for b in row["first_bad"]])
    for case in cases.values():
        case["ok"] = case["bad_rows"] == 0
        case["first_bad"] = case["first_bad"][:5]  # [rank, layer, tensor, row]
    return list(cases.values())


def summarise_e2e(per_rank: list[dict], peak_GBps: float | None) -> list[dict]:
    rows = []
    for name, entry in per_rank[0].items():
        layers = entry["layers"]
        methods = {}
        for method in entry["result"]:
            ranks = [r[name]["result"][method] for r in per_rank]
            # a layer is done when its slowest rank is: max over ranks per (repeat, layer), then median
            per_layer = np.max(np.array([r["layer_times_s"] for r in ranks]), axis=0).ravel()
            layer_s = float(np.median(per_layer))
            busiest = max(max(r["bytes_sent"], r["bytes_received"]) for r in ranks) / layers
            gbps = busiest / layer_s / 1e9 if layer_s > 0 else 0.0
            methods[method] = {
                "time_per_layer_ms": layer_s * 1e3,
                "busiest_rank_MB_per_layer": busiest / 1e6,
                "busiest_rank_GBps": gbps,
                "pct_of_link_peak": 100 * gbps / peak_GBps if peak_GBps else None,
                "p2p_ops_per_layer": sum(r["p2p_ops"] for r in ranks) / len(ranks) / layers,
                "bad_rows": sum(r["bad_rows"] for r in ranks),
            }
        base = methods["per-expert"]["time_per_layer_ms"]
        for m in methods.values():
            m["speedup_vs_per_expert"] = base / m["time_per_layer_ms"] if m["time_per_layer_ms"] > 0 else None
        ours = methods["eplb_triton"]
        targets = {}
        if ours["pct_of_link_peak"] is not None and ours["busiest_rank_MB_per_layer"] > 0:
            targets["peak"] = ours["pct_of_link_peak"] >= 100 * PEAK_TARGET
        if name in SMALL:
            targets["speedup_3x"] = ours["speedup_vs_per_expert"] >= SMALL_SPEEDUP_TARGET
        else:
            targets["not_slower"] = ours["speedup_vs_per_expert"] >= 1.0
        rows.append({"config": name, "kind": entry["kind"], "layers": layers, "local": entry["local"],
                     "moved": entry["moved"], "methods": methods, "targets_met": targets})
    return rows


def summarise_background(per_rank: list[dict]) -> dict:
    worst = max(per_rank, key=lambda r: (r["loaded_iter_s"] or 0) / r["base_iter_s"])
    return {
        **{k: worst[k] for k in ("config", "layers", "matmul_n", "allreduce_elems")},
        "completed": True,  # every rank returned: no deadlock
        "bad_rows": sum(r["bad_rows"] for r in per_rank),
        "iters_during_transfer": per_rank[0]["iters_during_transfer"],
        "transfer_s": max(r["transfer_s"] for r in per_rank),
        "base_iter_ms": 1e3 * max(r["base_iter_s"] for r in per_rank),
        "loaded_iter_ms": 1e3 * worst["loaded_iter_s"] if worst["loaded_iter_s"] else None,
        "after_iter_ms": 1e3 * max(r["after_iter_s"] for r in per_rank),
        "slowdown_worst_rank": (worst["loaded_iter_s"] / worst["base_iter_s"]) if worst["loaded_iter_s"] else None,
        "busiest_rank_MB": max(max(r["bytes_sent"], r["bytes_received"]) for r in per_rank) / 1e6,
        "per_rank": per_rank,
    }


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_report(result: dict) -> None:
    print(result["machine"])
    c = result["config"]
    print(f"backend={c['backend']} world={c['world_size']} quick={c['quick']} reference scale=1/{c['ref_scale']} "
          f"preset scale=1/{c['preset_scale']} repeats={c['repeats']}")
    if "correctness" in result:
        ok = sum(r["ok"] for r in result["correctness"])
        print(f"\ncorrectness: {ok}/{len(result['correctness'])} cases bit-exact on every rank")
        for r in result["correctness"]:
            if not r["ok"]:
                print(f"  FAILED {r['case']}: {r['bad_rows']} bad rows, first [rank, layer, tensor, row]: {r['first_bad']}")
    if "link" in result:
        link = result["link"]
        if link["unidirectional_GBps"] is None:
            print(f"\nlink peak: not measured ({link.get('note')})")
        else:
            print(f"\nlink peak rank 0 -> 1, {link['nbytes'] / 2**20:.0f} MiB message: "
                  f"{link['unidirectional_GBps']:.2f} GB/s one way, "
                  f"{link['bidirectional_GBps_per_direction']:.2f} GB/s per direction both ways")
    if "e2e" in result:
        print(f"\n{'config':<20} {'method':<13} {'ms/layer':>9} {'MB/layer':>9} {'GB/s':>8} {'% peak':>7} "
              f"{'ops/layer':>9} {'x per-exp':>9} {'bad':>4}  targets")
        for row in result["e2e"]:
            for i, (method, m) in enumerate(row["methods"].items()):
                targets = ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in row["targets_met"].items()) if i == 0 else ""
                print(f"{row['config'] if i == 0 else '':<20} {method:<13} {m['time_per_layer_ms']:>9.3f} "
                      f"{m['busiest_rank_MB_per_layer']:>9.3f} {m['busiest_rank_GBps']:>8.3f} "
                      f"{_fmt(m['pct_of_link_peak'], '.1f'):>7} {m['p2p_ops_per_layer']:>9.1f} "
                      f"{_fmt(m['speedup_vs_per_expert'], '.2f'):>9} {m['bad_rows']:>4}  {targets}")
    if "background" in result:
        b = result["background"]
        print(f"\nbackground: {b['config']} x{b['layers']} layers via TransferWorker while the main thread runs "
              f"4 matmuls {b['matmul_n']}^2 + all_reduce({b['allreduce_elems']}) per iteration on another group")
        print(f"  completed (no deadlock), bad rows {b['bad_rows']}, transfer {b['transfer_s'] * 1e3:.1f} ms over "
              f"{b['iters_during_transfer']} iterations; iteration {b['base_iter_ms']:.3f} ms alone, "
              f"{_fmt(b['loaded_iter_ms'], '.3f')} ms during the transfer (slowdown x{_fmt(b['slowdown_worst_rank'], '.2f')}, "
              f"worst rank), {b['after_iter_ms']:.3f} ms after")
    if result.get("error"):
        print(f"\nERROR: {result['error']}")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace, world: int) -> dict:
    gpu = args.backend == "nccl"
    quick = args.quick
    cfg = {
        "backend": args.backend,
        "world_size": world,
        "quick": quick,
        "phases": args.phases,
        "check_seeds": 1 if quick else 3,
        "configs": args.configs,
        "presets": args.presets,
        # gloo runs on CPU: every dimension scaled down (auto), so the run stays in seconds
        "ref_scale": args.scale or (1 if gpu else (16 if quick else 8)),
        "preset_scale": args.preset_scale or (1 if gpu else (64 if quick else 16)),
        "ref_layers": args.layers or (4 if gpu else (1 if quick else 2)),
        "preset_layers": args.preset_layers or (2 if gpu else 1),
        "repeats": args.repeats or (5 if gpu else (1 if quick else 3)),
        "link_bytes": (args.link_mib << 20) if args.link_mib else ((1 << 30) if gpu else ((4 << 20) if quick else (32 << 20))),
        "link_iters": 10 if gpu else (3 if quick else 5),
        "bg_config": "qwen3-30b-a3b-bf16",
        "bg_layers": 24 if gpu else (2 if quick else 4),  # GPU: ~3.6 GB per rank, enough loop iterations to time
        "bg_matmul": 4096 if gpu else (96 if quick else 192),
        "bg_allreduce_elems": (8 << 20) if gpu else (1 << 14),
        "bg_base_iters": 20 if gpu else (5 if quick else 10),
        "bg_max_iters": 100_000,
    }
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default: one per GPU on nccl, 2 on gloo)")
    parser.add_argument("--json", default=None, help="write the results here (default $OUT/multi_gpu.json if OUT is set)")
    parser.add_argument("--quick", action="store_true", help="fewer cases, layers and repeats (CPU smoke run)")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    parser.add_argument("--configs", nargs="*", choices=list(LAYER_CONFIGS), default=list(LAYER_CONFIGS))
    parser.add_argument("--presets", nargs="*", choices=list(PRESET_NAMES), default=list(PRESET_NAMES))
    parser.add_argument("--scale", type=int, default=None, help="divide reference tensor dims (default 1 nccl, 8/16 gloo)")
    parser.add_argument("--preset-scale", type=int, default=None, help="divide preset tensor dims (default 1 nccl, 16/64 gloo)")
    parser.add_argument("--layers", type=int, default=None, help="layers per reference config")
    parser.add_argument("--preset-layers", type=int, default=None, help="layers of each preset (default 2 nccl, 1 gloo)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per method (after one warm-up)")
    parser.add_argument("--link-mib", type=int, default=None, help="link-peak message size (default 1024 nccl, 4/32 gloo)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before stuck ranks are killed")
    args = parser.parse_args(argv)

    if args.backend == "nccl":
        if not torch.cuda.is_available():
            parser.error("--backend nccl needs CUDA GPUs; use --backend gloo on CPU")
        gpus = torch.cuda.device_count()
        world = args.world_size or gpus
        if world > gpus:
            parser.error(f"--world-size {world} > {gpus} GPUs: NCCL needs one GPU per process")
    else:
        world = args.world_size or 2
    if world < 1:
        parser.error("--world-size must be >= 1")
    cfg = build_config(args, world)
    timeout = args.timeout or (1800.0 if args.backend == "nccl" else 600.0)
    fd, partial = tempfile.mkstemp(prefix="multi_gpu_partial_", suffix=".json")
    os.close(fd)
    cfg["partial_path"] = partial
    begin = time.perf_counter()
    error = None
    try:
        per_rank = run_ranks(world, _rank_main, cfg, backend=args.backend, timeout_s=timeout, group_timeout_s=min(timeout, 600.0))
        done = per_rank[0]
    except RuntimeError as exc:  # a crash or a hang (deadlock): keep what finished before it
        error = str(exc)
        text = Path(partial).read_text()
        done = json.loads(text) if text else {"machine": None}
    finally:
        Path(partial).unlink(missing_ok=True)
    cfg.pop("partial_path")

    result: dict = {
        "machine": done.get("machine") or f"Machine: unknown ({args.backend}, world {world})",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": cfg,
        "environment": {k: os.environ.get(k) for k in MULTICAST_OFF},
        "wall_s": time.perf_counter() - begin,
        "phase_wall_s": {p: done[f"{p}_wall_s"] for p in PHASES if f"{p}_wall_s" in done},
        "phases_completed": [p for p in cfg["phases"] if p in done],
        "error": error,
    }
    if "correctness" in done:
        result["correctness"] = summarise_correctness(done["correctness"])
    if "link" in done:
        result["link"] = done["link"][0]
    if "e2e" in done:
        peak = result.get("link", {}).get("unidirectional_GBps")
        result["link_peak_GBps"] = peak
        result["e2e"] = summarise_e2e(done["e2e"], peak)
    if "background" in done:
        result["background"] = summarise_background(done["background"])
    checks = [r["ok"] for r in result.get("correctness", [])]
    checks += [m["bad_rows"] == 0 for row in result.get("e2e", []) for m in row["methods"].values()]
    if "background" in result:
        checks.append(result["background"]["bad_rows"] == 0)
    result["all_correct"] = bool(checks) and all(checks) and error is None
    print_report(result)

    out = args.json or (os.path.join(os.environ["OUT"], "multi_gpu.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, default=_jsonable))
        print(f"wrote {out}")
    return 0 if result["all_correct"] and len(result["phases_completed"]) == len(cfg["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())

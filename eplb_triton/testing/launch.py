"""Spawn N local ranks joined in one ``torch.distributed`` group (tests, demo, benchmarks).

Test and benchmark support, not part of the runtime API.

Each rank runs ``fn(rank, world_size, *args)`` in its own process; the group is always
destroyed, stragglers are killed after ``timeout_s``, and a rank's exception comes back as a
``RuntimeError`` carrying that rank's traceback.

Diagnosing a hang: with ``EPLB_TRITON_DUMP_STACKS_S=S`` set, each rank prints the stacks of all
its threads to its stderr (``faulthandler``) once it has run ``S`` seconds.
"""

from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import os
import queue as queue_lib
import socket
import time
import traceback
from typing import Any, Callable

__all__ = ["free_port", "run_ranks", "spawn_ranks"]

DUMP_STACKS_ENV = "EPLB_TRITON_DUMP_STACKS_S"  # seconds after which each rank prints its threads' stacks


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, backend, group_timeout_s, fn, args, results, start_method):
    import torch
    import torch.distributed as dist

    status = None
    dump_after = os.environ.get(DUMP_STACKS_ENV)
    if dump_after:
        faulthandler.dump_traceback_later(float(dump_after), exit=False)
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=group_timeout_s),
        )
        status = (rank, True, fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        status = (rank, False, traceback.format_exc())
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    faulthandler.cancel_dump_traceback_later()
    results.put(status)
    results.close()
    results.join_thread()
    if start_method == "fork":
        os._exit(0)  # skip the parent's atexit handlers (pytest's, say) in a forked child


def spawn_ranks(
    world_size: int, fn: Callable[..., Any], args: tuple, backend: str, group_timeout_s: float, start_method: str | None = None
) -> tuple[list, Any]:
    """Start ``world_size`` processes running ``fn(rank, world_size, *args)`` through
    :func:`_rank_main` (group set-up and teardown); returns the processes and the queue each
    puts ``(rank, ok, result or traceback)`` on. ``start_method``: as in :func:`run_ranks`."""
    if start_method is None:
        start_method = "spawn" if backend == "nccl" else "fork"
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, backend, group_timeout_s, fn, args, results, start_method),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    return procs, results


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    group_timeout_s: float = 60.0,
    start_method: str | None = None,
    allow_missing: bool = False,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes; return results by rank.

    ``start_method`` defaults to ``fork`` for gloo (fast: torch is already imported) and
    ``spawn`` for NCCL (CUDA cannot be used after fork); with ``spawn``, ``fn`` must be
    importable by name. ``allow_missing=True`` (fault tests: a rank that exits on purpose)
    returns ``None`` for ranks that exited without a result instead of raising.
    """
    procs, results = spawn_ranks(world_size, fn, args, backend, group_timeout_s, start_method)
    outcome: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue_lib.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
                continue
            outcome[rank] = (ok, value)
    finally:
        for proc in procs:
            proc.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        results.close()
    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcome.items()) if not ok]
    if failures:
        raise RuntimeError("distributed run failed:\n" + "\n".join(failures))
    missing = [r for r in range(world_size) if r not in outcome]
    if missing and allow_missing:
        return [outcome[r][1] if r in outcome else None for r in range(world_size)]
    if missing:
        raise RuntimeError(f"ranks {missing} did not finish within {timeout_s}s (exit codes {[p.exitcode for p in procs]})")
    return [outcome[r][1] for r in range(world_size)]

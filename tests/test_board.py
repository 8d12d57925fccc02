"""The worker's step board (eplb_triton.worker.board): the step agreement over shared memory.

On gloo ranks of one machine: it agrees exactly as the MAX all-reduce it replaces (min ready,
any failed, any lift) over hundreds of steps with ranks arriving at different times; it names a
rank that posts nothing within ``timeout_s`` and one whose process is gone; the file is unlinked
once mapped; a rank that cannot (or may not) map it makes every rank keep the all-reduce.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np
import pytest

from eplb_triton.comm import Communicator, PeerFailedError, PeerTimeoutError
from eplb_triton.testing.launch import run_ranks
from eplb_triton.worker.board import BOARD_ENV, SHM_DIR, StepBoard

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"needs {SHM_DIR}")

STEPS = 300


def _entries(world: int, steps: int) -> np.ndarray:
    """(steps, world, 4): ready, failed, lift, microseconds to sleep before posting."""
    rng = np.random.default_rng(world)
    out = np.zeros((steps, world, 4), dtype=np.int64)
    out[..., 0] = rng.integers(0, 50, (steps, world))
    out[..., 1] = rng.random((steps, world)) < 0.05
    out[..., 2] = rng.random((steps, world)) < 0.1
    out[..., 3] = np.where(rng.random((steps, world)) < 0.2, rng.integers(0, 3000, (steps, world)), 0)
    return out


def _rank_agree(rank, world, steps):
    board = StepBoard.create(Communicator.from_group(None), timeout_s=30.0)
    assert board is not None
    got = []
    for ready, failed, lift, sleep_us in _entries(world, steps)[:, rank].tolist():
        if sleep_us:
            time.sleep(sleep_us / 1e6)  # arrive late: the others wait on the board
        got.append(board.agree(ready, bool(failed), bool(lift), timeout_s=30.0)[:3])
    board.close()
    return got


@pytest.mark.parametrize("world", [pytest.param(2, id="W2"), pytest.param(3, id="W3"), pytest.param(4, id="W4")])
def test_board_agrees_like_the_max_all_reduce(distributed, world):
    entries = _entries(world, STEPS)
    want = [(int(e[:, 0].min()), bool(e[:, 1].any()), bool(e[:, 2].any())) for e in entries]
    for rank, got in enumerate(distributed(world, _rank_agree, STEPS)):
        assert got == want, (rank, next(i for i, (g, w) in enumerate(zip(got, want)) if g != w))


def _rank_spread(rank, world):
    board = StepBoard.create(Communicator.from_group(None))
    board.agree(1, False, False)
    if rank == 1:
        time.sleep(0.3)
    spread = board.agree(1, False, False)[3]
    board.close()
    return spread


def test_board_reports_how_far_apart_the_ranks_posted(distributed):
    for rank, spread in enumerate(distributed(2, _rank_spread)):
        assert 0.25 < spread < 5.0, (rank, spread)


def _rank_stalls(rank, world):
    board = StepBoard.create(Communicator.from_group(None), timeout_s=10.0)
    for _ in range(5):
        board.agree(3, False, False, timeout_s=10.0)
    if rank == world - 1:
        time.sleep(2.0)  # posts nothing for step 6 while the others wait 0.5 s
        return None
    begin = time.monotonic()
    try:
        board.agree(3, False, False, timeout_s=0.5)
    except PeerTimeoutError as exc:
        return type(exc).__name__, exc.peer, str(exc), time.monotonic() - begin
    return None


def test_board_names_a_rank_that_posts_nothing_within_timeout(distributed):
    results = distributed(3, _rank_stalls)
    for rank in range(2):
        name, peer, text, elapsed = results[rank]
        assert name == "PeerTimeoutError" and peer == 2 and "rank(s) [2]" in text, results[rank]
        assert 0.5 <= elapsed < 2.0, elapsed


def _rank_exits(rank, world):
    board = StepBoard.create(Communicator.from_group(None))
    for _ in range(3):
        board.agree(1, False, False)
    if rank == 1:
        os._exit(0)  # gone without a word
    begin = time.monotonic()
    try:
        board.agree(1, False, False)  # no timeout_s: only the peer's process tells
    except PeerFailedError as exc:
        return exc.peer, str(exc), time.monotonic() - begin
    return None


def test_board_without_timeout_notices_a_peer_process_gone():
    results = run_ranks(2, _rank_exits, backend="gloo", timeout_s=60.0, group_timeout_s=30.0, allow_missing=True)
    assert results[1] is None
    peer, text, elapsed = results[0]
    assert peer == 1 and "is gone" in text and elapsed < 5.0, results[0]


def _rank_files(rank, world):
    board = StepBoard.create(Communicator.from_group(None))
    result = board.agree(rank + 1, False, False)  # rank 0 posted it after unlinking
    left = glob.glob(os.path.join(SHM_DIR, "eplb_triton-step-*"))
    board.close()
    board.close()  # idempotent
    return left, result


def test_board_file_is_unlinked_once_every_rank_mapped_it(distributed):
    before = set(glob.glob(os.path.join(SHM_DIR, "eplb_triton-step-*")))
    for left, result in distributed(3, _rank_files):
        assert set(left) <= before, left  # ours is gone while the board is in use
        assert result[0] == 1


def _rank_opt_out(rank, world, who):
    if rank == who:
        os.environ[BOARD_ENV] = "0"
    return StepBoard.create(Communicator.from_group(None)) is None


@pytest.mark.parametrize("who", [pytest.param(0, id="rank0-opts-out"), pytest.param(2, id="rank2-opts-out")])
def test_board_is_agreed_off_when_one_rank_opts_out(distributed, who):
    assert distributed(3, _rank_opt_out, who) == [True] * 3


def _rank_cannot_map(rank, world):
    from eplb_triton.worker import board as board_module

    if rank == 1:
        def refuse(path, nbytes, *, create):
            raise OSError("another /dev/shm")

        board_module._map = refuse
    return StepBoard.create(Communicator.from_group(None)) is None


def test_board_is_agreed_off_when_a_rank_cannot_map_it(distributed):
    before = set(glob.glob(os.path.join(SHM_DIR, "eplb_triton-step-*")))
    assert distributed(3, _rank_cannot_map) == [True] * 3
    assert set(glob.glob(os.path.join(SHM_DIR, "eplb_triton-step-*"))) <= before  # rank 0's file removed


def test_board_refuses_a_ready_count_it_cannot_hold():
    board = StepBoard(np.zeros(16, dtype=np.uint64), None, 0, 1, [os.getpid()], [0])
    with pytest.raises(ValueError, match="ready must be"):
        board.agree(1 << 24, False, False)


def test_board_alone_agrees_with_itself():
    board = StepBoard(np.zeros(16, dtype=np.uint64), None, 0, 1, [os.getpid()], [0])
    assert board.agree(7, True, False)[:3] == (7, True, False)
    assert board.agree(2, False, True)[:3] == (2, False, True)

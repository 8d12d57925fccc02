"""bench/multi_gpu.py (issue 8's multi-GPU validation) in its gloo quick mode: 2 CPU ranks.

Runs the script as users do (a subprocess) and checks its JSON: every correctness case
bit-exact, every phase finished, the link peak measured in the same run and used for the
end-to-end rows. Speed figures are only checked for presence, never for values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "multi_gpu.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_gpu") / "multi_gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "gloo", "--world-size", "2", "--quick", "--json", str(out), "--timeout", "240"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_all_phases_finish_and_every_check_is_bit_exact(quick_run):
    result, stdout = quick_run
    assert result["error"] is None
    assert result["phases_completed"] == ["correctness", "link", "e2e", "background"]
    cases = {c["case"]: c for c in result["correctness"]}
    # sync (default, tight budget, verify) and worker (own groups, shared groups, tight budget)
    assert {name.split("/")[0] for name in cases} == {
        "sync", "sync-tight-budget", "sync-verify", "worker-own-groups", "worker", "worker-tight-budget",
    }
    assert all(c["ok"] and c["bad_rows"] == 0 for c in cases.values()), cases
    assert result["all_correct"] is True
    assert stdout.startswith("Machine: CPU") and "bit-exact on every rank" in stdout


def test_multicast_stays_off(quick_run):
    result, _ = quick_run
    assert result["environment"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def test_end_to_end_rows_use_the_link_peak_of_the_same_run(quick_run):
    result, _ = quick_run
    peak = result["link"]["unidirectional_GBps"]
    assert peak > 0 and result["link_peak_GBps"] == peak
    rows = {r["config"]: r for r in result["e2e"]}
    assert set(rows) == {"qwen3-30b-a3b-bf16", "deepseek-v3-fp8", "small-bf16", "tiny-bf16", "deepseek-v3", "qwen3-30b-a3b"}
    for name, row in rows.items():
        ours, base = row["methods"]["eplb_triton"], row["methods"]["per-expert"]
        assert ours["bad_rows"] == 0 and base["bad_rows"] == 0, name
        assert ours["busiest_rank_MB_per_layer"] > 0, name  # the maps really move data between ranks
        # the packed path posts one isend/irecv per peer, the baseline one per expert per tensor
        assert ours["p2p_ops_per_layer"] < base["p2p_ops_per_layer"], name
        assert ours["pct_of_link_peak"] == pytest.approx(100 * ours["busiest_rank_GBps"] / peak)
        assert set(row["targets_met"]) == {"peak", "speedup_3x" if name in ("small-bf16", "tiny-bf16") else "not_slower"}


def test_background_transfer_completes_bit_exact(quick_run):
    result, _ = quick_run
    bg = result["background"]
    assert bg["completed"] and bg["bad_rows"] == 0
    assert bg["busiest_rank_MB"] > 0 and bg["base_iter_ms"] > 0 and bg["slowdown_worst_rank"] is not None

"""scripts/bench_maml.py runs end to end (quick mode): every variant's meta-gradient equals the batched one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["batched", "batched_chunked", "per_task_loop", "higher", "torchopt"]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench_maml")
    out, md = tmp / "result.json", tmp / "table.md"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_maml.py"), "--quick", "--threads", "1", "--task-chunk", "1",
           "--out", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.read_text().count("|") > 20
    return json.loads(out.read_text())


def test_every_case_has_every_variant(result):
    setup = result["setup"]
    assert setup["horizon"] == 100 and setup["inner_steps"] == 1 and setup["second_order"] and setup["dtype"] == "float32"
    assert setup["task_chunk"] == 1
    cases = {(r["policy"], r["meta_batch"]) for r in result["results"]}
    assert cases == {(p, n) for p in ("mlp", "transformer") for n in setup["meta_batches"]}
    for policy, n in cases:
        rows = [r for r in result["results"] if (r["policy"], r["meta_batch"]) == (policy, n)]
        assert [r["variant"] for r in rows] == VARIANTS


def test_meta_gradients_match_and_times_are_recorded(result):
    batched = {(r["policy"], r["meta_batch"]): r["seconds"] for r in result["results"] if r["variant"] == "batched"}
    for row in result["results"]:
        if row["seconds"] is None:  # an optional library that is missing or failed: the reason is recorded
            assert row["variant"] in ("higher", "torchopt") and row["error"], row
            assert row["error"] == result["libraries"][row["variant"]].get("error", row["error"])
            continue
        assert row["seconds"] > 0 and len(row["repeats_s"]) == result["setup"]["repeats"]
        assert row["grad_matches"] and row["max_abs_diff"] <= 1e-3 * row["max_abs_grad"], row
        assert row["max_abs_grad"] > 1e-4  # a vanishing meta-gradient would make the check vacuous
        assert row["speedup_of_batched"] == pytest.approx(row["seconds"] / batched[row["policy"], row["meta_batch"]])


def test_target_and_machine_are_stated(result):
    assert "3x" in result["target"]["statement"] and "per-task loop" in result["target"]["statement"]
    assert set(result["target"]["met"]) == {f"{r['policy']} N={r['meta_batch']}" for r in result["results"]}
    for case, met in result["target"]["met"].items():
        rows = {r["variant"]: r["seconds"] for r in result["results"] if f"{r['policy']} N={r['meta_batch']}" == case}
        assert met == (rows["per_task_loop"] >= 3 * min(rows["batched"], rows["batched_chunked"]))
    assert result["target"]["all_met"] == all(result["target"]["met"].values())
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch_threads"] == 1
    assert set(result["libraries"]) == {"higher", "torchopt"}

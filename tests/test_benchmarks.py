"""The benchmark scripts run end to end (quick mode) and write the JSON their docs are made from."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import metarl
from metarl.config import build_config, save_config
from metarl.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    md = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--quick", "--out", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.read_text().count("|") > 10
    return json.loads(out.read_text())


def test_bench_envs(tmp_path):
    result = run_script("bench_envs.py", tmp_path)
    device_resident = {n for n in metarl.family_names() if not getattr(metarl.make_family(n).vec_env_cls, "host_envs", False)}
    assert {r["family"] for r in result["families"]} == device_resident
    for row in result["families"]:
        assert set(row["batched"]) == {"1", "64", "1024", "16384"} and all(v > 0 for v in row["batched"].values())
        assert set(row["sync_vector_env"]) == {"64", "1024"}
    assert set(result["gymnasium_sync_vector_env"]) == {"CartPole-v1", "Pendulum-v1"}
    assert result["machine"]["cpu_count"] >= 1


def test_bench_rollout(tmp_path):
    result = run_script("bench_rollout.py", tmp_path)
    assert {(r["policy"], r["params"]) for r in result["collect"]} == {
        (p, k) for p in ("transformer", "mlp") for k in ("shared", "per-task")} | {
        ("transformer", "per-task, 64 tasks x 16 rollouts")}
    assert all(r["env_steps_per_s"] > 0 for r in result["collect"])
    assert [r["history"] for r in result["step_vs_reencode"]] == [50, 100, 200]
    assert all(r["cached_step_ms"] > 0 and r["reencode_step_ms"] > 0 for r in result["step_vs_reencode"])


def test_reproduce_maml_quick_and_resumes(tmp_path):
    args = [sys.executable, str(ROOT / "scripts" / "reproduce_maml.py"), "--quick", "--agents", "mlp,incontext-transformer",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    mlp, rl2 = result["runs"]
    assert len(mlp["gradient_steps"]) == 4 and len(rl2["incontext_episodes"]) == 2
    assert "-11.7" in (tmp_path / "r.md").read_text()
    args[args.index("mlp,incontext-transformer")] = "mlp"
    again = subprocess.run([*args, "--seeds", "0,1"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    seed0, seed1 = result["runs"]
    assert seed0["gradient_steps"] == mlp["gradient_steps"]  # seed 0 resumed from its finished run: same numbers
    assert seed1["seed"] == 1 and seed1["gradient_steps"] != mlp["gradient_steps"]
    means = result["seed_means"]["mlp"]
    assert means["seeds"] == 2 and means["gradient_steps"][1] == (seed0["gradient_steps"][1] + seed1["gradient_steps"][1]) / 2
    assert "mlp, mean of 2 seeds" in (tmp_path / "r.md").read_text()
    changed = subprocess.run([*args, "--set", "maml.inner_lr=0.5"], capture_output=True, text=True, timeout=900)
    assert changed.returncode != 0 and "different configuration (keys ['maml'])" in changed.stderr


def load_reproduce_maml():
    spec = importlib.util.spec_from_file_location("reproduce_maml", ROOT / "scripts" / "reproduce_maml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_maml_set_overrides_and_refuses_other_runs(tmp_path):
    module = load_reproduce_maml()
    sets = module.parse_sets(["maml.task_chunk=4", "maml.adapt=heads", "eval_step_sizes=[0.5, 0.25]"])
    assert sets == {"maml.task_chunk": 4, "maml.adapt": "heads", "eval_step_sizes": [0.5, 0.25]}
    config = build_config(TrainConfig, None, {**module.PAPER, **module.AGENTS["maml-transformer"], **sets})
    assert config.maml.task_chunk == 4 and config.eval_step_sizes == (0.5, 0.25)
    for bad in ("maml.task_chunk", "=4"):
        with pytest.raises(SystemExit, match=f"KEY=VALUE, got {bad!r}"):
            module.parse_sets([bad])
    save_config(config, tmp_path / "config.json")
    module.check_same_run(tmp_path, replace(config, iterations=config.iterations + 10, progress=not config.progress))
    with pytest.raises(SystemExit, match=r"different configuration \(keys \['seed'\]\)"):
        module.check_same_run(tmp_path, replace(config, seed=config.seed + 1))
    older = json.loads((tmp_path / "config.json").read_text())
    del older["maml"]["task_chunk"]  # a run made before a config key existed still resumes
    (tmp_path / "config.json").write_text(json.dumps(older))
    module.check_same_run(tmp_path, replace(config, maml=replace(config.maml, task_chunk=None)))


def test_reproduce_maml_agent_configs_are_valid():
    module = load_reproduce_maml()
    for name, overrides in module.AGENTS.items():
        config = build_config(TrainConfig, None, {**module.PAPER, **overrides})
        assert config.batch.meta_batch == 20 and config.mlp.init == "glorot", name
    authors = build_config(TrainConfig, None, {**module.PAPER, **module.AGENTS["mlp-authors-code"]})
    assert (authors.maml.inner_lr, authors.eval_trajectories, authors.eval_step_sizes) == (0.5, 40, (0.5, 0.25))

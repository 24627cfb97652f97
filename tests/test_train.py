"""`metarl train` and the trainer: run directory, checkpoints, resume equality, interruption, bad checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metarl.checkpoint import latest_checkpoint, load_checkpoint
from metarl.config import build_config
from metarl.train import TrainConfig, make_learner, run_training
from metarl.trainer import Trainer

TINY = {"env": "PointNav", "env_options": "horizon=10", "iterations": 4, "checkpoint_every": 2, "eval_tasks": 3,
        "eval_steps": 1, "progress": False, "batch.meta_batch": 3, "batch.trajectories_per_task": 2,
        "incontext.meta_batch": 3, "incontext.trials_per_task": 1, "incontext.episodes_per_trial": 2,
        "incontext.minibatches": 1, "incontext.epochs": 2,
        "transformer.d_model": 16, "transformer.n_heads": 2, "transformer.context": 20, "mlp.hidden": (16,)}

CASES = [{"agent": "maml-mlp"}, {"agent": "maml-mlp", "outer.method": "ppo", "outer.ppo_epochs": 2},
         {"agent": "maml-transformer", "batch.episodes_per_trial": 2}, {"agent": "incontext-transformer"}]


def tiny(**overrides) -> TrainConfig:
    return build_config(TrainConfig, None, {**TINY, **overrides})


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))["learner"]["policy"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_resume_equals_uninterrupted_run(case, tmp_path):
    config = tiny(**case)
    run_training(config, tmp_path / "full")
    run_training(tiny(**case, iterations=2), tmp_path / "split")
    run_training(config, tmp_path / "split", resume=True)
    full, split = final_params(tmp_path / "full"), final_params(tmp_path / "split")
    assert full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3, 4]
    assert any((tmp_path / "full" / "tb").iterdir())
    evaluation = json.loads((tmp_path / "full" / "eval.json").read_text())["results"][0]
    assert len(evaluation["gradient_steps"]) + len(evaluation["incontext_episodes"]) >= 2


def test_same_seed_same_parameters_and_different_seed_differs(tmp_path):
    run_training(tiny(agent="maml-mlp", iterations=2), tmp_path / "a")
    run_training(tiny(agent="maml-mlp", iterations=2), tmp_path / "b")
    run_training(tiny(agent="maml-mlp", iterations=2, seed=1), tmp_path / "c")
    a, b, c = (final_params(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class Interrupting:
    """Wraps a learner; raises `error` when asked for iteration `at`."""

    def __init__(self, learner, at: int, error: BaseException):
        self.learner, self.at, self.error = learner, at, error

    def __getattr__(self, name):
        return getattr(self.learner, name)

    def train_iteration(self, iteration):
        if iteration == self.at:
            raise self.error
        return self.learner.train_iteration(iteration)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("sub-env 3 raised in step")])
def test_interruption_saves_a_checkpoint(error, tmp_path):
    config = tiny(agent="maml-mlp")
    learner = Interrupting(make_learner(config), at=1, error=error)
    trainer = Trainer(learner, tmp_path, iterations=4, checkpoint_every=10, progress=False)
    with pytest.raises(type(error)):
        trainer.run()
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["iteration"] == 1
    assert all(torch.equal(v, learner.learner.policy.state_dict()[k]) for k, v in state["learner"]["policy"].items())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarl", *args], capture_output=True, text=True, timeout=600)


def cli_flags(**values) -> list[str]:
    flags = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-", 1).replace("--no-", "--no-", 1))
        else:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return flags


def test_cli_train_writes_run_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    flags = cli_flags(**{**TINY, "iterations": 2, "progress": False})
    out = run_cli("train", "--agent", "maml-mlp", "--run-dir", str(run_dir), *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| after 1 |" in out.stdout and "| agent | test |" in out.stdout
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["agent"] == "maml-mlp" and saved["batch"]["meta_batch"] == 3
    again = run_cli("train", "--agent", "maml-mlp", "--run-dir", str(run_dir), *flags)
    assert again.returncode == 2 and "--resume" in again.stderr
    more = run_cli("train", "--resume", str(run_dir), "--iterations", "3")
    assert more.returncode == 0, more.stderr[-2000:]
    assert load_checkpoint(latest_checkpoint(run_dir))["iteration"] == 3
    assert json.loads((run_dir / "config.json").read_text())["iterations"] == 3  # what `metarl evaluate` reads


def test_cli_corrupt_checkpoint_is_a_clear_error_not_a_fresh_start(tmp_path):
    run_dir = tmp_path / "run"
    run_training(tiny(agent="maml-mlp", iterations=2), run_dir)
    ckpt = latest_checkpoint(run_dir)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    out = run_cli("train", "--resume", str(run_dir), "--iterations", "3")
    assert out.returncode == 2
    assert str(ckpt.name) in out.stderr and "truncat" in out.stderr.lower()


def test_cli_config_file_and_bad_values(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"agent": "maml-mlp", "batch": {"meta_batch": 5}, "oops": 1}))
    out = run_cli("train", "--config", str(cfg), "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "oops" in out.stderr
    out = run_cli("train", "--env", "NoSuchEnv", "--run-dir", str(tmp_path / "r2"))
    assert out.returncode == 2 and "unknown task family 'NoSuchEnv'" in out.stderr
    out = run_cli("train", "--help")
    assert "Tasks per meta-iteration" in out.stdout and "--maml.inner-lr" in out.stdout

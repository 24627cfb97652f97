"""`evaluate_adaptation`, the report writers and `metarl evaluate`: intervals, determinism, plots, held-out tasks."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

import metarl
from metarl.agents.maml import MAMLConfig
from metarl.agents.maml_learner import MAMLLearner, MetaBatchConfig
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.cli import main
from metarl.config import build_config
from metarl.evaluation import AdaptationResult, CurveStats, evaluate_adaptation, heldout_tasks
from metarl.report import csv_rows, load_results, plot, table, write_report
from metarl.seeding import iteration_generator
from metarl.tasks import split_bucket
from metarl.train import TrainConfig, run_training

TINY = {"env": "PointNav", "env_options": "horizon=10", "agent": "maml-mlp", "iterations": 2, "checkpoint_every": 1,
        "eval_tasks": 3, "eval_steps": 1, "progress": False, "batch.meta_batch": 2, "batch.trajectories_per_task": 2,
        "mlp.hidden": (8,)}


def tiny_agent(seed: int = 0) -> MAMLLearner:
    family = metarl.make_family("PointNav", horizon=10)
    torch.manual_seed(seed)
    policy = MLPPolicy(family.observation_space, family.action_space, MLPConfig(hidden=(8,)))
    return MAMLLearner(policy, family, batch=MetaBatchConfig(meta_batch=2, trajectories_per_task=2), seed=seed)


def test_confidence_interval_matches_hand_computation():
    s = CurveStats.of([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # sample std, ddof 1
    half = 3.182446305284263 * std / 2  # t_{0.975, 3} * std / sqrt(4)
    assert s.n == 4 and s.mean == 2.5 and s.std == pytest.approx(std, abs=1e-12)
    assert s.ci95_low == pytest.approx(2.5 - half, abs=1e-9) and s.ci95_high == pytest.approx(2.5 + half, abs=1e-9)
    assert s.ci95 == pytest.approx(2.0542602568, abs=1e-9)
    one = CurveStats.of([7.0])
    assert (one.mean, one.std, one.ci95_low, one.ci95_high) == (7.0, 0.0, 7.0, 7.0)


def test_same_seed_same_numbers_and_result_round_trips():
    a = evaluate_adaptation(tiny_agent(), tiny_agent().family, "test", num_tasks=3, steps=2, seed=5)
    b = evaluate_adaptation(tiny_agent(), tiny_agent().family, "test", num_tasks=3, steps=2, seed=5)
    c = evaluate_adaptation(tiny_agent(), tiny_agent().family, "test", num_tasks=3, steps=2, seed=6)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert a.to_dict()["per_task"] != c.to_dict()["per_task"]
    assert len(a.gradient_steps) == 3 and a.incontext_episodes == ()
    assert len(a.gradient_steps_success) == 3  # PointNav: success = reaching the goal (termination)
    assert AdaptationResult.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert a.gradient_steps[1].mean == pytest.approx(sum(a.per_task["gradient_steps"][1]) / 3)


def test_trajectories_sets_each_steps_support_data_and_an_mlp_has_no_incontext_curve(monkeypatch):
    agent = tiny_agent()
    shapes, collect = [], agent._collect

    def spy(*args, **kwargs):
        traj = collect(*args, **kwargs)
        shapes.append(tuple(traj.valid.shape))
        return traj

    monkeypatch.setattr(agent, "_collect", spy)
    result = evaluate_adaptation(agent, agent.family, "test", num_tasks=3, steps=1, seed=0, trajectories=5, episodes=2)
    assert shapes == [(3, 10, 10)] * 2  # 5 trials x 2 episodes per task, before and after the step
    assert len(result.gradient_steps) == 2 and result.incontext_episodes == ()  # the MLP reads no history
    shapes.clear()
    evaluate_adaptation(agent, agent.family, "test", num_tasks=3, steps=1, seed=0)
    assert shapes == [(3, 2, 10)] * 2  # the agent's trajectories_per_task
    for bad in ({"trajectories": 0}, {"episodes": -1}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be >= 1"):
            evaluate_adaptation(agent, agent.family, "test", num_tasks=3, steps=1, **bad)


def test_step_sizes_set_each_evaluation_step(monkeypatch):
    agent = tiny_agent()
    lrs = []
    adapt = agent._adapt

    def spy(params, support, stacked=False, inner_lr=None, steps=None):
        assert steps == 1  # one gradient step per evaluation step, whatever maml.inner_steps is
        lrs.append(inner_lr)
        return adapt(params, support, stacked, inner_lr, steps)

    monkeypatch.setattr(agent, "_adapt", spy)
    base = evaluate_adaptation(agent, agent.family, "test", num_tasks=3, steps=3, seed=0)
    half = evaluate_adaptation(agent, agent.family, "test", num_tasks=3, steps=3, seed=0, step_sizes=(0.5, 0.25))
    same = evaluate_adaptation(agent, agent.family, "test", num_tasks=3, steps=3, seed=0, step_sizes=(0.1,))
    assert lrs == [None] * 3 + [0.5, 0.25, 0.25] + [0.1] * 3  # the last step size repeats
    assert same.per_task == base.per_task  # 0.1 is the agent's inner_lr
    assert half.per_task["gradient_steps"][0] == base.per_task["gradient_steps"][0]  # same data before adapting
    assert half.per_task["gradient_steps"][1] != base.per_task["gradient_steps"][1]
    with pytest.raises(ValueError, match=r"step sizes must be finite and >= 0, got \[0.5, -1.0\]"):
        evaluate_adaptation(agent, agent.family, "test", num_tasks=3, steps=1, step_sizes=(0.5, -1.0))
    meta_sgd = MAMLLearner(agent.policy, agent.family, MAMLConfig(meta_sgd=True), batch=agent.batch)
    with pytest.raises(ValueError, match="cannot override the learned Meta-SGD step sizes"):
        evaluate_adaptation(meta_sgd, agent.family, "test", num_tasks=3, steps=1, step_sizes=(0.5,))
    with pytest.raises(ValueError, match="step sizes must be finite and >= 0"):
        build_config(TrainConfig, None, {**TINY, "eval_step_sizes": (float("nan"),)})


def test_test_and_ood_tasks_are_never_training_tasks():
    family = tiny_agent().family
    result = evaluate_adaptation(tiny_agent(), family, "test", num_tasks=8, steps=0, seed=0)
    evaluated = torch.tensor(result.tasks, dtype=torch.float64)  # (8, 2) goals
    assert torch.equal(evaluated, family.flat_params(heldout_tasks(family, "test", 8, 0)))
    assert (split_bucket(evaluated) == 0).all()  # the test buckets, which `train` never samples
    trained = [family.sample(2, torch.randint(0, 2**62, (3,), generator=iteration_generator(0, i)).tolist()[0], "train")
               for i in range(20)]  # the tasks MAMLLearner.train_iteration meets in 20 iterations
    trained_goals = torch.cat([family.flat_params(t) for t in trained])
    assert (split_bucket(trained_goals) != 0).all()
    assert not (evaluated[:, None] == trained_goals[None]).all(-1).any()
    ood = torch.tensor(evaluate_adaptation(tiny_agent(), family, "ood", num_tasks=8, steps=0, seed=0).tasks)
    assert (ood.abs().max(dim=1).values > 0.5).all()  # outside the train box [-0.5, 0.5]^2


def test_report_files_plot_series_and_table(tmp_path):
    agent = tiny_agent()
    results = [evaluate_adaptation(agent, agent.family, split, num_tasks=3, steps=2, seed=0) for split in ("test", "ood")]
    paths = write_report(results, tmp_path, command="metarl evaluate RUN")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, series = plot(results)
    assert set(series) == {("test", "gradient_steps", "agent"), ("ood", "gradient_steps", "agent")}
    for r in results:
        s = series[(r.split, "gradient_steps", "agent")]
        assert s["x"] == [0.0, 1.0, 2.0] and s["mean"] == [c.mean for c in r.gradient_steps]
        assert s["low"] == [c.ci95_low for c in r.gradient_steps] and s["high"] == [c.ci95_high for c in r.gradient_steps]
    drawn = {(ax.get_title(), line.get_label()): list(line.get_ydata()) for ax in fig.axes for line in ax.get_lines()}
    assert drawn[("PointNav, ood tasks", "agent")] == [c.mean for c in results[1].gradient_steps]
    assert load_results(paths["json"]) == results
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(csv_rows(results)) == 2 * 3 * 2  # 2 splits x 3 points x (return, success)
    assert {r["split"] for r in rows} == {"test", "ood"}
    text = table(results)
    assert "| agent | test |" in text and "| agent | ood |" in text and "after 2" in text
    assert "metarl evaluate RUN" in paths["table"].read_text()
    assert any(paths["tensorboard"].iterdir())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarl", *args], capture_output=True, text=True, timeout=600)


def test_cli_evaluate_end_to_end_with_baselines(tmp_path):
    run_dir = tmp_path / "run"
    run_training(build_config(TrainConfig, None, TINY), run_dir)
    for name in ("eval.json", "eval.csv", "eval.png", "table.md"):
        assert (run_dir / name).is_file(), name
    assert {r.split for r in load_results(run_dir / "eval.json")} == {"test", "ood"}
    out = run_cli("evaluate", str(run_dir), "--split", "both", "--num-tasks", "2", "--steps", "1",
                  "--baselines", "random-init,pretrained,oracle,scratch", "--baseline-steps", "64", "--seed", "3",
                  "--trajectories", "3", "--step-sizes", "0.2,0.1")
    assert out.returncode == 0, out.stderr[-3000:]
    report = run_dir / "eval-both"
    results = load_results(report / "eval.json")
    methods = ["agent", "random-init", "pretrained", "oracle", "scratch"]
    assert [(r.split, r.method) for r in results] == [(s, m) for s in ("test", "ood") for m in methods]
    for r in results:  # every method on the same tasks, with the same number of points
        same_split = next(x for x in results if x.split == r.split)
        assert r.tasks == same_split.tasks and len(r.gradient_steps) == 2 and r.seed == 3
    for m in methods:
        assert f"| {m} | ood |" in out.stdout
    fig, series = plot(results)
    assert {k[2] for k in series} == set(methods)
    assert (report / "eval.png").is_file() and any((report / "tb").iterdir())


def test_cli_evaluate_errors(tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["evaluate", *args]) == 2
        return capsys.readouterr().err

    assert "does not exist" in error(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "config.json" in error(str(tmp_path / "empty"))
    run_dir = tmp_path / "bandit"
    run_training(build_config(TrainConfig, None, {**TINY, "env": "Bandit", "env_options": "k=2,n_pulls=5",
                                                  "iterations": 1}), run_dir)
    assert "Bandit has no 'ood' split" in error(str(run_dir), "--split", "ood", "--num-tasks", "2")
    assert "unknown baseline" in error(str(run_dir), "--baselines", "nope")
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects it while parsing
        main(["evaluate", str(run_dir), "--step-sizes", "a,b"])
    assert exit_info.value.code == 2
    assert "--step-sizes: expected comma-separated numbers, got 'a,b'" in capsys.readouterr().err
    for ckpt in run_dir.glob("ckpt-*.pt"):
        ckpt.unlink()
    assert "no checkpoint" in error(str(run_dir), "--num-tasks", "2")

"""Baselines: SB3 weights copied into MLPPolicy act the same; baselines are seeded and run on the agent's tasks."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

import metarl
from metarl.agents.maml_learner import MAMLLearner, MetaBatchConfig
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.baselines import (
    BaselineConfig,
    TaskParamsObservation,
    TaskSamplingEnv,
    _ppo,
    copy_sb3_policy,
    evaluate_baselines,
    normalized_actions,
    parse_baselines,
    sb3_env,
)
from metarl.evaluation import heldout_tasks


@pytest.mark.parametrize("name", ["PointNav", "Bandit"])
def test_copied_sb3_policy_has_the_same_mean_action(name):
    family = metarl.make_family(name)
    mlp = MLPConfig(hidden=(16, 8), activation="tanh")
    normalize = normalized_actions(family, mlp)
    env = sb3_env(family, normalize=normalize)  # PointNav: SB3 acts in [-1, 1] like MLPPolicy, rescaled to +-0.1
    model = _ppo(DummyVecEnv([lambda: env]), mlp, n_steps=16, seed=0)
    with torch.no_grad():  # make the copy non-trivial: perturb every SB3 parameter
        for p in model.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    policy = copy_sb3_policy(model, MLPPolicy(family.observation_space, family.action_space, mlp))
    obs = torch.as_tensor(np.stack([family.observation_space.sample() for _ in range(5)]), dtype=torch.float32)
    zeros = torch.zeros(5, 1, dtype=torch.bool)
    prev_action = torch.zeros(5, 1, *policy.encode_prev_action(torch.zeros(1, *family.action_space.shape,
                              dtype=torch.long if policy.discrete else torch.float32)).shape[1:])
    with torch.no_grad():
        out = policy(obs[:, None], prev_action, torch.zeros(5, 1), zeros)
        dist = model.policy.get_distribution(obs).distribution
    ours = out.dist[:, 0]  # (5, A): Gaussian mean or logits
    theirs = dist.mean if not policy.discrete else dist.logits
    if policy.discrete:
        ours = torch.log_softmax(ours, -1)
    else:
        assert torch.allclose(out.log_std[:, 0], model.policy.log_std.expand(5, -1))
        sb3_action, _ = model.predict(obs.numpy(), deterministic=True)  # clipped to [-1, 1]
        env_action = np.stack([env.env.action(a) for a in sb3_action])  # (5, 2): what the env receives
        assert normalize and np.allclose(policy.env_action(policy.mode_action(out))[:, 0].numpy(), env_action, atol=1e-6)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_wrappers_sample_train_tasks_and_append_parameters():
    family = metarl.make_family("PointNav", horizon=5)
    env = TaskParamsObservation(TaskSamplingEnv(family.make(), "train"))
    obs, _ = env.reset(seed=0)
    goal = env.unwrapped.get_task()["goal"]
    assert obs.shape == (4,) and np.allclose(obs[2:], goal)
    env.reset()
    assert env.unwrapped.get_task()["goal"] != goal


def test_baselines_are_seeded_and_use_the_agents_tasks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where SB3's default logger would make its folders
    monkeypatch.setattr(tempfile, "tempdir", None)
    family = metarl.make_family("PointNav", horizon=5)

    def run(seed: int) -> list[dict]:
        torch.manual_seed(0)
        policy = MLPPolicy(family.observation_space, family.action_space, MLPConfig(hidden=(8,)))
        agent = MAMLLearner(policy, family, batch=MetaBatchConfig(meta_batch=2, trajectories_per_task=2), seed=0)
        tasks = {"test": heldout_tasks(family, "test", 2, seed)}
        results = evaluate_baselines(agent, parse_baselines("all"), tasks, 1, None, seed, BaselineConfig(64, 1))
        assert all(r.tasks == tuple(map(tuple, family.flat_params(tasks["test"]).tolist())) for r in results)
        return [r.to_dict() for r in results]

    a, b = run(0), run(0)
    assert json.dumps(a) == json.dumps(b)
    assert list(tmp_path.glob("SB3-*")) == []  # PPO.learn left no SB3-<time> folder behind
    assert capsys.readouterr().err == ""  # quiet unless verbose
    assert [r["method"] for r in a] == ["random-init", "pretrained", "oracle", "scratch"]
    oracle = a[2]["per_task"]["gradient_steps"]
    assert oracle[0] == oracle[1]  # no adaptation: a flat row
    with pytest.raises(ValueError, match="unknown baseline"):
        parse_baselines("oracle,nope")

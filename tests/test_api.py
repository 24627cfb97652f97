"""The Stable-Baselines3-style Python API: construct, learn, save / load, adapt, predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metarl
from metarl.agents import MLPConfig, MLPPolicy, TransformerConfig, TransformerPolicy
from metarl.agents import maml as maml_module
from metarl.agents.incontext import InContextConfig, InContextLearner
from metarl.agents.maml import MAMLConfig
from metarl.agents.maml_learner import MAMLLearner, MetaBatchConfig, OuterConfig
from metarl.checkpoint import CheckpointError
from metarl.envs.gym_adapter import GymParam, gym_family
from metarl.evaluation import evaluate_adaptation
from metarl.rollout import collect, make_rollout_env


def maml_learner(policy_kind="mlp", maml=None, outer=None):
    family = metarl.make_family("PointNav", horizon=10)
    torch.manual_seed(0)
    if policy_kind == "mlp":
        policy = MLPPolicy(family.observation_space, family.action_space, MLPConfig(hidden=(16,)))
    else:
        policy = TransformerPolicy(family.observation_space, family.action_space,
                                   TransformerConfig(d_model=16, n_heads=2, context=20))
    return MAMLLearner(policy, family, maml, outer, batch=MetaBatchConfig(meta_batch=3, trajectories_per_task=2), seed=0)


def test_learn_save_load_continue_equals_uninterrupted(tmp_path):
    a = maml_learner().learn(2)
    a.save(tmp_path / "agent.pt")
    b = MAMLLearner.load(tmp_path / "agent.pt")
    assert b.iterations_done == 2
    for (k, v), (_, w) in zip(a.policy.state_dict().items(), b.policy.state_dict().items()):
        assert torch.equal(v, w), k
    a.learn(1)
    b.learn(1)
    assert all(torch.equal(v, w) for v, w in zip(a.policy.parameters(), b.policy.parameters()))


@pytest.mark.parametrize("method", ["trpo", "ppo"])
def test_task_chunk_reaches_every_vectorised_call(monkeypatch, method):
    chunks = []

    def recording_vmap(*args, chunk_size=None, **kwargs):
        chunks.append(chunk_size)
        return torch.func.vmap(*args, chunk_size=chunk_size, **kwargs)

    outer = OuterConfig(method=method, ppo_epochs=2)
    whole = maml_learner(outer=outer)
    want = whole.train_iteration(0)
    monkeypatch.setattr(maml_module, "vmap", recording_vmap)
    chunked = maml_learner(maml=MAMLConfig(task_chunk=2), outer=outer)
    got = chunked.train_iteration(0)
    assert chunks and set(chunks) == {2}
    if method == "trpo":  # float32 rounding differs by chunk; TRPO's conjugate gradient amplifies it in the step
        for key in ("loss/outer_before", "trpo/grad_norm", "adapt/return_step_1"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
        return
    for (k, v), w in zip(whole.policy.named_parameters(), chunked.policy.parameters()):
        torch.testing.assert_close(w, v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("method", ["trpo", "ppo"])
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["fixed_lr", "meta_sgd"])
def test_each_inner_step_adapts_on_fresh_trajectories_and_is_logged(method, meta_sgd):
    one = maml_learner(outer=OuterConfig(method=method, ppo_epochs=1))
    one.train_iteration(0)
    maml = MAMLConfig(inner_steps=2, inner_lr=0.5, meta_sgd=meta_sgd)
    learner = maml_learner(maml=maml, outer=OuterConfig(method=method, ppo_epochs=1))
    before = [p.detach().clone() for p in [*learner.policy.parameters(), *(learner.step_sizes or {}).values()]]
    metrics = learner.train_iteration(0)
    assert learner.env_steps == 3 * one.env_steps // 2  # support before step 1, before step 2, and the query
    returns = [metrics[f"adapt/return_step_{k}"] for k in range(3)]
    assert "adapt/return_step_3" not in metrics and len(set(returns)) == 3, returns
    after = [*learner.policy.parameters(), *(learner.step_sizes or {}).values()]
    assert any(not torch.equal(p, q) for p, q in zip(before, after))
    if meta_sgd:  # the learned step sizes moved too
        assert any(not torch.equal(p, q) for p, q in zip(before[-len(learner.step_sizes):], after[-len(learner.step_sizes):]))


def test_learn_callback_can_stop():
    seen = []
    learner = maml_learner().learn(5, callback=lambda m: seen.append(m) or len(seen) < 2)
    assert len(seen) == 2 and learner.iterations_done == 2 and "adapt/return_step_1" in seen[0]


def test_a_learner_on_an_unregistered_family_loads_with_that_family(tmp_path):
    family = gym_family("PoleLengthForLoad", "CartPole-v1", [GymParam("length", (0.25, 1.0))], horizon=5)
    policy = MLPPolicy(family.observation_space, family.action_space, MLPConfig(hidden=(8,)))
    learner = MAMLLearner(policy, family, batch=MetaBatchConfig(meta_batch=2, trajectories_per_task=2), seed=0).learn(1)
    learner.save(tmp_path / "pole.pt")
    with pytest.raises(KeyError, match=r"'PoleLengthForLoad' is not known in this process.*load\(path, family=\.\.\.\)"):
        MAMLLearner.load(tmp_path / "pole.pt")
    loaded = MAMLLearner.load(tmp_path / "pole.pt", family=family)
    assert loaded.family is family and loaded.iterations_done == 1
    assert all(torch.equal(v, w) for v, w in zip(learner.policy.parameters(), loaded.policy.parameters()))
    with pytest.raises(ValueError, match="trained on task family 'PoleLengthForLoad', but family='PointNav'"):
        MAMLLearner.load(tmp_path / "pole.pt", family=metarl.make_family("PointNav"))
    impostor = gym_family("PoleLengthForLoad", "Pendulum-v1", [GymParam("g", (9.0, 11.0))], horizon=5)
    with pytest.raises(ValueError, match=r"does not fit task family 'PoleLengthForLoad' \(observation space Box"):
        MAMLLearner.load(tmp_path / "pole.pt", family=impostor)


def test_load_rejects_other_files_clearly(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        MAMLLearner.load(tmp_path / "junk.pt")
    maml_learner().save(tmp_path / "maml.pt")
    with pytest.raises(TypeError, match="MAMLLearner, not a InContextLearner"):
        InContextLearner.load(tmp_path / "maml.pt")


@pytest.mark.parametrize("policy_kind", ["mlp", "transformer"])
def test_adapt_then_predict_matches_rollout(policy_kind):
    learner = maml_learner(policy_kind)
    family, tasks = learner.family, learner.family.sample(2, 0, "test")
    support = collect(learner.policy, make_rollout_env(family, tasks, 2), num_tasks=2, seed=0)
    adapted = learner.adapt(support)
    assert all(v.shape[0] == 2 for v in adapted.values())
    env = make_rollout_env(family, tasks, 1)
    query = collect(learner.policy, env, num_tasks=2, params=adapted, per_task=True, deterministic=True, seed=0)
    obs, _ = env.reset(seed=0)
    state, reward = None, None
    for t in range(5):  # predict step by step reproduces the rollout's deterministic actions
        action, state = learner.predict(obs, state, deterministic=True, reward=reward, params=adapted)
        expected = learner.policy.env_action(query.actions[:, 0, t])  # the env's action, rescaled to its bounds
        torch.testing.assert_close(action, expected, atol=1e-5, rtol=1e-5)
        obs, reward, *_ = env.step(action)


def test_predict_numpy_single_observation():
    learner = maml_learner()
    action, state = learner.predict(np.zeros(2, dtype=np.float32), deterministic=True)
    assert isinstance(action, np.ndarray) and action.shape == (2,)
    again, _ = learner.predict(np.zeros(2, dtype=np.float32), state, deterministic=True, reward=np.float32(-0.5))
    assert again.shape == (2,)


def test_incontext_learner_api_and_evaluation(tmp_path):
    family = metarl.make_family("Bandit", k=2, n_pulls=5)
    torch.manual_seed(0)
    policy = TransformerPolicy(family.observation_space, family.action_space,
                               TransformerConfig(d_model=16, n_heads=2, context=10))
    learner = InContextLearner(policy, family, InContextConfig(meta_batch=4, trials_per_task=1, minibatches=1), seed=0)
    learner.learn(2)
    learner.save(tmp_path / "rl2.pt")
    loaded = InContextLearner.load(tmp_path / "rl2.pt")
    result = evaluate_adaptation(loaded, family, split="test", num_tasks=5, episodes=3, seed=0)
    assert len(result.incontext_episodes) == 3 and result.gradient_steps == ()
    assert result == evaluate_adaptation(loaded, family, split="test", num_tasks=5, episodes=3, seed=0)

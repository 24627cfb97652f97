"""Batched rollouts: shapes, masking, bootstrap, history across episodes, per-task parameters, seeding."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, stack_module_state

import metarl
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.agents.transformer import TransformerConfig, TransformerPolicy
from metarl.rollout import collect, make_rollout_env


def transformer(family, context=16, seed=0):
    torch.manual_seed(seed)
    return TransformerPolicy(family.observation_space, family.action_space,
                             TransformerConfig(n_layers=2, d_model=32, n_heads=4, context=context))


def recompute(policy, traj, params=None, isolate=False):
    """Sequence-mode outputs over each trial's whole history, back in [N, E, T] layout."""
    seq = {k: traj.trial_sequences(getattr(traj, k)) for k in ("obs", "prev_action", "prev_reward", "episode_start", "valid")}
    n, trials, length = seq["valid"].shape

    def flat(x):
        return x.reshape(n * trials, length, *x.shape[3:])

    args = (flat(seq["obs"]), flat(seq["prev_action"]), flat(seq["prev_reward"]), flat(seq["episode_start"]))
    kwargs = {"valid": flat(seq["valid"]), "isolate_episodes": isolate}
    if params is None:
        out = policy(*args, **kwargs)
    else:  # per-task params: run each task's trials with its own parameters
        outs = [functional_call(policy, {k: v[i] for k, v in params.items()},
                                tuple(a.reshape(n, trials, *a.shape[1:])[i] for a in args),
                                {k: v.reshape(n, trials, *v.shape[1:])[i] if torch.is_tensor(v) else v
                                 for k, v in kwargs.items()}) for i in range(n)]
        out = type(outs[0])(*(torch.cat([o[j] for o in outs]) for j in range(3)))
    shape = traj.rewards.shape
    logp = policy.log_prob(out, traj.trial_sequences(traj.actions).reshape(n * trials, length, *traj.actions.shape[3:]))
    return logp.reshape(shape), out.value.reshape(shape)


@pytest.mark.parametrize("name,episodes,isolate", [("CartPoleVar", 2, False), ("TabularMDP", 3, False),
                                                    ("TabularMDP", 3, True), ("PointNav", 2, False)])
def test_step_mode_rollout_equals_sequence_mode(name, episodes, isolate):
    family = metarl.make_family(name, horizon=40) if name != "TabularMDP" else metarl.make_family(name)
    policy = transformer(family, context=16)
    tasks = family.sample(3, 0)
    env = make_rollout_env(family, tasks, trials_per_task=2)
    traj = collect(policy, env, num_tasks=3, episodes_per_trial=episodes, isolate_episodes=isolate, seed=1)
    assert traj.rewards.shape == (3, 2 * episodes, family.horizon)
    logp, value = recompute(policy, traj, isolate=isolate)
    v = traj.valid
    torch.testing.assert_close(logp[v], traj.log_probs[v], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value[v], traj.values[v], atol=1e-5, rtol=1e-5)


def test_steps_after_termination_are_masked_and_bootstrap_only_on_truncation():
    family = metarl.make_family("CartPoleVar", horizon=60)
    policy = MLPPolicy(family.observation_space, family.action_space, MLPConfig(hidden=(16,)))
    traj = collect(policy, make_rollout_env(family, family.sample(8, 0), 4), num_tasks=8, seed=0)
    ended_early = traj.terminated.any(dim=2)  # (N, E)
    assert ended_early.any() and (~ended_early).any()
    lengths = traj.valid.sum(dim=2)
    for i, e in ended_early.nonzero().tolist():
        t_end = int(lengths[i, e]) - 1
        assert traj.terminated[i, e, t_end] and not traj.valid[i, e, t_end + 1:].any()
        assert (traj.rewards[i, e, t_end + 1:] == 0).all() and traj.last_value[i, e] == 0
    full = ~ended_early
    assert traj.truncated[full].any(dim=-1).all() and (lengths[full] == 60).all()
    assert (traj.last_value[full] != 0).all()
    assert not (traj.terminated & traj.truncated).any()


def test_history_runs_across_episodes_of_a_trial():
    family = metarl.make_family("TabularMDP")
    policy = transformer(family)
    traj = collect(policy, make_rollout_env(family, family.sample(2, 0)), num_tasks=2, episodes_per_trial=3, seed=0)
    # the first step of episode 2 sees the last reward and action of episode 1 as its history inputs
    assert traj.episode_start[:, :, 0].all() and not traj.episode_start[:, :, 1:].any()
    torch.testing.assert_close(traj.prev_reward[:, 1, 0], traj.rewards[:, 0, -1])
    torch.testing.assert_close(traj.prev_action[:, 1, 0], policy.encode_prev_action(traj.actions[:, 0, -1]))
    assert (traj.prev_reward[:, 0, 0] == 0).all()


@pytest.mark.parametrize("make_policy", ["mlp", "transformer"])
def test_per_task_parameters_match_collecting_each_task_alone(make_policy):
    family = metarl.make_family("PointNav", horizon=20)
    policies = [transformer(family, seed=s) if make_policy == "transformer"
                else MLPPolicy(family.observation_space, family.action_space, MLPConfig(hidden=(8,))) for s in range(3)]
    params, _ = stack_module_state(policies)
    tasks = family.sample(3, 0)
    together = collect(policies[0], make_rollout_env(family, tasks, 2), num_tasks=3, params=params,
                       per_task=True, deterministic=True, seed=0)
    for i in range(3):
        alone = collect(policies[i], make_rollout_env(family, tasks[i], 2), num_tasks=1, deterministic=True, seed=0)
        torch.testing.assert_close(together.actions[i], alone.actions[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.values[i], alone.values[0], atol=1e-5, rtol=1e-5)


def test_same_seed_same_trajectories_and_deterministic_mode():
    family = metarl.make_family("PendulumVar", horizon=30)
    policy = transformer(family)
    tasks = family.sample(4, 0)
    a = collect(policy, make_rollout_env(family, tasks, 2), num_tasks=4, seed=3)
    b = collect(policy, make_rollout_env(family, tasks, 2), num_tasks=4, seed=3)
    c = collect(policy, make_rollout_env(family, tasks, 2), num_tasks=4, seed=4)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.rewards, b.rewards)
    assert not torch.equal(a.actions, c.actions)
    d = collect(policy, make_rollout_env(family, tasks, 2), num_tasks=4, seed=3, deterministic=True)
    logp_mode, _ = recompute(policy, d)
    assert torch.allclose(d.log_probs, logp_mode, atol=1e-5)
    mean = policy(*(x[:, 0] for x in (d.obs, d.prev_action, d.prev_reward, d.episode_start)), valid=d.valid[:, 0]).dist
    torch.testing.assert_close(d.actions[:, 0], mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", metarl.family_names())
def test_every_family_rolls_out(name):
    family = metarl.make_family(name)
    policy = transformer(family)
    traj = collect(policy, make_rollout_env(family, family.sample(2, 0)), num_tasks=2, episodes_per_trial=2, seed=0)
    assert traj.valid[:, :, 0].all() and torch.isfinite(traj.log_probs[traj.valid]).all()

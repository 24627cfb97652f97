"""In-context (RL2) learner: trial-level advantages, learning on a bandit, determinism and resume, metrics."""

from __future__ import annotations

import io
import math
import time

import pytest
import torch

import metarl
from metarl.agents.incontext import InContextConfig, InContextLearner, shared_policy_outputs, trial_advantages
from metarl.agents.transformer import TransformerConfig, TransformerPolicy
from metarl.rollout import collect
from metarl.trajectories import Trajectories

NAN = float("nan")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention (tens of times slower on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_traj(rewards, values, valid, terminated, last_value, episodes_per_trial: int) -> Trajectories:
    """Trajectories [N, E, T] with the fields advantages read; the rest zeros (obs of width 1, Discrete actions)."""
    rewards, values = torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(values, dtype=torch.float64)
    valid, terminated = torch.as_tensor(valid, dtype=torch.bool), torch.as_tensor(terminated, dtype=torch.bool)
    zeros = torch.zeros(rewards.shape, dtype=torch.float64)
    return Trajectories(
        obs=zeros[..., None], actions=torch.zeros(rewards.shape, dtype=torch.long), rewards=rewards,
        terminated=terminated, truncated=torch.zeros_like(valid),
        valid=valid, log_probs=zeros, values=values, last_value=torch.as_tensor(last_value, dtype=torch.float64),
        prev_action=zeros[..., None], prev_reward=zeros, episode_start=torch.zeros_like(valid),
        episodes_per_trial=episodes_per_trial,
    )


def hand_case(last_terminated: bool) -> Trajectories:
    """One trial of two 3-step episodes: the first terminates after 2 steps (NaN padding), the second runs 3."""
    return make_traj(
        rewards=[[[1.0, 2.0, NAN], [3.0, 0.0, 4.0]]],
        values=[[[0.5, 1.0, NAN], [2.0, 1.0, 0.0]]],
        valid=[[[True, True, False], [True, True, True]]],
        terminated=[[[False, True, False], [False, False, last_terminated]]],
        last_value=[[100.0, 8.0]],  # never read: the first episode is not the trial's last; 8 only if truncated
        episodes_per_trial=2,
    )


@pytest.mark.parametrize("last_terminated", [False, True])
def test_trial_advantages_hand_case(last_terminated):
    # gamma = 0.5, lambda = 1: advantages are discounted trial returns minus values; the sequence is
    # r = 1, 2, 3, 0, 4 and v = 0.5, 1, 2, 1, 0, then 8 (truncated) or nothing (terminated).
    if last_terminated:  # G = 3, 4, 4, 2, 4
        want_returns = [[[3.0, 4.0, 0.0], [4.0, 2.0, 4.0]]]
    else:  # G = 3.25, 4.5, 5, 4, 8
        want_returns = [[[3.25, 4.5, 0.0], [5.0, 4.0, 8.0]]]
    want_returns = torch.tensor(want_returns, dtype=torch.float64)
    values = torch.tensor([[[0.5, 1.0, 0.0], [2.0, 1.0, 0.0]]], dtype=torch.float64)
    adv, returns = trial_advantages(hand_case(last_terminated), gamma=0.5, lam=1.0)
    torch.testing.assert_close(returns, want_returns)
    torch.testing.assert_close(adv, want_returns - values)


def loop_trial_advantages(traj: Trajectories, gamma: float, lam: float) -> torch.Tensor:
    """Reference: GAE over each trial's valid steps in order, with plain Python scalars."""
    k, (n, e, t) = traj.episodes_per_trial, traj.valid.shape
    adv = torch.zeros(n, e, t, dtype=torch.float64)
    for i in range(n):
        for trial in range(e // k):
            steps = [(ep, s) for ep in range(trial * k, trial * k + k) for s in range(t) if traj.valid[i, ep, s]]
            last_ep, last_s = steps[-1]
            after = 0.0 if traj.terminated[i, last_ep, last_s] else float(traj.last_value[i, last_ep])
            running, next_value = 0.0, after
            for ep, s in reversed(steps):
                v = float(traj.values[i, ep, s])
                delta = float(traj.rewards[i, ep, s]) + gamma * next_value - v
                running = delta + gamma * lam * running
                adv[i, ep, s] = running
                next_value = v
    return adv


def random_trials(n: int, trials: int, k: int, t: int, generator: torch.Generator) -> Trajectories:
    """Random episodes of 1..T valid steps; short ones terminate, full ones terminate or are truncated."""
    e = trials * k
    lengths = torch.randint(1, t + 1, (n, e), generator=generator)  # (N, E)
    steps = torch.arange(t)
    valid = steps < lengths[..., None]  # (N, E, T)
    last = steps == (lengths[..., None] - 1)
    ends_terminal = (lengths < t) | (torch.rand(n, e, generator=generator) < 0.5)  # (N, E)
    terminated = last & ends_terminal[..., None]
    rewards = torch.where(valid, torch.randn(n, e, t, generator=generator, dtype=torch.float64), NAN)
    values = torch.where(valid, torch.randn(n, e, t, generator=generator, dtype=torch.float64), NAN)
    last_value = torch.randn(n, e, generator=generator, dtype=torch.float64)
    return make_traj(rewards, values, valid, terminated, last_value, k)


@pytest.mark.parametrize("k", [1, 3])
def test_trial_advantages_match_a_python_loop(k):
    gen = torch.Generator().manual_seed(k)
    traj = random_trials(n=4, trials=3, k=k, t=5, generator=gen)
    adv, returns = trial_advantages(traj, gamma=0.9, lam=0.8)
    want = loop_trial_advantages(traj, 0.9, 0.8)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(returns, torch.where(traj.valid, want + traj.values, 0.0))
    assert not adv.isnan().any() and not returns.isnan().any()


def test_trial_advantages_cross_episode_boundaries_only_within_a_trial():
    # two trials of one episode each: the second trial's reward must not reach the first trial
    traj = make_traj(rewards=[[[0.0], [5.0]]], values=[[[0.0], [0.0]]], valid=[[[True], [True]]],
                     terminated=[[[False], [False]]], last_value=[[0.0, 0.0]], episodes_per_trial=1)
    adv, _ = trial_advantages(traj, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[[0.0], [5.0]]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- learners

def tiny_transformer(family, context: int, seed: int = 0) -> TransformerPolicy:
    torch.manual_seed(seed)
    config = TransformerConfig(n_layers=1, d_model=16, n_heads=2, context=context)
    return TransformerPolicy(family.observation_space, family.action_space, config)


def cartpole_learner(seed: int = 0, policy_seed: int = 0, name: str = "CartPoleVar") -> InContextLearner:
    """Two-episode trials of a short CartPoleVar: terminations, padding and bootstraps in every batch."""
    family = metarl.make_family(name, horizon=12)
    config = InContextConfig(meta_batch=4, trials_per_task=2, episodes_per_trial=2, epochs=2, minibatches=2)
    return InContextLearner(tiny_transformer(family, context=24, seed=policy_seed), family, config, seed=seed)


def params_of(learner: InContextLearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.policy.state_dict().items()}


def assert_same_params(a: InContextLearner, b: InContextLearner) -> None:
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("name", ["CartPoleVar", "PointNav"])  # Discrete and Box actions
def test_metrics_keys_present_and_finite(name):
    learner = cartpole_learner(name=name)
    metrics = learner.train_iteration(0)
    expected = {"incontext/return_episode_0", "incontext/return_episode_1", "incontext/return_trial", "loss/policy",
                "loss/value", "policy/entropy", "policy/approx_kl", "policy/clip_fraction", "time/iteration_s"}
    assert expected <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    trial = metrics["incontext/return_episode_0"] + metrics["incontext/return_episode_1"]
    assert metrics["incontext/return_trial"] == pytest.approx(trial)
    assert 0 < learner.env_steps <= 4 * 2 * 2 * 12


def test_same_seed_gives_identical_parameters():
    a, b = cartpole_learner(), cartpole_learner()
    for it in range(2):
        a.train_iteration(it)
        b.train_iteration(it)
    assert_same_params(a, b)
    assert a.env_steps == b.env_steps
    c = cartpole_learner(seed=1)
    for it in range(2):
        c.train_iteration(it)
    assert not all(torch.equal(x, y) for x, y in zip(params_of(a).values(), params_of(c).values()))


def test_resume_from_state_dict_equals_continuing():
    original = cartpole_learner()
    for it in range(2):
        original.train_iteration(it)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = cartpole_learner(policy_seed=1)  # different initial weights, overwritten by the load
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    original.train_iteration(2)
    resumed.train_iteration(2)
    assert_same_params(original, resumed)
    assert original.env_steps == resumed.env_steps


def test_sequence_outputs_reproduce_the_collected_log_probs():
    learner = cartpole_learner()
    tasks = learner.family.sample(4, generator=0)
    learner._env.set_tasks(tasks[torch.arange(4).repeat_interleave(2)])
    traj = collect(learner.policy, learner._env, num_tasks=4, episodes_per_trial=2, seed=0)
    with torch.no_grad():
        out = shared_policy_outputs(learner.policy, dict(learner.policy.named_parameters()), traj)
    logp = learner.policy.log_prob(out, traj.actions)
    torch.testing.assert_close(logp[traj.valid], traj.log_probs[traj.valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.value[traj.valid], traj.values[traj.valid], atol=1e-5, rtol=1e-5)


def test_adaptation_curve_reports_each_episode():
    learner = cartpole_learner()
    tasks = learner.family.sample(3, generator=0, split="test")
    curve = learner.adaptation_curve(tasks, seed=0, steps=2, episodes=3)
    assert curve["gradient_steps"] == [] and len(curve["incontext_episodes"]) == 3
    assert [len(r) for r in curve["incontext_episodes_per_task"]] == [3, 3, 3]
    assert curve == learner.adaptation_curve(tasks, seed=0, steps=2, episodes=3)
    more = learner.adaptation_curve(tasks, seed=0, episodes=3, trajectories=4)  # each task's mean over 4 trials
    assert [len(r) for r in more["incontext_episodes_per_task"]] == [3, 3, 3] and more != curve


def test_learns_to_adapt_in_context_on_a_two_armed_bandit():
    # A policy that ignores its history gets 5.0 in expectation over 10 pulls of U[0, 1] arms; win-stay lose-shift
    # gets about 5.8 and an oracle 6.7. A larger step size than the default fits this tiny budget; the entropy
    # bonus is off for speed.
    family = metarl.make_family("Bandit", k=2, n_pulls=10)
    config = InContextConfig(meta_batch=32, trials_per_task=2, lr=3e-3, vf_coef=0.05, ent_coef=0.0)
    learner = InContextLearner(tiny_transformer(family, context=10), family, config, seed=0)
    test_tasks = family.sample(2000, generator=123, split="test")
    before = learner.adaptation_curve(test_tasks, seed=7)["incontext_episodes"][0]
    start = time.perf_counter()
    for it in range(120):
        learner.train_iteration(it)
    seconds = time.perf_counter() - start
    after = learner.adaptation_curve(test_tasks, seed=7)["incontext_episodes"][0]
    print(f"bandit k=2 n_pulls=10: mean trial return {before:.3f} -> {after:.3f} in {seconds:.1f} s")
    assert before == pytest.approx(5.0, abs=0.15)
    assert after > before + 0.3

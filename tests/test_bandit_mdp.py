"""Bandit and TabularMDP (RL2 paper): sampled outcomes match the task parameters; options, episodes, baselines."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

import metarl


def copies(family: metarl.TaskFamily, n: int, seed: int = 0) -> metarl.Tasks:
    """n copies of one training task (every sub-env plays the same task)."""
    return family.sample(1, seed, "train")[torch.zeros(n, dtype=torch.long)]


def random_policy(n: int, n_actions: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda: torch.randint(0, n_actions, (n,), generator=gen)


# ---------------------------------------------------------------------------------------------- Bandit
def test_bandit_reward_frequencies_match_p():
    family = metarl.make_family("Bandit")
    n = 4000
    tasks = copies(family, n)
    vec = family.make_vec(tasks, seed=0)
    vec.reset()
    act = random_policy(n, 5, seed=1)
    pulls, wins = torch.zeros(5), torch.zeros(5)
    for _ in range(50):
        a = act()
        obs, r, term, trunc, _ = vec.step(a)
        assert not (term | trunc).any() and (obs == 0).all() and set(r.unique().tolist()) <= {0.0, 1.0}
        pulls += torch.bincount(a, minlength=5)
        wins += torch.bincount(a, weights=r, minlength=5)
    p = tasks.params["p"][0].double()
    freq = wins.double() / pulls
    tol = 5 * torch.sqrt(p * (1 - p) / pulls) + 1e-3
    assert ((freq - p).abs() <= tol).all(), (freq, p)


def test_bandit_options_change_spaces_and_horizon():
    family = metarl.make_family("Bandit", k=3, n_pulls=10)
    assert family.action_space == gym.spaces.Discrete(3) and family.observation_space.shape == (1,)
    assert family.horizon == 10 and family.episodes_per_trial == 1 and family.splits() == ("train", "test")
    assert family.sample(4, 0).params["p"].shape == (4, 3)
    env = gym.make("metarl/Bandit-v0", k=3, n_pulls=10)
    env.reset(seed=0)
    ends = [env.step(2)[2:4] for _ in range(10)]
    assert ends == [(False, False)] * 9 + [(False, True)]
    vec = gym.make_vec("metarl/Bandit-v0", num_envs=4, vectorization_mode="vector_entry_point", k=3, n_pulls=10)
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (4, 1) and vec.single_action_space.n == 3
    truncs = [vec.step(torch.full((4,), 2))[3].all().item() for _ in range(10)]
    assert truncs == [False] * 9 + [True]


def test_bandit_random_policy_total_reward_about_half_of_pulls():
    family = metarl.make_family("Bandit", n_pulls=100)
    n = 1000
    vec = family.make_vec(family.sample(n, 0), seed=0)
    vec.reset()
    act = random_policy(n, 5, seed=2)
    total = sum(vec.step(act())[1] for _ in range(100))
    assert abs(total.mean().item() - 50.0) < 2.0  # std of the mean ~0.45


# ---------------------------------------------------------------------------------------------- TabularMDP
def test_mdp_next_states_and_rewards_match_the_task():
    family = metarl.make_family("TabularMDP")
    s_n, a_n, n = 10, 5, 2000
    tasks = copies(family, n)
    vec = family.make_vec(tasks, autoreset_mode="disabled", seed=0)
    act = random_policy(n, a_n, seed=3)
    counts = torch.zeros(s_n * a_n * s_n, dtype=torch.float64)
    reward_sum = torch.zeros(s_n * a_n, dtype=torch.float64)
    for _ in range(5):
        obs, _ = vec.reset()
        for _ in range(family.horizon):
            s, a = obs.argmax(dim=1), act()
            obs, r, *_ = vec.step(a)
            counts += torch.bincount((s * a_n + a) * s_n + obs.argmax(dim=1), minlength=counts.numel())
            reward_sum += torch.bincount(s * a_n + a, weights=r.double(), minlength=reward_sum.numel())
    counts = counts.view(s_n, a_n, s_n)
    visits = counts.sum(-1)  # (S, A)
    seen = visits >= 100
    assert seen.sum() >= 25, "most (s, a) pairs are visited often enough to test"
    p = tasks.params["transitions"][0].double()  # (S, A, S)
    freq = counts / visits.clamp_min(1)[..., None]
    tol = 5 * torch.sqrt(p * (1 - p) / visits.clamp_min(1)[..., None]) + 1e-3
    assert ((freq - p).abs() <= tol)[seen].all()
    mean_r = reward_sum.view(s_n, a_n) / visits.clamp_min(1)
    rewards = tasks.params["rewards"][0].double()
    assert ((mean_r - rewards).abs() <= 5 / visits.clamp_min(1).sqrt())[seen].all()


def test_mdp_one_hot_observation_truncates_at_10_and_restarts_in_state_0():
    family = metarl.make_family("TabularMDP")
    start = torch.nn.functional.one_hot(torch.tensor(0), 10).float()
    vec = family.make_vec(family.sample(8, 0), seed=0)
    obs, _ = vec.reset()
    assert (obs == start).all()
    act = random_policy(8, 5, seed=4)
    for t in range(1, 2 * family.horizon + 3):
        obs, r, term, trunc, _ = vec.step(act())
        assert ((obs == 0) | (obs == 1)).all() and (obs.sum(dim=1) == 1).all() and not term.any()
        assert trunc.all() if t % 11 == 10 else not trunc.any()
        if t % 11 == 0:  # the step after truncation is the reset step
            assert (obs == start).all() and (r == 0).all()
    env = family.make()
    assert (env.reset(seed=0)[0] == start.numpy()).all()
    ends = [env.step(env.action_space.sample())[2:4] for _ in range(10)]
    assert ends == [(False, False)] * 9 + [(False, True)]
    assert (env.reset()[0] == start.numpy()).all()


def test_mdp_options_change_spaces_and_trial_length():
    family = metarl.make_family("TabularMDP", n_states=4, n_actions=3, episode_length=7, n_episodes=25)
    assert family.observation_space.shape == (4,) and family.action_space == gym.spaces.Discrete(3)
    assert family.horizon == 7 and family.episodes_per_trial == 25 and family.splits() == ("train", "test")
    tasks = family.sample(2, 0)
    assert tasks.params["transitions"].shape == (2, 4, 3, 4) and tasks.params["rewards"].shape == (2, 4, 3)
    env = gym.make("metarl/TabularMDP-v0", n_states=4, n_actions=3, episode_length=7)
    assert env.reset(seed=0)[0].shape == (4,)


def test_mdp_transitions_survive_the_dict_round_trip():
    family = metarl.make_family("TabularMDP")
    tasks = family.sample(200, 0, "test")
    again = metarl.Tasks.from_dicts(family.name, tasks.to_dicts())
    assert torch.equal(again.params["transitions"], tasks.params["transitions"])
    assert metarl.Dirichlet().contains(again.params["transitions"]).all()
    family.validate(again)


def test_mdp_random_policy_trial_reward_about_100():
    family = metarl.make_family("TabularMDP", n_episodes=10)
    n = 1000
    vec = family.make_vec(family.sample(n, 0), autoreset_mode="disabled", seed=0)
    act = random_policy(n, 5, seed=5)
    total = torch.zeros(n)
    for _ in range(family.episodes_per_trial):
        vec.reset()
        for _ in range(family.horizon):
            total += vec.step(act())[1]
    assert abs(total.mean().item() - 100.0) < 3.0  # RL2's random baseline: 100.1; std of the mean ~0.7


def test_single_env_rewards_are_plain_floats():
    for name in ("Bandit", "TabularMDP"):
        env = metarl.make_family(name).make()
        env.reset(seed=0)
        _, r, term, trunc, _ = env.step(np.int64(0))
        assert type(r) is float and term is False and trunc is False

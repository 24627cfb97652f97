"""CartPoleVar / PendulumVar: step-for-step equality with Gymnasium's CartPole-v1 / Pendulum-v1 at the default
task, and the physical effect of each task parameter."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

import metarl

TOL = 1e-6
CARTPOLE = metarl.make_family("CartPoleVar")
PENDULUM = metarl.make_family("PendulumVar")


def gym_cartpole(task: Mapping[str, float] | None = None) -> gym.Env:
    """Gymnasium's CartPole-v1 (with TimeLimit), optionally with the physical parameters of `task`."""
    env = gym.make("CartPole-v1")
    if task is not None:
        u = env.unwrapped
        u.length, u.masspole, u.masscart, u.gravity = (task[k] for k in ("length", "masspole", "masscart", "gravity"))
        u.total_mass = u.masspole + u.masscart
        u.polemass_length = u.masspole * u.length
    return env


def balance(state: np.ndarray) -> int:
    """A linear controller that keeps CartPole-v1 up for the whole 500-step episode."""
    x, x_dot, theta, theta_dot = state
    return int(theta + 0.5 * theta_dot + 0.05 * x + 0.2 * x_dot > 0)


def assert_step_equal(mine: tuple, ref: tuple, where: str) -> None:
    np.testing.assert_allclose(mine[0], ref[0], rtol=TOL, atol=TOL, err_msg=where)
    assert mine[1] == pytest.approx(ref[1], rel=TOL, abs=TOL), where
    assert (bool(mine[2]), bool(mine[3])) == (bool(ref[2]), bool(ref[3])), where


def as_reference_action(action: Any) -> Any:
    """The same action for Gymnasium, Box actions as float64: with a float32 torque, Pendulum-v1 computes its
    torque terms in float32 (NumPy 2 promotion), and that rounding accumulates to ~1e-5 over an episode."""
    return action.astype(np.float64) if isinstance(action, np.ndarray) else action


def run_single(env: gym.Env, ref: gym.Env, policy: Callable[[], Any], seed: int, extra_steps: int = 0) -> int:
    """One episode of `env` and `ref` from the same seeded start, same actions; returns its length."""
    obs, _ = env.reset(seed=seed)
    ref_obs, _ = ref.reset(seed=seed)
    np.testing.assert_array_equal(obs, ref_obs)  # both draw np_random.uniform from the same seed
    ref.unwrapped.state = env.unwrapped._state.copy()
    t = 0
    while True:
        action = policy()
        t += 1
        mine, theirs = env.step(action), ref.step(as_reference_action(action))
        assert_step_equal(mine, theirs, f"seed {seed}, step {t}")
        if mine[2] or mine[3]:
            break
    with warnings.catch_warnings():  # Gymnasium warns about stepping a terminated env
        warnings.simplefilter("ignore")
        for k in range(extra_steps if mine[2] else 0):
            action = policy()
            assert_step_equal(env.step(action)[:3] + (False,), ref.step(action)[:3] + (False,),
                              f"seed {seed}, step {k} after termination")
    return t


def run_batched(vec: metarl.VecTaskEnv, refs: list[gym.Env], policy: Callable[[int], Any], episodes: int) -> list[int]:
    """Steps `vec` (autoreset disabled) and one Gymnasium env per sub-env until each finished `episodes`
    episodes; a sub-env that ends is reset and its new start state copied to its reference."""
    def sync(mask: torch.Tensor) -> None:
        for i in mask.nonzero().flatten().tolist():
            refs[i].reset()
            refs[i].unwrapped.state = vec._state[i].numpy().copy()

    obs, _ = vec.reset(seed=0)
    sync(torch.ones(vec.num_envs, dtype=torch.bool))
    finished, lengths, t = np.zeros(vec.num_envs, dtype=int), [], np.zeros(vec.num_envs, dtype=int)
    while finished.min() < episodes:
        actions = [policy(i) for i in range(vec.num_envs)]
        obs, rew, term, trunc, _ = vec.step(torch.as_tensor(np.array(actions)))
        t += 1
        for i, (ref, action) in enumerate(zip(refs, actions)):
            assert_step_equal((obs[i].numpy(), float(rew[i]), term[i], trunc[i]), ref.step(as_reference_action(action)),
                              f"sub-env {i}")
        done = term | trunc
        if done.any():
            lengths += t[done.numpy()].tolist()
            finished += done.numpy()
            t[done.numpy()] = 0
            vec.reset(options={"reset_mask": done})
            sync(done)
    return lengths


# ---------------------------------------------------------------------------------------------- CartPole
def test_cartpole_single_matches_gymnasium_with_random_actions():
    rng = np.random.default_rng(0)
    env, ref = CARTPOLE.make(), gym.make("CartPole-v1")
    lengths = [run_single(env, ref, lambda: int(rng.integers(2)), seed, extra_steps=5) for seed in range(8)]
    assert min(lengths) > 5


def test_cartpole_batched_float64_matches_gymnasium_with_random_actions():
    rng = np.random.default_rng(1)
    n = 4
    vec = CARTPOLE.make_vec([CARTPOLE.default()] * n, autoreset_mode="disabled", dtype=torch.float64)
    lengths = run_batched(vec, [gym.make("CartPole-v1") for _ in range(n)], lambda i: int(rng.integers(2)), episodes=3)
    assert len(lengths) >= 3 * n


@pytest.mark.parametrize("batched", [False, True])
def test_cartpole_balanced_episodes_run_to_truncation_like_gymnasium(batched):
    """500 balanced steps amplify any difference in the physics (the pole is unstable), so Gymnasium gets the
    task's parameters exactly as stored (float32-rounded: gravity 9.80000019, masspole 0.100000001)."""
    task = CARTPOLE.make().get_task()
    if batched:
        vec = CARTPOLE.make_vec([task] * 2, autoreset_mode="disabled", dtype=torch.float64)
        refs = [gym_cartpole(task) for _ in range(2)]
        lengths = run_batched(vec, refs, lambda i: balance(refs[i].unwrapped.state), episodes=2)
    else:
        env, ref = CARTPOLE.make(), gym_cartpole(task)
        lengths = [run_single(env, ref, lambda: balance(env._state), seed) for seed in range(2)]
    assert set(lengths) == {CARTPOLE.horizon}


def test_cartpole_default_is_gymnasium_cartpole():
    ref = gym.make("CartPole-v1")
    env = CARTPOLE.make()
    assert env.observation_space == ref.observation_space and env.action_space == ref.action_space
    assert CARTPOLE.horizon == ref.spec.max_episode_steps == 500
    u = ref.unwrapped
    expected = {"length": u.length, "masspole": u.masspole, "masscart": u.masscart, "gravity": u.gravity}
    assert env.get_task() == pytest.approx(expected, rel=1e-7)


def steps_to_fall(family: metarl.TaskFamily, tasks: list[dict[str, float]], state: list[float], actions) -> np.ndarray:
    """[N] first step at which each sub-env terminated (from `state`, same action sequence for all)."""
    vec = family.make_vec(tasks, autoreset_mode="disabled", dtype=torch.float64)
    vec.reset(seed=0)
    vec._state[:] = torch.tensor(state, dtype=torch.float64)
    fell = np.full(len(tasks), -1)
    for t, a in enumerate(actions, start=1):
        _, _, term, _, _ = vec.step(torch.full((len(tasks),), a))
        fell[(fell < 0) & term.numpy()] = t
    assert (fell > 0).all()
    return fell


def scaled(default: Mapping[str, float], **factors: float) -> dict[str, float]:
    return {k: v * factors.get(k, 1.0) for k, v in default.items()}


def test_cartpole_pole_falls_sooner_with_more_gravity_and_later_when_longer():
    d = CARTPOLE.default()
    tasks = [d, scaled(d, gravity=2.0), scaled(d, length=2.0), scaled(d, gravity=0.5)]
    fell = steps_to_fall(CARTPOLE, tasks, [0.0, 0.0, 0.05, 0.0], [0, 1] * 200)  # alternate pushes: ~no net force
    assert fell[1] < fell[0] < fell[2] and fell[0] < fell[3]
    # small-angle inverted pendulum: the fall time scales as sqrt(length / gravity)
    assert fell[1] / fell[0] == pytest.approx(math.sqrt(0.5), rel=0.2)
    assert fell[2] / fell[0] == pytest.approx(math.sqrt(2.0), rel=0.2)


def test_cartpole_heavier_cart_accelerates_less():
    d = CARTPOLE.default()
    vec = CARTPOLE.make_vec([d, scaled(d, masscart=2.0), scaled(d, masscart=0.5)], autoreset_mode="disabled",
                            dtype=torch.float64)
    vec.reset(seed=0)
    vec._state.zero_()
    obs, *_ = vec.step(torch.ones(3, dtype=torch.long))
    x_dot = obs[:, 1].double()
    assert x_dot[1] < x_dot[0] < x_dot[2]
    # from rest and upright, a push F accelerates the cart by F / (M - 3 m / 4) (rod pole of mass m, M = total mass)
    m, cart = 0.1, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    np.testing.assert_allclose(x_dot, 0.02 * 10.0 / (cart + m - 0.75 * m), rtol=1e-6)


def test_cartpole_reward_after_termination_is_zero_in_single_and_batched():
    vec = CARTPOLE.make_vec([CARTPOLE.default()], autoreset_mode="disabled", dtype=torch.float64)
    vec.reset(seed=0)
    env = CARTPOLE.make()
    env.reset(seed=0)
    env._state = vec._state[0].numpy().copy()
    rewards_b, rewards_s, terms = [], [], []
    for _ in range(40):  # push right all the time: the pole falls within ~10 steps
        _, rew, term, _, _ = vec.step(torch.ones(1, dtype=torch.long))
        _, r, t, _, _ = env.step(1)
        rewards_b.append(float(rew[0]))
        rewards_s.append(r)
        terms.append(t)
    first = terms.index(True)
    assert rewards_b == rewards_s
    assert rewards_s[: first + 1] == [1.0] * (first + 1) and set(rewards_s[first + 1:]) == {0.0}


# ---------------------------------------------------------------------------------------------- Pendulum
def test_pendulum_single_matches_gymnasium():
    rng = np.random.default_rng(2)
    env, ref = PENDULUM.make(), gym.make("Pendulum-v1")

    def policy() -> np.ndarray:  # beyond the torque limit at times, to check the clipping
        return rng.uniform(-3.0, 3.0, size=(1,)).astype(np.float32)

    lengths = [run_single(env, ref, policy, seed) for seed in range(4)]
    assert lengths == [PENDULUM.horizon] * 4


def test_pendulum_batched_float64_matches_gymnasium():
    rng = np.random.default_rng(3)
    n = 3
    vec = PENDULUM.make_vec([PENDULUM.default()] * n, autoreset_mode="disabled", dtype=torch.float64)
    policy = lambda i: rng.uniform(-3.0, 3.0, size=(1,)).astype(np.float32)  # noqa: E731
    lengths = run_batched(vec, [gym.make("Pendulum-v1") for _ in range(n)], policy, episodes=2)
    assert lengths == [PENDULUM.horizon] * (2 * n)


def test_pendulum_default_is_gymnasium_pendulum():
    ref = gym.make("Pendulum-v1")
    env = PENDULUM.make()
    assert env.observation_space == ref.observation_space and env.action_space == ref.action_space
    assert PENDULUM.horizon == ref.spec.max_episode_steps == 200
    u = ref.unwrapped
    assert env.get_task() == {"m": u.m, "l": u.l, "g": u.g}


def pendulum_after(tasks: list[dict[str, float]], th: float, thdot: float, torque: float, steps: int) -> torch.Tensor:
    """[N, 2] (th, thdot) of each task's pendulum after `steps` steps from the same state and torque."""
    vec = PENDULUM.make_vec(tasks, autoreset_mode="disabled", dtype=torch.float64)
    vec.reset(seed=0)
    vec._state[:] = torch.tensor([th, thdot], dtype=torch.float64)
    for _ in range(steps):
        vec.step(torch.full((len(tasks), 1), torque))
    return vec._state.clone()


def test_pendulum_falls_faster_with_more_gravity_and_slower_when_longer():
    d = PENDULUM.default()
    tasks = [d, scaled(d, g=2.0), scaled(d, l=2.0), scaled(d, m=2.0)]
    th0 = 0.3  # th = 0 is upright
    state = pendulum_after(tasks, th0, 0.0, 0.0, 1)
    # rod pendulum: angular acceleration 3 g / (2 l) sin(th), whatever the mass
    expected = torch.tensor([3 * t["g"] / (2 * t["l"]) * math.sin(th0) * 0.05 for t in tasks], dtype=torch.float64)
    torch.testing.assert_close(state[:, 1], expected)
    fallen = (pendulum_after(tasks, th0, 0.0, 0.0, 8)[:, 0] - th0).abs()
    assert fallen[1] > fallen[0] > fallen[2]
    assert fallen[3] == pytest.approx(float(fallen[0]))


def test_pendulum_torque_turns_heavier_and_longer_pendulums_less():
    d = PENDULUM.default()
    tasks = [d, scaled(d, m=2.0), scaled(d, l=2.0)]
    thdot = pendulum_after(tasks, 0.0, 0.0, 1.5, 1)[:, 1]
    # from upright at rest, torque u gives angular acceleration 3 u / (m l^2)
    expected = torch.tensor([3 * 1.5 / (t["m"] * t["l"] ** 2) * 0.05 for t in tasks], dtype=torch.float64)
    torch.testing.assert_close(thdot, expected)
    assert thdot[0] > thdot[1] > thdot[2]


@pytest.mark.parametrize("family", [CARTPOLE, PENDULUM], ids=lambda f: f.name)
def test_ood_tasks_lie_beyond_the_training_range(family):
    d = family.default()
    for split, (lo, hi) in {"train": (0.5, 2.0), "test": (0.5, 2.0), "ood": (2.0, 3.0)}.items():
        tasks = family.sample(64, 0, split)
        for name, value in tasks.params.items():
            ratio = value.double() / d[name]
            assert ((ratio >= lo - 1e-6) & (ratio <= hi + 1e-6)).all(), (split, name)

"""Every registered family: API conformance, batched == single step for step, splits, seeding, errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from noise_tape import SingleRandom, Tape, patch_batched
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import metarl

FAMILIES = metarl.family_names()


def random_actions(space: gym.Space, n: int, steps: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if isinstance(space, gym.spaces.Discrete):
        return [rng.integers(0, space.n, size=n) for _ in range(steps)]
    low, high = np.broadcast_to(space.low, space.shape), np.broadcast_to(space.high, space.shape)
    return [rng.uniform(low * 1.5, high * 1.5, size=(n, *space.shape)).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("name", FAMILIES)
def test_single_env_passes_gymnasium_and_sb3_checkers(name):
    family = metarl.make_family(name)
    for task in family.sample(2, 1, "train").to_dicts() + [family.default()]:
        gym_check_env(family.make(task), skip_render_check=True)
        sb3_check_env(family.make(task), warn=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_gymnasium_make_and_make_vec(name):
    family = metarl.make_family(name)
    env = gym.make(family.env_id)
    assert isinstance(env.unwrapped, metarl.TaskEnv)
    vec = gym.make_vec(family.env_id, num_envs=5, vectorization_mode="vector_entry_point", device="cpu")
    assert isinstance(vec, metarl.VecTaskEnv) and vec.num_envs == 5
    params = vec.get_tasks().params
    flat = torch.cat([v.reshape(5, -1) for v in params.values()], dim=1)
    if family.hash_splits:  # families with few distinct tasks (e.g. a direction in {-1, +1}) may repeat one
        assert len(torch.unique(flat, dim=0)) == 5, "each sub-env has its own task"
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (5, *family.observation_space.shape)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_equals_single_step_for_step(name, dtype):
    family = metarl.make_family(name)
    n, steps = 6, 3 * family.horizon + 7
    tasks = family.sample(n, 3, "train")
    vec = family.make_vec(tasks, autoreset_mode="disabled", dtype=dtype)
    singles = [family.make(t) for t in tasks.to_dicts()]
    tape = Tape(n)
    patch_batched(vec, tape)
    for i, env in enumerate(singles):
        env.reset(seed=i)
        env.np_random = SingleRandom(tape, i)
    obs_b, _ = vec.reset()
    obs_s = np.stack([env.reset()[0] for env in singles])
    # outputs are float32 either way; float32 state drifts on unstable dynamics (CartPole) over long episodes
    tol = 1e-3 if dtype == torch.float32 else 1e-6
    np.testing.assert_allclose(obs_b.numpy(), obs_s, rtol=tol, atol=tol)
    for k, action in enumerate(random_actions(family.action_space, n, steps, seed=7)):
        obs_b, rew_b, term_b, trunc_b, _ = vec.step(torch.as_tensor(action))
        out = [env.step(a) for env, a in zip(singles, action)]
        np.testing.assert_allclose(obs_b.numpy(), np.stack([o[0] for o in out]), rtol=tol, atol=tol, err_msg=f"step {k}")
        np.testing.assert_allclose(rew_b.numpy(), [o[1] for o in out], rtol=tol, atol=tol, err_msg=f"step {k}")
        assert term_b.tolist() == [o[2] for o in out], f"terminated differs at step {k}"
        assert trunc_b.tolist() == [o[3] for o in out], f"truncated differs at step {k}"
        done = term_b | trunc_b
        if done.any():
            vec.reset(options={"reset_mask": done})
            for i in done.nonzero().flatten().tolist():
                singles[i].reset()


@pytest.mark.parametrize("name", FAMILIES)
def test_splits_never_overlap_and_are_seeded(name):
    family = metarl.make_family(name)
    train = family.sample(400, 0, "train")
    test = family.sample(400, 0, "test")
    flat_train, flat_test = family.flat_params(train), family.flat_params(test)
    overlap_free = family.hash_splits  # else train and test share a distribution (separate seed streams)
    assert not overlap_free or not (flat_train[:, None, :] == flat_test[None, :, :]).all(-1).any()
    again = family.sample(400, 0, "train")
    assert torch.equal(family.flat_params(again), flat_train)
    assert not torch.equal(family.flat_params(family.sample(400, 1, "train")), flat_train)
    # a seed never yields a training task as a test task, even the same seed
    for seed in range(3):
        test_s = family.flat_params(family.sample(50, seed, "test"))
        train_s = family.flat_params(family.sample(50, seed, "train"))
        assert not overlap_free or not (test_s[:, None, :] == train_s[None, :, :]).all(-1).any()
        assert not torch.equal(test_s, train_s)
    if "ood" in family.splits():
        ood = family.sample(200, 0, "ood")
        family.validate(ood)
        for spec in family.params:
            inside_train = spec.train.contains(ood.params[spec.name])
            if inside_train.all():
                continue
            assert not inside_train.any() or spec.ood.contains(ood.params[spec.name]).all()
        assert (~torch.stack([s.train.contains(ood.params[s.name]) for s in family.params]).all(0)).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_task_round_trip_and_never_changes_on_reset(name):
    family = metarl.make_family(name)
    env = family.make()
    tasks = env.sample_tasks(3)
    assert len(tasks) == 3 and all(set(t) == set(family.param_names) for t in tasks)
    env.set_task(tasks[1])
    for seed in range(3):
        env.reset(seed=seed)
        env.step(env.action_space.sample())
        assert env.get_task() == tasks[1]
    vec = family.make_vec(family.tasks_from(tasks))
    assert vec.get_tasks().to_dicts() == metarl.Tasks.from_dicts(family.name, tasks).to_dicts()


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_same_rollout(name):
    family = metarl.make_family(name)
    tasks = family.sample(8, 0)

    def run(seed):
        vec = family.make_vec(tasks)
        obs, _ = vec.reset(seed=seed)
        trace = [obs]
        for action in random_actions(family.action_space, 8, 50, seed=1):
            out = vec.step(torch.as_tensor(action))
            trace += [out[0], out[1], out[2], out[3]]
        return trace

    a, b = run(5), run(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", FAMILIES)
def test_next_step_autoreset_matches_gymnasium_semantics(name):
    family = metarl.make_family(name)
    vec = family.make_vec(family.sample(4, 0))
    vec.reset(seed=0)
    prev_done = torch.zeros(4, dtype=torch.bool)
    for action in random_actions(family.action_space, 4, 2 * family.horizon + 3, seed=2):
        obs, rew, term, trunc, _ = vec.step(torch.as_tensor(action))
        # a step after an episode end is a reset step: reward 0, not done
        assert (rew[prev_done] == 0).all() and not (term | trunc)[prev_done].any()
        prev_done = term | trunc
    assert vec.metadata["autoreset_mode"] is gym.vector.AutoresetMode.NEXT_STEP

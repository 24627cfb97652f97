"""The Gymnasium adapter: tasks reach every sub-env, stepping equals the env's own, learning, CLI, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import metarl
from metarl.checkpoint import latest_checkpoint, load_checkpoint
from metarl.config import build_config
from metarl.distributions import Choice, LogUniform, Uniform
from metarl.envs.gym_adapter import GymParam, GymTaskEnv, SubEnvError, TaskSpaceError, _seed_from, gym_family
from metarl.train import TrainConfig, make_learner, run_training

ROOT = Path(__file__).resolve().parents[1]


class GoalLine(gym.Env):
    """1-D walk to `goal`: x' = x + 0.1 a, r = -|x' - goal|; `scale` (a constructor keyword) scales the step."""

    def __init__(self, scale: float = 1.0, fail_after: int | None = None) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.goal, self.scale, self.fail_after, self.steps = 0.0, scale, fail_after, 0
        self.x = 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-0.05, 0.05))
        return np.array([self.x], dtype=np.float32), {}

    def step(self, action):
        self.steps += 1
        if self.fail_after is not None and self.steps > self.fail_after:
            raise FloatingPointError("simulator diverged")
        self.x += 0.1 * self.scale * float(np.clip(action[0], -1, 1))
        return np.array([self.x], dtype=np.float32), -abs(self.x - self.goal), False, False, {}


class TaskAwareLine(GoalLine):
    """GoalLine with its own task interface (`sample_tasks` / `set_task` / `get_task`)."""

    def sample_tasks(self, n: int) -> list[dict]:
        return [{"goal": float(g)} for g in self.np_random.uniform(-1.0, 1.0, size=n)]

    def set_task(self, task: dict) -> None:
        self.goal = float(task["goal"])

    def get_task(self) -> dict:
        return {"goal": self.goal}


class GrowingObs(GoalLine):
    """Observation length depends on a constructor keyword (a family whose spaces differ across tasks)."""

    def __init__(self, n: int = 1) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(n,), dtype=np.float32)


class DictObs(GoalLine):
    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Dict({"x": spaces.Box(-1, 1, shape=(1,))})


gym.register("metarl_test/TaskAwareLine-v0", entry_point=TaskAwareLine, max_episode_steps=10)

GOAL = GymParam("goal", Uniform(-1.0, 1.0), ood=Uniform(-2.0, 2.0, -1.0, 1.0), doc="goal position")


def goal_line(horizon: int = 10) -> metarl.TaskFamily:
    """The family `metarl train --env test_gym_adapter:goal_line` finds."""
    return gym_family("GoalLine", GoalLine, [GOAL], horizon=horizon, options={"horizon": horizon})


def failing_goal_line(fail_after: int = 150) -> metarl.TaskFamily:
    """GoalLine whose sub-envs raise once they have taken `fail_after` steps."""
    return gym_family("FailingGoalLine", GoalLine, [GOAL], horizon=10, make_kwargs={"fail_after": fail_after})


def cartpole_family() -> metarl.TaskFamily:
    return gym_family("CartPoleLength", "CartPole-v1", [GymParam("length", (0.25, 1.0), doc="half pole length")])


# ---------------------------------------------------------------- tasks reach the sub-envs
@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_tasks_reach_each_sub_env_and_get_task_returns_them(vectorization):
    family = cartpole_family()
    tasks = family.sample(3, 0)
    vec = family.make_vec(tasks, vectorization=vectorization)
    assert vec.sub_env_tasks() == tasks.to_dicts()
    lengths = vec.envs.call("get_wrapper_attr", "env")
    assert [e.unwrapped.length for e in lengths] == [t["length"] for t in tasks.to_dicts()]
    other = family.sample(3, 1)
    vec.set_tasks(other)
    assert vec.sub_env_tasks() == other.to_dicts()
    vec.reset(seed=0)
    obs, reward, term, trunc, _ = vec.step(torch.zeros(3, dtype=torch.long))
    assert obs.shape == (3, 4) and obs.dtype == torch.float32 and reward.tolist() == [1.0, 1.0, 1.0]
    vec.close()


def test_kwarg_and_set_task_parameters_reach_the_env():
    family = gym_family("Line2", TaskAwareLine, [GymParam("scale", LogUniform(0.5, 2.0), apply="kwarg"),
                                                 GymParam("goal", (-1.0, 1.0), apply="set_task")], horizon=5)
    tasks = family.sample(4, 0)
    vec = family.make_vec(tasks)
    for env, task in zip(vec.envs.envs, tasks.to_dicts()):
        assert env.env.scale == task["scale"] and env.env.get_task() == {"goal": task["goal"]}
    env = family.make(tasks.to_dicts()[0])
    built = env.env
    env.set_task({**tasks.to_dicts()[0], "goal": 0.5})
    assert env.env is built and env.env.goal == 0.5  # same keyword: no rebuild
    env.set_task(tasks.to_dicts()[1])
    assert env.env is not built and env.env.scale == tasks.to_dicts()[1]["scale"]


def test_env_with_its_own_task_interface_plugs_in_directly():
    family = metarl.make_family("metarl_test/TaskAwareLine-v0")
    assert family.param_names == ("goal",) and family.horizon == 10
    tasks = family.sample(5, 0)
    assert torch.equal(family.sample(5, 0).params["goal"], tasks.params["goal"])
    test = family.sample(5, 0, "test")
    assert not set(test.params["goal"].tolist()) & set(family.sample(200, 0).params["goal"].tolist())
    vec = family.make_vec(tasks)
    assert [e.env.unwrapped.get_task() for e in vec.envs.envs] == tasks.to_dicts()
    assert gym_family("Direct", TaskAwareLine, horizon=7).param_names == ("goal",)


# ---------------------------------------------------------------- stepping equals the env's own
def test_stepping_through_the_adapter_equals_stepping_the_env():
    family = cartpole_family()
    n, seed = 4, 11
    tasks = family.sample(n, 2)
    vec = family.make_vec(tasks, autoreset_mode="disabled")
    obs, _ = vec.reset(seed=seed)
    u = torch.rand((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float32).numpy()
    direct = [gym.make("CartPole-v1") for _ in range(n)]
    for env, task in zip(direct, tasks.to_dicts()):
        env.unwrapped.length = task["length"]
    ref = np.stack([env.reset(seed=_seed_from(u[i]))[0] for i, env in enumerate(direct)])
    np.testing.assert_array_equal(obs.numpy(), ref)
    rng = np.random.default_rng(0)
    alive = np.ones(n, dtype=bool)
    for _ in range(60):
        action = rng.integers(0, 2, size=n)
        obs, reward, term, trunc, _ = vec.step(torch.as_tensor(action))
        for i in np.flatnonzero(alive):
            o, r, te, tr, _ = direct[i].step(int(action[i]))
            np.testing.assert_array_equal(obs[i].numpy(), o)
            assert (reward[i].item(), term[i].item(), trunc[i].item()) == (r, te, tr)
        alive &= ~(term | trunc).numpy()


def test_single_adapted_env_equals_the_env_and_truncates_at_horizon():
    family = goal_line(horizon=7)
    env = family.make({"goal": 0.3})
    raw = GoalLine()
    raw.goal = 0.3
    np.testing.assert_array_equal(env.reset(seed=5)[0], raw.reset(seed=5)[0])
    for t in range(7):
        a = np.array([0.5], dtype=np.float32)
        o, r, te, tr, _ = env.step(a)
        ro, rr, *_ = raw.step(a)
        np.testing.assert_array_equal(o, ro)
        assert r == rr and tr == (t == 6)


# ---------------------------------------------------------------- learning
def test_returns_after_adaptation_beat_returns_before():
    config = build_config(TrainConfig, None, {
        "env": "test_gym_adapter:goal_line", "agent": "maml-mlp", "batch.meta_batch": 6, "batch.trajectories_per_task": 8,
        "mlp.hidden": (16,), "maml.first_order": True, "seed": 0})
    learner = make_learner(config).learn(1)
    tasks = learner.family.sample(8, 0, "test")
    curve = learner.adaptation_curve(tasks, seed=1, steps=1)["gradient_steps"]
    assert curve[1] > curve[0] + 0.5, curve


# ---------------------------------------------------------------- CLI and API
def test_env_resolves_module_attribute_and_gym_ids():
    assert metarl.make_family("test_gym_adapter:goal_line", horizon=5).horizon == 5
    assert metarl.make_family("test_gym_adapter:GOAL_LINE_FAMILY").name == "GoalLine"
    with pytest.raises(KeyError, match="NoSuchEnv-v9.*known families"):
        metarl.make_family("NoSuchEnv-v9")
    with pytest.raises(TypeError, match="CartPole-v1.*sample_tasks.*declare"):
        metarl.make_family("CartPole-v1")
    with pytest.raises(TypeError, match="expected a TaskFamily"):
        metarl.make_family("test_gym_adapter:ROOT")


GOAL_LINE_FAMILY = goal_line()


def test_cli_train_and_evaluate_take_module_attribute(tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "metarl", *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})

    run_dir = str(tmp_path / "run")
    proc = cli("train", "--env", "test_gym_adapter:goal_line", "--agent", "maml-mlp", "--iterations", "1", "--no-progress",
               "--eval-tasks", "2", "--eval-steps", "1", "--batch.meta-batch", "2", "--batch.trajectories-per-task", "2",
               "--mlp.hidden", "8", "--maml.first-order", "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "eval.json").exists()
    proc = cli("evaluate", run_dir, "--num-tasks", "2", "--steps", "1", "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GoalLine" in proc.stdout
    proc = cli("train", "--env", "NoSuchEnv-v3", "--iterations", "1", "--run-dir", str(tmp_path / "bad"))
    assert proc.returncode == 2 and "NoSuchEnv-v3" in proc.stderr and "known families" in proc.stderr


def test_readme_example_is_the_script():
    body = (ROOT / "scripts" / "custom_env_example.py").read_text().split('"""', 2)[2].lstrip("\n")
    assert f"```python\n{body}```" in (ROOT / "README.md").read_text()
    assert len(body.strip().splitlines()) <= 30


def test_custom_env_example_script_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "custom_env_example.py"), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after 1 step" in proc.stdout


# ---------------------------------------------------------------- bad input
def test_spaces_that_differ_across_tasks_are_named():
    family = gym_family("Growing", GrowingObs, [GymParam("n", Choice((1, 2)), apply="kwarg")], horizon=5,
                        hash_splits=False)
    with pytest.raises(TaskSpaceError, match=r"task \{'n': [12]\.0\} gives the observation space .*same spaces"):
        family.make_vec([{"n": 1.0}, {"n": 2.0}] if family.default()["n"] == 1.0 else [{"n": 2.0}, {"n": 1.0}])


def test_unsupported_spaces_are_named():
    with pytest.raises(TaskSpaceError, match="observation space Dict.*Box or Discrete"):
        gym_family("DictObs", DictObs, [GOAL], horizon=5)


def test_a_parameter_the_env_lacks_is_named():
    with pytest.raises(AttributeError, match="'pole_length'.*CartPoleEnv has no such attribute.*length"):
        gym_family("Bad", "CartPole-v1", [GymParam("pole_length", (0.2, 1.0))])
    with pytest.raises(TypeError, match="rejects the constructor keywords.*'pole_length'"):
        gym_family("Bad", GoalLine, [GymParam("pole_length", (0.2, 1.0), apply="kwarg")], horizon=5)
    with pytest.raises(AttributeError, match="through set_task.*GoalLine has no set_task"):
        gym_family("Bad", GoalLine, [GymParam("goal", (0.2, 1.0), apply="set_task")], horizon=5)
    with pytest.raises(ValueError, match="horizon"):
        gym_family("Bad", GoalLine, [GOAL])


def test_a_sub_env_raising_in_step_names_it_and_its_task():
    family = failing_goal_line()
    tasks = family.sample(3, 0)
    vec = family.make_vec(tasks, autoreset_mode="disabled")
    vec.reset(seed=0)
    with pytest.raises(SubEnvError, match=rf"sub-env 0 \(task \{{'goal': {tasks.to_dicts()[0]['goal']}\}}\).*"
                                          r"FloatingPointError: simulator diverged") as err:
        for _ in range(200):  # every sub-env fails at its 151st step (resets do not count)
            vec.step(torch.zeros(3, 1))
    assert isinstance(err.value.__cause__, FloatingPointError)


def test_training_run_saves_a_checkpoint_before_a_sub_env_error_stops_it(tmp_path):
    config = build_config(TrainConfig, None, {
        "env": "test_gym_adapter:failing_goal_line", "env_options": "fail_after=50", "agent": "maml-mlp",
        "iterations": 5, "checkpoint_every": 10, "progress": False, "batch.meta_batch": 2,
        "batch.trajectories_per_task": 2, "mlp.hidden": (8,)})
    with pytest.raises(SubEnvError, match="sub-env"):
        run_training(config, tmp_path / "run")
    checkpoint = latest_checkpoint(tmp_path / "run")  # written when the error stopped iteration 3 (no periodic one)
    assert checkpoint is not None and load_checkpoint(checkpoint)["iteration"] >= 1


def test_unknown_vectorization_and_a_batched_reset_mask():
    family = goal_line()
    with pytest.raises(ValueError, match="vectorization='threads'"):
        family.make_vec(family.sample(2, 0), vectorization="threads")
    async_family = gym_family("GoalLineAsync", GoalLine, [GOAL], horizon=10, vectorization="async")
    vec = async_family.make_vec(async_family.sample(2, 0))
    assert isinstance(vec.envs, gym.vector.AsyncVectorEnv) and vec.reset(seed=0)[0].shape == (2, 1)
    vec.close()
    vec = family.make_vec(family.sample(3, 0), autoreset_mode="disabled")
    first, _ = vec.reset(seed=1)
    vec.step(torch.ones(3, 1))
    moved, _ = vec.reset(options={"reset_mask": torch.tensor([False, True, False])})
    assert torch.allclose(moved[[0, 2], 0], first[[0, 2], 0] + 0.1)  # rows 0 and 2 kept their state
    assert isinstance(family.make(), GymTaskEnv)


def test_make_learner_works_on_an_adapted_family():
    learner = make_learner(build_config(TrainConfig, None, {"env": "test_gym_adapter:goal_line", "agent": "maml-mlp"}))
    assert learner.family.name == "GoalLine"


def test_discrete_spaces_one_hot_observations_and_action_checks():
    family = gym_family("FrozenLakeSlip", "FrozenLake-v1", [GymParam("is_slippery", Choice((0, 1)), apply="kwarg")],
                        hash_splits=False)
    assert family.observation_space.shape == (16,) and family.action_space == spaces.Discrete(4)
    vec = family.make_vec([{"is_slippery": 0.0}, {"is_slippery": 1.0}])
    assert [e.env.unwrapped.spec.kwargs.get("is_slippery", None) for e in vec.envs.envs] in ([0, 1], [False, True])
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (2, 16) and obs.sum(1).tolist() == [1.0, 1.0] and obs[:, 0].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="outside Discrete"):
        vec.step(torch.tensor([0, 7]))
    obs, *_ = vec.step(torch.tensor([2, 2]))
    assert obs[0, 1] == 1.0  # deterministic lake: moved right
    line = goal_line().make_vec(goal_line().sample(2, 0))
    with pytest.raises(ValueError, match="non-finite action"):
        line.step(torch.tensor([[0.0], [float("nan")]]))
    with pytest.raises(ValueError, match="shape"):
        line.step(torch.zeros(3, 1))

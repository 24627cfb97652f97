"""Baselines for the adaptation report, on the same held-out tasks and with the same adaptation budget as the agent.

- ``random-init``: a freshly initialised policy of the agent's class and config, adapted by the agent's own inner
  loop (for in-context agents: a fresh policy run in context).
- ``pretrained``: one Stable-Baselines3 PPO policy trained on the whole train distribution (a fresh train task at
  every reset), its weights copied into a metarl `MLPPolicy` and adapted with the agent's inner steps
  (Transformer agents: the MLP architecture, named ``pretrained (MLP)``).
- ``oracle``: SB3 PPO that sees the task parameters appended to its observation, trained on train tasks and
  evaluated without adaptation (a flat row).
- ``scratch``: SB3 PPO trained from scratch on each held-out task; point k is the policy after k PPO updates of
  ``trials * episodes * horizon`` env steps each, the data k inner gradient steps use.

SB3 policies are evaluated with `stable_baselines3.common.evaluation.evaluate_policy` (stochastic actions, as the
agent's own evaluation samples them). Every seed derives from the evaluation seed.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from metarl.agents.incontext import InContextLearner
from metarl.agents.maml import MAMLConfig
from metarl.agents.maml_learner import MAMLLearner, MetaBatchConfig
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.evaluation import AdaptationResult, result_from_curve
from metarl.family import TaskFamily
from metarl.seeding import derive_seed
from metarl.tasks import Tasks

BASELINES = ("random-init", "pretrained", "oracle", "scratch")
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
_VALUE_NET = [64, 64]


def _seed(*keys: int) -> int:
    """A 32-bit seed (as SB3 and numpy's legacy seeding take) derived from `keys`."""
    return derive_seed(*keys) % 2**32


@dataclass(frozen=True)
class BaselineConfig:
    """Budgets of the Stable-Baselines3 baselines."""

    ppo_steps: int = 50_000
    """PPO timesteps of the pretrained and oracle policies (on train tasks)."""
    n_envs: int = 8
    """Parallel envs of the pretrained and oracle PPO training."""

    def __post_init__(self) -> None:
        if self.ppo_steps < 1 or self.n_envs < 1:
            raise ValueError(f"ppo_steps and n_envs must be >= 1, got {self.ppo_steps}, {self.n_envs}")


def parse_baselines(text: str) -> tuple[str, ...]:
    """'random-init,oracle' -> ('random-init', 'oracle'); 'all' -> every baseline; '' -> none."""
    names = tuple(filter(None, (n.strip() for n in text.split(","))))
    if names == ("all",):
        return BASELINES
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)} (comma-separated) or 'all'")
    return names


class TaskSamplingEnv(gym.Wrapper):
    """A single task env that draws a fresh task of `split` (from its own seeded generator) at every reset."""

    def __init__(self, env: gym.Env, split: str = "train") -> None:
        super().__init__(env)
        self.split = split

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self.env.reset(seed=seed)
        task_env = self.env.unwrapped
        task_env.set_task(task_env.sample_tasks(1, self.split)[0])  # type: ignore[attr-defined]
        return self.env.reset(options=options)


class TaskParamsObservation(gym.ObservationWrapper):
    """Appends the current task's flat parameters (`family.flat_params`) to the observation."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.observation_space
        assert isinstance(space, gym.spaces.Box), "the oracle needs a Box observation space"
        self._flat = self._params()
        dim = self._flat.shape[0]
        low = np.concatenate([space.low.ravel(), np.full(dim, -np.inf)]).astype(np.float32)
        high = np.concatenate([space.high.ravel(), np.full(dim, np.inf)]).astype(np.float32)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)

    def _params(self) -> np.ndarray:
        task_env = self.env.unwrapped
        family = task_env.family  # type: ignore[attr-defined]
        return family.flat_params(family.tasks_from(task_env.get_task()))[0].numpy().astype(np.float32)  # type: ignore[attr-defined]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._flat = self._params()  # the task changes only at reset
        return self.observation(obs), info

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(observation, dtype=np.float32).ravel(), self._flat])


def _ppo(env: DummyVecEnv, mlp: MLPConfig, n_steps: int, seed: int) -> PPO:
    """SB3 PPO whose policy network has `mlp`'s hidden layers and activation (value net: 2 x 64)."""
    kwargs = {"net_arch": {"pi": list(mlp.hidden), "vf": _VALUE_NET}, "activation_fn": _ACTIVATIONS[mlp.activation],
              "log_std_init": mlp.init_log_std}
    if isinstance(env.action_space, gym.spaces.Discrete):
        del kwargs["log_std_init"]
    model = PPO("MlpPolicy", env, n_steps=n_steps, batch_size=n_steps, policy_kwargs=kwargs, seed=seed, device="cpu",
                verbose=0)
    model.set_logger(Logger(None, []))  # SB3's default logger makes an empty SB3-<time> folder in /tmp per learn()
    return model


def normalized_actions(family: TaskFamily, mlp: MLPConfig) -> bool:
    """Whether SB3 acts in [-1, 1] (rescaled to the bounds), as an `MLPPolicy` with `mlp` does."""
    space = family.action_space
    return mlp.normalize_actions and isinstance(space, gym.spaces.Box) and bool(space.is_bounded("both"))


def sb3_env(family: TaskFamily, task: Mapping[str, Any] | None = None, sample_split: str | None = None,
            oracle: bool = False, normalize: bool = False) -> gym.Env:
    """A Monitor-wrapped single env for SB3: fixed to `task`, or drawing a task of `sample_split` at every reset;
    `oracle` appends the task parameters to the observation; `normalize` rescales actions from [-1, 1]."""
    env: gym.Env = family.make(task)
    if sample_split is not None:
        env = TaskSamplingEnv(env, sample_split)
    if oracle:
        env = TaskParamsObservation(env)
    if normalize:
        env = gym.wrappers.RescaleAction(env, np.float32(-1.0), np.float32(1.0))
    return Monitor(env)


def train_population_ppo(family: TaskFamily, mlp: MLPConfig, config: BaselineConfig, seed: int, oracle: bool) -> PPO:
    """SB3 PPO trained for `config.ppo_steps` on train tasks (a fresh one per episode); `oracle` adds the task's
    parameters to the observation."""
    n_steps = max(128, family.horizon * family.episodes_per_trial)
    normalize = normalized_actions(family, mlp)
    env = DummyVecEnv([lambda: sb3_env(family, None, "train", oracle, normalize)] * config.n_envs)
    return _ppo(env, mlp, n_steps, seed).learn(config.ppo_steps)


def copy_sb3_policy(model: PPO, policy: MLPPolicy) -> MLPPolicy:
    """Copies the action network of an SB3 `MlpPolicy` (hidden layers, action head, log std) into `policy`, whose
    trunk has the same layers. The value network is not copied: MAML's inner loop uses a linear feature baseline.
    SB3 must act in the same action space as `policy` (`normalized_actions`: both in [-1, 1])."""
    sb3 = model.policy
    pairs = [(sb3.mlp_extractor.policy_net, policy.trunk), (sb3.action_net, policy.head.dist)]
    with torch.no_grad():
        for src, dst in pairs:
            source = dict(src.named_parameters())
            for name, p in dst.named_parameters():
                if source[name].shape != p.shape:
                    raise ValueError(f"cannot copy SB3 {name} {tuple(source[name].shape)} into {tuple(p.shape)}")
                p.copy_(source[name])
        if not policy.discrete:
            policy.head.log_std.copy_(sb3.log_std)
    return policy


def sb3_task_returns(model: PPO, family: TaskFamily, task: Mapping[str, Any], episodes: int, seed: int,
                     oracle: bool = False, normalize: bool = False) -> tuple[float, float]:
    """(mean return, fraction of episodes that terminated) of `model` over `episodes` episodes on one task, with
    SB3's `evaluate_policy` (stochastic actions), seeded by `seed`."""
    env = DummyVecEnv([lambda: sb3_env(family, task, None, oracle, normalize)] * episodes)
    env.seed(seed)
    set_random_seed(seed)
    ended: list[bool] = []

    def record(local: dict[str, Any], _globals: dict[str, Any]) -> None:
        if local["done"]:
            ended.append(not local["info"].get("TimeLimit.truncated", False))

    returns, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=False,
                                 return_episode_rewards=True, callback=record)
    env.close()
    return float(np.mean(returns)), float(np.mean(ended))


def fresh_learner(agent, seed: int, policy: nn.Module | None = None):
    """A learner of the agent's class and configs with freshly initialised parameters (seeded), or `policy`."""
    family = agent.family
    if policy is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            policy = type(agent.policy)(family.observation_space, family.action_space, agent.policy.config)
    if isinstance(agent, InContextLearner):
        return InContextLearner(policy, family, agent.config, device=agent.device, seed=agent.seed)
    return MAMLLearner(policy, family, agent.maml, agent.outer, agent.batch, device=agent.device, seed=agent.seed)


def _trial_shape(agent, episodes: int | None, trajectories: int | None = None) -> tuple[int, int]:
    """(trials per task, episodes per trial) of one adaptation step of `agent`."""
    if isinstance(agent, MAMLLearner):
        return trajectories or agent.batch.trajectories_per_task, episodes or agent.batch.episodes_per_trial
    return trajectories or 1, episodes or agent.episodes_per_trial


def _agent_mlp(agent) -> tuple[MLPConfig, bool]:
    """The MLP architecture of the pretrained baseline, and whether it differs from the agent's policy."""
    config = getattr(agent.policy, "config", None)
    return (config, False) if isinstance(config, MLPConfig) else (MLPConfig(), True)


def _maml_learner(agent, policy: MLPPolicy, trials: int, episodes: int) -> MAMLLearner:
    """A MAML learner with the agent's inner loop (or the default one, for in-context agents) around `policy`."""
    if isinstance(agent, MAMLLearner):
        return MAMLLearner(policy, agent.family, agent.maml, batch=agent.batch, device=agent.device, seed=agent.seed)
    batch = MetaBatchConfig(trajectories_per_task=trials, episodes_per_trial=episodes)
    return MAMLLearner(policy, agent.family, MAMLConfig(), batch=batch, device=agent.device, seed=agent.seed)


def _curve(learner, tasks: Tasks, seed: int, steps: int, episodes: int | None,
           trajectories: int | None = None, step_sizes: Sequence[float] = ()) -> dict[str, Any]:
    return learner.adaptation_curve(tasks, seed=derive_seed(seed, 2), steps=steps, episodes=episodes,
                                    trajectories=trajectories, step_sizes=step_sizes)


def random_init(agent, tasks: Tasks, steps: int, episodes: int | None, seed: int,
                trajectories: int | None = None, step_sizes: Sequence[float] = ()) -> AdaptationResult:
    """A fresh policy of the agent's type and config, adapted exactly as the agent is."""
    learner = fresh_learner(agent, derive_seed(seed, 20))
    curve = _curve(learner, tasks, seed, steps, episodes, trajectories, step_sizes)
    return result_from_curve(curve, agent.family, tasks, "random-init", seed, steps,
                             notes="fresh initialisation of the agent's policy, same adaptation")


def pretrained(agent, model: PPO, tasks: Tasks, steps: int, episodes: int | None, seed: int,
               ppo_steps: int, trajectories: int | None = None, step_sizes: Sequence[float] = ()) -> AdaptationResult:
    """The population-trained SB3 policy `model`, copied into an MLPPolicy and adapted by the agent's inner loop."""
    mlp, other_arch = _agent_mlp(agent)
    family = agent.family
    policy = copy_sb3_policy(model, MLPPolicy(family.observation_space, family.action_space, mlp))
    trials, per_trial = _trial_shape(agent, episodes, trajectories)
    learner = _maml_learner(agent, policy.to(agent.device), trials, per_trial)
    notes = (f"SB3 PPO for {ppo_steps} steps on train tasks, MLP {list(mlp.hidden)} {mlp.activation}, adapted with "
             f"the {'default' if not isinstance(agent, MAMLLearner) else 'agent'}'s MAML inner loop")
    curve = _curve(learner, tasks, seed, steps, episodes if isinstance(agent, MAMLLearner) else per_trial, trials,
                   step_sizes)
    if not isinstance(agent, MAMLLearner):
        curve = {**curve, "incontext_episodes_per_task": [], "incontext_episodes_success_per_task": []}
    return result_from_curve(curve, family, tasks, "pretrained (MLP)" if other_arch else "pretrained", seed, steps,
                             notes)


def oracle(model: PPO, family: TaskFamily, tasks: Tasks, steps: int, trials: int, seed: int, ppo_steps: int,
           normalize: bool) -> AdaptationResult:
    """SB3 PPO that observes the task parameters, evaluated on each task without adaptation (a flat row)."""
    scores = [sb3_task_returns(model, family, task, trials, _seed(seed, 30, i), oracle=True, normalize=normalize)
              for i, task in enumerate(tasks.to_dicts())]
    returns, success = [s[0] for s in scores], [s[1] for s in scores]
    curve = {"gradient_steps_per_task": [returns] * (steps + 1), "gradient_steps_success_per_task": [success] * (steps + 1)}
    return result_from_curve(curve, family, tasks, "oracle", seed, steps,
                             notes=f"SB3 PPO for {ppo_steps} steps on train tasks, task parameters in the observation")


def scratch(family: TaskFamily, mlp: MLPConfig, tasks: Tasks, steps: int, trials: int, episodes: int,
            seed: int) -> AdaptationResult:
    """SB3 PPO from scratch on each task: point k after k updates of `trials * episodes * horizon` env steps."""
    n_steps, normalize = episodes * family.horizon, normalized_actions(family, mlp)
    returns = [[0.0] * len(tasks) for _ in range(steps + 1)]
    success = [[0.0] * len(tasks) for _ in range(steps + 1)]
    for i, task in enumerate(tasks.to_dicts()):
        env = DummyVecEnv([lambda t=task: sb3_env(family, t, normalize=normalize)] * trials)
        model = _ppo(env, mlp, n_steps, _seed(seed, 40, i))
        for k in range(steps + 1):
            if k:
                model.learn(trials * n_steps, reset_num_timesteps=False)
            returns[k][i], success[k][i] = sb3_task_returns(model, family, task, trials, _seed(seed, 41, i, k),
                                                            normalize=normalize)
    curve = {"gradient_steps_per_task": returns, "gradient_steps_success_per_task": success}
    return result_from_curve(curve, family, tasks, "scratch", seed, steps,
                             notes=f"SB3 PPO per task, {trials * n_steps} env steps per point (as one inner step)")


def evaluate_baselines(agent, names: Sequence[str], task_sets: Mapping[str, Tasks], steps: int, episodes: int | None,
                       seed: int, config: BaselineConfig | None = None, trajectories: int | None = None,
                       step_sizes: Sequence[float] = (), verbose: bool = False) -> list[AdaptationResult]:
    """The `names` baselines on each split's tasks (`task_sets`: split -> the agent's evaluation tasks); the SB3
    population policies are trained once and shared by the splits. `verbose` reports progress on stderr."""

    def say(message: str) -> None:
        if verbose:
            print(f"baselines: {message}", file=sys.stderr, flush=True)

    config = config or BaselineConfig()
    family = agent.family
    mlp, _ = _agent_mlp(agent)
    trials, per_trial = _trial_shape(agent, episodes, trajectories)
    models = {}
    with torch.random.fork_rng():
        if "pretrained" in names:
            say(f"training SB3 PPO on the train tasks for {config.ppo_steps} steps (pretrained)")
            models["pretrained"] = train_population_ppo(family, mlp, config, _seed(seed, 50), oracle=False)
        if "oracle" in names:
            say(f"training SB3 PPO with the task in the observation for {config.ppo_steps} steps (oracle)")
            models["oracle"] = train_population_ppo(family, mlp, config, _seed(seed, 51), oracle=True)
        results = []
        for split, tasks in task_sets.items():
            for name in names:
                say(f"{name} on {len(tasks)} {split} tasks")
                if name == "random-init":
                    results.append(random_init(agent, tasks, steps, episodes, seed, trajectories, step_sizes))
                elif name == "pretrained":
                    results.append(pretrained(agent, models[name], tasks, steps, episodes, seed, config.ppo_steps,
                                              trajectories, step_sizes))
                elif name == "oracle":
                    results.append(oracle(models[name], family, tasks, steps, trials, seed, config.ppo_steps,
                                          normalized_actions(family, mlp)))
                elif name == "scratch":
                    results.append(scratch(family, mlp, tasks, steps, trials, per_trial, seed))
    return results


def evaluate_all(agent, splits: Sequence[str], num_tasks: int, steps: int, episodes: int | None = None, seed: int = 0,
                 baselines: Sequence[str] = (), config: BaselineConfig | None = None,
                 trajectories: int | None = None, step_sizes: Sequence[float] = (),
                 verbose: bool = False) -> list[AdaptationResult]:
    """The agent's `evaluate_adaptation` on each split, then the `baselines` on the same tasks, split by split."""
    from metarl.evaluation import evaluate_adaptation, heldout_tasks

    task_sets = {split: heldout_tasks(agent.family, split, num_tasks, seed) for split in splits}
    own = [evaluate_adaptation(agent, agent.family, split, num_tasks, steps, episodes, seed,
                               trajectories=trajectories, step_sizes=step_sizes) for split in splits]
    others = (evaluate_baselines(agent, baselines, task_sets, steps, episodes, seed, config, trajectories, step_sizes,
                                 verbose) if baselines else [])
    return sorted(own + others, key=lambda r: list(splits).index(r.split))

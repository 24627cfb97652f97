"""TabularMDP: random finite MDPs (RL2 paper). p(.|s, a) ~ flat Dirichlet, mean rewards R(s, a) ~ N(1, 1).

Every episode starts in state 0 (a fixed start state, as in RL2); the observation is the one-hot current
state; the observed reward is R(s, a) + z with z ~ N(0, 1). Episodes last `episode_length` steps (never
terminated, only truncated) and a trial is `n_episodes` episodes of the same task.

Each step draws, per sub-env, first one uniform u (the next state, by inverse CDF on p(.|s, a)) and then
one standard normal z (the reward noise).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor

from metarl.distributions import Dirichlet, Normal
from metarl.family import TaskFamily, register_family
from metarl.task_env import TaskEnv
from metarl.tasks import ParamSpec
from metarl.vec_env import VecTaskEnv

START_STATE = 0


def _spaces(n_states: int, n_actions: int) -> tuple[spaces.Box, spaces.Discrete]:
    obs = spaces.Box(0.0, 1.0, shape=(n_states,), dtype=np.float32)
    return obs, spaces.Discrete(n_actions)


def _cdf_np(transitions: np.ndarray) -> np.ndarray:
    """[S, A, S] cumulative next-state probabilities, the last bin set to exactly 1."""
    cdf = np.cumsum(transitions, axis=-1)
    cdf[..., -1] = 1.0
    return cdf


class TabularMDPEnv(TaskEnv):
    """Single tabular MDP env; the state is an int in 0..n_states-1, observed as a one-hot vector."""

    family_name = "TabularMDP"

    def __init__(self, task: dict[str, Any] | None = None, n_states: int = 10, n_actions: int = 5,
                 episode_length: int = 10, n_episodes: int = 10, render_mode: str | None = None) -> None:
        self.observation_space, self.action_space = _spaces(n_states, n_actions)
        self.render_mode = render_mode
        self.n_states = n_states
        super().__init__(task, n_states=n_states, n_actions=n_actions, episode_length=episode_length,
                         n_episodes=n_episodes)
        self._state = START_STATE
        self._t = 0

    def set_task(self, task: dict[str, Any]) -> None:
        super().set_task(task)
        self._cdf = _cdf_np(self.p["transitions"])  # (S, A, S)

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.n_states, dtype=np.float32)
        obs[self._state] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._state = START_STATE
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        a = int(self.check_action(action))
        u = float(self.np_random.random())
        z = float(self.np_random.standard_normal())
        reward = float(self.p["rewards"][self._state, a] + z)
        nxt = int(np.searchsorted(self._cdf[self._state, a], u, side="right"))
        self._state = min(nxt, self.n_states - 1)
        self._t += 1
        return self._obs(), reward, False, self._t >= self.horizon, {}


class TabularMDPVecEnv(VecTaskEnv):
    """Batched tabular MDPs: per-task CDFs [N, S, A, S] and mean rewards [N, S, A] on the device."""

    def _load_tasks(self) -> None:
        cdf = self.params["transitions"].cumsum(dim=-1)  # (N, S, A, S)
        cdf[..., -1] = 1.0
        self._cdf = cdf.contiguous()
        self._mean = self.params["rewards"]  # (N, S, A)
        self._n_states = int(cdf.shape[-1])
        self._rows = torch.arange(self.num_envs, device=self.device)  # (N,)
        self._state = torch.full((self.num_envs,), START_STATE, dtype=torch.long, device=self.device)

    def _reset_envs(self, mask: Tensor) -> None:
        self._state.masked_fill_(mask, START_STATE)

    def _step_envs(self, action: Tensor) -> tuple[Tensor, Tensor]:
        u = self._rand(self.num_envs)  # (N,)
        z = self._randn(self.num_envs)  # (N,)
        reward = self._mean[self._rows, self._state, action] + z  # (N,)
        cdf = self._cdf[self._rows, self._state, action]  # (N, S)
        nxt = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)  # (N,)
        self._state = nxt.clamp_max(self._n_states - 1)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return reward.float(), terminated

    def _observe(self) -> Tensor:
        return F.one_hot(self._state, self._n_states).float()  # (N, S)


def tabular_mdp(n_states: int = 10, n_actions: int = 5, episode_length: int = 10, n_episodes: int = 10) -> TaskFamily:
    """TabularMDP family: `n_episodes` episodes of `episode_length` steps per trial (no ood split)."""
    shape = (n_states, n_actions)
    transitions = ParamSpec("transitions", (*shape, n_states), train=Dirichlet(), test=Dirichlet(),
                            doc="p(s' | s, a), a probability vector over the last axis")
    rewards = ParamSpec("rewards", shape, train=Normal(1.0, 1.0), test=Normal(1.0, 1.0),
                        doc="mean reward R(s, a); observed rewards are N(R(s, a), 1)")
    options = {"n_states": n_states, "n_actions": n_actions, "episode_length": episode_length,
               "n_episodes": n_episodes}
    return TaskFamily(name="TabularMDP", env_id="metarl/TabularMDP-v0", params=(transitions, rewards),
                      env_cls=TabularMDPEnv, vec_env_cls=TabularMDPVecEnv, horizon=episode_length,
                      episodes_per_trial=n_episodes, options=options,
                      doc="random tabular MDP; one-hot state observation, start state 0 every episode, "
                          "r ~ N(R(s, a), 1), truncated at episode_length, never terminated")


register_family("TabularMDP", tabular_mdp)

"""Bandit: a Bernoulli multi-armed bandit (RL2 paper). Arm i pays 1 with probability p_i, else 0.

One episode is the whole trial of `n_pulls` pulls; the observation is a constant, so whatever the agent
learns about the arms it must carry in its history.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from metarl.distributions import Uniform
from metarl.family import TaskFamily, register_family
from metarl.task_env import TaskEnv
from metarl.tasks import ParamSpec
from metarl.vec_env import VecTaskEnv


def _spaces(k: int) -> tuple[spaces.Box, spaces.Discrete]:
    obs = spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
    return obs, spaces.Discrete(k)


class BanditEnv(TaskEnv):
    """Single bandit: observation always [0.0]; pulling arm a pays 1.0 if u < p[a], u ~ U[0, 1)."""

    family_name = "Bandit"

    def __init__(self, task: dict[str, Any] | None = None, k: int = 5, n_pulls: int = 100,
                 render_mode: str | None = None) -> None:
        self.observation_space, self.action_space = _spaces(k)
        self.render_mode = render_mode
        super().__init__(task, k=k, n_pulls=n_pulls)
        self._t = 0

    def _obs(self) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        arm = int(self.check_action(action))
        u = float(self.np_random.random())
        reward = float(u < self.p["p"][arm])
        self._t += 1
        return self._obs(), reward, False, self._t >= self.horizon, {}


class BanditVecEnv(VecTaskEnv):
    """Batched bandit: arm probabilities [N, k] on the device; no state besides the step count."""

    def _load_tasks(self) -> None:
        self._p = self.params["p"]  # (N, k)

    def _reset_envs(self, mask: Tensor) -> None:
        pass

    def _step_envs(self, action: Tensor) -> tuple[Tensor, Tensor]:
        u = self._rand(self.num_envs)  # (N,)
        p = self._p.gather(1, action[:, None]).squeeze(1)  # (N,)
        reward = (u < p).float()
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return reward, terminated

    def _observe(self) -> Tensor:
        return torch.zeros(self.num_envs, 1, dtype=torch.float32, device=self.device)


def bandit(k: int = 5, n_pulls: int = 100) -> TaskFamily:
    """Bandit family with `k` arms and trials of `n_pulls` pulls; p_i ~ U[0, 1] (no ood split)."""
    p = ParamSpec("p", (k,), train=Uniform(0.0, 1.0), test=Uniform(0.0, 1.0),
                  doc="success probability of each arm")
    return TaskFamily(name="Bandit", env_id="metarl/Bandit-v0", params=(p,), env_cls=BanditEnv,
                      vec_env_cls=BanditVecEnv, horizon=n_pulls, episodes_per_trial=1,
                      options={"k": k, "n_pulls": n_pulls},
                      doc="Bernoulli bandit; r = 1 with probability p[a]; one episode = one trial of n_pulls "
                          "pulls, never terminates; constant observation")


register_family("Bandit", bandit)

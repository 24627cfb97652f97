"""PointNav: 2D navigation to a goal (MAML paper). Reward -||s' - g||, actions clipped to [-0.1, 0.1]^2."""

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

MAX_STEP = 0.1
GOAL_TOLERANCE = 0.01


def _spaces() -> tuple[spaces.Box, spaces.Box]:
    obs = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
    act = spaces.Box(-MAX_STEP, MAX_STEP, shape=(2,), dtype=np.float32)
    return obs, act


class PointNavEnv(TaskEnv):
    """Single PointNav env: position s starts at (0, 0); s' = s + clip(a, -0.1, 0.1)."""

    family_name = "PointNav"

    def __init__(self, task: dict[str, Any] | None = None, horizon: int = 100, render_mode: str | None = None):
        self.observation_space, self.action_space = _spaces()
        self.render_mode = render_mode
        super().__init__(task, horizon=horizon)
        self._pos = np.zeros(2)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._pos = np.zeros(2)
        self._t = 0
        return self._pos.astype(np.float32), {}

    def step(self, action):
        a = np.clip(self.check_action(action), -MAX_STEP, MAX_STEP)
        self._pos = self._pos + a
        delta = self._pos - self.p["goal"]
        reward = -float(np.sqrt(np.sum(delta**2)))
        terminated = bool(np.all(np.abs(delta) < GOAL_TOLERANCE))
        self._t += 1
        return self._pos.astype(np.float32), reward, terminated, self._t >= self.horizon, {}


class PointNavVecEnv(VecTaskEnv):
    """Batched PointNav: positions [N, 2] on the device."""

    def _load_tasks(self) -> None:
        self._goal = self.params["goal"]  # (N, 2)
        self._pos = torch.zeros_like(self._goal)

    def _reset_envs(self, mask: Tensor) -> None:
        self._pos.masked_fill_(mask[:, None], 0.0)

    def _step_envs(self, action: Tensor) -> tuple[Tensor, Tensor]:
        self._pos += action.clamp(-MAX_STEP, MAX_STEP)  # (N, 2)
        delta = self._pos - self._goal
        reward = -torch.linalg.vector_norm(delta, dim=1)
        terminated = (delta.abs() < GOAL_TOLERANCE).all(dim=1)
        return reward.float(), terminated

    def _observe(self) -> Tensor:
        return self._pos.float().clone()


def point_nav(horizon: int = 100) -> TaskFamily:
    """PointNav family; goals g ~ U[-0.5, 0.5]^2 (ood: [-1, 1]^2 outside that box)."""
    goal = ParamSpec("goal", (2,), train=Uniform(-0.5, 0.5), test=Uniform(-0.5, 0.5),
                     ood=Uniform(-1.0, 1.0, -0.5, 0.5), doc="goal position g")
    return TaskFamily(name="PointNav", env_id="metarl/PointNav-v0", params=(goal,), env_cls=PointNavEnv,
                      vec_env_cls=PointNavVecEnv, horizon=horizon, options={"horizon": horizon},
                      doc="2D navigation to a goal; r = -||s' - g||, done within 0.01 of g per axis",
                      success_on_termination=True)


register_family("PointNav", point_nav)

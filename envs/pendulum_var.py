"""PendulumVar: Gymnasium's Pendulum-v1 with per-task mass m, length l and gravity g.

Dynamics, spaces, start state and reward are Pendulum-v1's: torque clipped to [-2, 2], angular speed clipped
to [-8, 8], a semi-implicit Euler step of 0.05 s, r = -(angle_normalize(th)^2 + 0.1 thdot^2 + 0.001 u^2),
observation (cos th, sin th, thdot); episodes never terminate and are truncated at the horizon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
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

MAX_SPEED = 8.0
MAX_TORQUE = 2.0
DT = 0.05
RESET_HIGH = (math.pi, 1.0)  # start th ~ U[-pi, pi], thdot ~ U[-1, 1]
DEFAULTS = {"m": 1.0, "l": 1.0, "g": 10.0}
DOCS = {"m": "pendulum mass (kg)", "l": "pendulum length (m)", "g": "gravitational acceleration (m/s^2)"}

Array = np.ndarray | np.floating | Tensor


def _spaces() -> tuple[spaces.Box, spaces.Box]:
    high = np.array([1.0, 1.0, MAX_SPEED], dtype=np.float32)
    obs = spaces.Box(-high, high, dtype=np.float32)
    act = spaces.Box(-MAX_TORQUE, MAX_TORQUE, shape=(1,), dtype=np.float32)
    return obs, act


def angle_normalize(th: Array) -> Array:
    """The angle wrapped to [-pi, pi)."""
    return ((th + math.pi) % (2 * math.pi)) - math.pi


def pendulum_step(th: Array, thdot: Array, u: Array, p: Mapping[str, Array], xp: ModuleType) -> tuple[Array, Array, Array]:
    """(new th, new thdot, cost) of one Pendulum-v1 step with clipped torque `u` and parameters `p`.

    Works on numpy scalars (`xp=np`) and on [N] tensors (`xp=torch`) alike.
    """
    m, length, g = p["m"], p["l"], p["g"]
    cost = angle_normalize(th) ** 2 + 0.1 * thdot**2 + 0.001 * u**2
    new_thdot = thdot + (3 * g / (2 * length) * xp.sin(th) + 3.0 / (m * length**2) * u) * DT
    new_thdot = xp.clip(new_thdot, -MAX_SPEED, MAX_SPEED)
    return th + new_thdot * DT, new_thdot, cost


class PendulumVarEnv(TaskEnv):
    """Single PendulumVar env; state (th, thdot) in float64, observed as float32 (cos th, sin th, thdot)."""

    family_name = "PendulumVar"

    def __init__(self, task: dict[str, Any] | None = None, horizon: int = 200, render_mode: str | None = None):
        self.observation_space, self.action_space = _spaces()
        self.render_mode = render_mode
        super().__init__(task, horizon=horizon)
        self._state = np.zeros(2)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        high = np.array(RESET_HIGH)
        self._state = self.np_random.uniform(-high, high, size=(2,))
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        u = np.clip(self.check_action(action), -MAX_TORQUE, MAX_TORQUE)[0]
        th, thdot, cost = pendulum_step(self._state[0], self._state[1], u, self.p, np)
        self._state = np.array([th, thdot], dtype=np.float64)
        self._t += 1
        return self._obs(), -float(cost), False, self._t >= self.horizon, {}

    def _obs(self) -> np.ndarray:
        th, thdot = self._state
        return np.array([np.cos(th), np.sin(th), thdot], dtype=np.float32)


class PendulumVarVecEnv(VecTaskEnv):
    """Batched PendulumVar: states [N, 2] (th, thdot) in `self.dtype` on the device."""

    def _load_tasks(self) -> None:
        self._state = torch.zeros(self.num_envs, 2, dtype=self.dtype, device=self.device)
        self._high = torch.tensor(RESET_HIGH, dtype=self.dtype, device=self.device)  # (2,)

    def _reset_envs(self, mask: Tensor) -> None:
        low, high = -self._high, self._high
        fresh = low + (high - low) * self._rand(self.num_envs, 2, rows=mask)  # (N, 2)
        self._state = torch.where(mask[:, None], fresh, self._state)

    def _step_envs(self, action: Tensor) -> tuple[Tensor, Tensor]:
        u = action[:, 0].to(self.dtype).clamp(-MAX_TORQUE, MAX_TORQUE)  # (N,)
        th, thdot, cost = pendulum_step(self._state[:, 0], self._state[:, 1], u, self.params, torch)
        self._state = torch.stack([th, thdot], dim=1)  # (N, 2)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return (-cost).to(torch.float32), terminated

    def _observe(self) -> Tensor:
        th, thdot = self._state.unbind(1)
        return torch.stack([th.cos(), th.sin(), thdot], dim=1).to(torch.float32)  # (N, 3)


def pendulum_var(horizon: int = 200) -> TaskFamily:
    """PendulumVar family: each of m, l, g is U[0.5, 2] x its Pendulum-v1 default (ood: U[2, 3] x default)."""
    params = tuple(
        ParamSpec(name, (), train=Uniform(0.5 * d, 2 * d), test=Uniform(0.5 * d, 2 * d), ood=Uniform(2 * d, 3 * d),
                  doc=DOCS[name])
        for name, d in DEFAULTS.items())
    return TaskFamily(name="PendulumVar", env_id="metarl/PendulumVar-v0", params=params, env_cls=PendulumVarEnv,
                      vec_env_cls=PendulumVarVecEnv, horizon=horizon, options={"horizon": horizon},
                      default_task=dict(DEFAULTS), doc="Pendulum-v1 with varied mass, length and gravity")


register_family("PendulumVar", pendulum_var)

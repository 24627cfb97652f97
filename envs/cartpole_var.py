"""CartPoleVar: Gymnasium's CartPole-v1 with per-task pole half-length, pole mass, cart mass and gravity.

Dynamics, spaces, start state, termination and reward are CartPole-v1's: an Euler step of 0.02 s, a push of
+-10 N, termination when |x| > 2.4 or |theta| > 12 degrees, reward 1 per step including the terminating one.
Steps after termination (without a reset) keep integrating and give reward 0 once the pole has fallen and
stays out of bounds, as Gymnasium's single env does (without its warning); the batched env does the same.
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

FORCE_MAG = 10.0
TAU = 0.02
THETA_LIMIT = 12 * 2 * math.pi / 360
X_LIMIT = 2.4
RESET_BOUND = 0.05
DEFAULTS = {"length": 0.5, "masspole": 0.1, "masscart": 1.0, "gravity": 9.8}
DOCS = {"length": "half the pole's length (m)", "masspole": "pole mass (kg)", "masscart": "cart mass (kg)",
        "gravity": "gravitational acceleration (m/s^2)"}

Array = np.ndarray | np.floating | Tensor
State = tuple[Array, Array, Array, Array]


def _spaces() -> tuple[spaces.Box, spaces.Discrete]:
    high = np.array([2 * X_LIMIT, np.inf, 2 * THETA_LIMIT, np.inf], dtype=np.float32)
    return spaces.Box(-high, high, dtype=np.float32), spaces.Discrete(2)


def euler_step(state: State, force: Array, p: Mapping[str, Array], xp: ModuleType) -> State:
    """(x, x_dot, theta, theta_dot) after one Euler step of CartPole-v1's equations with parameters `p`.

    Works on numpy scalars (`xp=np`) and on [N] tensors (`xp=torch`) alike.
    """
    x, x_dot, theta, theta_dot = state
    cos, sin = xp.cos(theta), xp.sin(theta)
    total_mass = p["masspole"] + p["masscart"]
    polemass_length = p["masspole"] * p["length"]
    temp = (force + polemass_length * theta_dot**2 * sin) / total_mass
    theta_acc = (p["gravity"] * sin - cos * temp) / (p["length"] * (4.0 / 3.0 - p["masspole"] * cos**2 / total_mass))
    x_acc = temp - polemass_length * theta_acc * cos / total_mass
    return x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot, theta_dot + TAU * theta_acc


def out_of_bounds(x: Array, theta: Array) -> Array:
    """True where the cart left [-2.4, 2.4] or the pole tilted more than 12 degrees."""
    return (abs(x) > X_LIMIT) | (abs(theta) > THETA_LIMIT)


class CartPoleVarEnv(TaskEnv):
    """Single CartPoleVar env; state (x, x_dot, theta, theta_dot) in float64, observed as float32."""

    family_name = "CartPoleVar"

    def __init__(self, task: dict[str, Any] | None = None, horizon: int = 500, render_mode: str | None = None):
        self.observation_space, self.action_space = _spaces()
        self.render_mode = render_mode
        super().__init__(task, horizon=horizon)
        self._state = np.zeros(4)
        self._fallen = False
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._state = self.np_random.uniform(-RESET_BOUND, RESET_BOUND, size=(4,))
        self._fallen = False
        self._t = 0
        return self._state.astype(np.float32), {}

    def step(self, action):
        force = FORCE_MAG if int(self.check_action(action)) == 1 else -FORCE_MAG
        self._state = np.array(euler_step(tuple(self._state), force, self.p, np), dtype=np.float64)
        terminated = bool(out_of_bounds(self._state[0], self._state[2]))
        reward = 1.0 if not terminated or not self._fallen else 0.0
        self._fallen = self._fallen or terminated
        self._t += 1
        return self._state.astype(np.float32), reward, terminated, self._t >= self.horizon, {}


class CartPoleVarVecEnv(VecTaskEnv):
    """Batched CartPoleVar: states [N, 4] in `self.dtype` on the device."""

    def _load_tasks(self) -> None:
        self._state = torch.zeros(self.num_envs, 4, dtype=self.dtype, device=self.device)
        self._fallen = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    def _reset_envs(self, mask: Tensor) -> None:
        fresh = -RESET_BOUND + 2 * RESET_BOUND * self._rand(self.num_envs, 4, rows=mask)  # (N, 4)
        self._state = torch.where(mask[:, None], fresh, self._state)
        self._fallen &= ~mask

    def _step_envs(self, action: Tensor) -> tuple[Tensor, Tensor]:
        force = FORCE_MAG * (2 * action.to(self.dtype) - 1)  # (N,)
        self._state = torch.stack(euler_step(self._state.unbind(1), force, self.params, torch), dim=1)  # (N, 4)
        terminated = out_of_bounds(self._state[:, 0], self._state[:, 2])
        reward = (~terminated | ~self._fallen).to(torch.float32)
        self._fallen |= terminated
        return reward, terminated

    def _observe(self) -> Tensor:
        return self._state.to(torch.float32, copy=True)


def cart_pole_var(horizon: int = 500) -> TaskFamily:
    """CartPoleVar family: each parameter U[0.5, 2] x its CartPole-v1 default (ood: U[2, 3] x default)."""
    params = tuple(
        ParamSpec(name, (), train=Uniform(0.5 * d, 2 * d), test=Uniform(0.5 * d, 2 * d), ood=Uniform(2 * d, 3 * d),
                  doc=DOCS[name])
        for name, d in DEFAULTS.items())
    return TaskFamily(name="CartPoleVar", env_id="metarl/CartPoleVar-v0", params=params, env_cls=CartPoleVarEnv,
                      vec_env_cls=CartPoleVarVecEnv, horizon=horizon, options={"horizon": horizon},
                      default_task=dict(DEFAULTS),
                      doc="CartPole-v1 with varied pole half-length, pole mass, cart mass and gravity")


register_family("CartPoleVar", cart_pole_var)

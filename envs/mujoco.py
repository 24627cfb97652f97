"""MuJoCo locomotion families on Gymnasium's v5 envs (the `mujoco` extra), built with the Gym adapter.

Rewards follow the MAML paper (`../shared/ENVS.md`), computed from the v5 envs' forward velocity
(x after minus x before, over dt), position and cost terms; observations are Gymnasium v5's (17-d for
HalfCheetah, 105-d for Ant), not the 2017 code's 20-d / 125-d ones. Task parameters are attributes of the
unwrapped env, set by the adapter.

- HalfCheetahVel: r = -|v_x - v*| - 0.05 ||a||^2, v* ~ U[0, 2] (ood U[2, 3]).
- HalfCheetahDir: r = d v_x - 0.05 ||a||^2, d in {-1, +1}.
- AntVel: r = -|v_x - v*| + 1 - 0.005 ||a||^2 - contact cost + 0.05, v* ~ U[0, 3] (ood U[3, 4]).
- AntDir: r = d v_x - 0.005 ||a||^2 - contact cost + 0.05, d in {-1, +1}.
- AntGoal: r = -||xy - g||_1 + 4 - 0.005 ||a||^2 - contact cost + 0.05, g ~ U[-3, 3]^2 (ood [-4, 4]^2 outside it).

Contact cost = 0.0005 ||clip(cfrc_ext, -1, 1)||^2 (Ant-v5's own); Ant episodes end when the state is
non-finite or the torso height leaves [0.2, 1.0] (Ant-v5's health check); HalfCheetah never terminates.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from typing import Any

import numpy as np

from metarl.distributions import Choice, Uniform
from metarl.envs.gym_adapter import GymParam, gym_family, register_gym_family
from metarl.family import TaskFamily

HALF_CHEETAH_CTRL = 0.05
ANT_CTRL = 0.005
ANT_SURVIVE = 0.05
AVAILABLE = importlib.util.find_spec("mujoco") is not None


def _route_warning(message: str) -> None:
    if "settotalmass" in message:  # a deprecation in Gymnasium's half_cheetah.xml, harmless
        logging.getLogger(__name__).debug(message)
    else:
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


@functools.cache
def quiet_mujoco_warnings() -> None:
    """Sends MuJoCo's warnings to Python's warnings / logging instead of stdout (which e.g. `metarl envs --json` uses)."""
    import mujoco

    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_route_warning)


@functools.cache
def _cheetah_cls() -> type:
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

    quiet_mujoco_warnings()

    class HalfCheetahTaskEnv(HalfCheetahEnv):
        """HalfCheetah-v5 with a target velocity (`goal_velocity`) or direction (`direction`) reward."""

        goal_velocity: float | None = None
        direction: float | None = None

        def _get_rew(self, x_velocity: float, action: np.ndarray) -> tuple[float, dict[str, float]]:
            ctrl = HALF_CHEETAH_CTRL * float(np.sum(np.square(action)))
            if self.goal_velocity is not None:
                forward = -abs(x_velocity - self.goal_velocity)
            else:
                forward = float(self.direction) * x_velocity  # type: ignore[arg-type]
            return forward - ctrl, {"reward_forward": forward, "reward_ctrl": -ctrl}

    return HalfCheetahTaskEnv


@functools.cache
def _ant_cls() -> type:
    from gymnasium.envs.mujoco.ant_v5 import AntEnv

    quiet_mujoco_warnings()

    class AntTaskEnv(AntEnv):
        """Ant-v5 with a target velocity, direction or goal position reward."""

        goal_velocity: float | None = None
        direction: float | None = None
        goal: Any = None

        def _get_rew(self, x_velocity: float, action: np.ndarray) -> tuple[float, dict[str, float]]:
            ctrl = ANT_CTRL * float(np.sum(np.square(action)))
            contact = float(self.contact_cost)
            if self.goal_velocity is not None:
                forward = -abs(x_velocity - self.goal_velocity) + 1.0
            elif self.direction is not None:
                forward = float(self.direction) * x_velocity
            else:
                forward = -float(np.sum(np.abs(self.data.qpos[:2] - np.asarray(self.goal)))) + 4.0
            reward = forward - ctrl - contact + ANT_SURVIVE
            return reward, {"reward_forward": forward, "reward_ctrl": -ctrl, "reward_contact": -contact,
                            "reward_survive": ANT_SURVIVE}

    return AntTaskEnv


def _velocity(high: float, ood_high: float) -> GymParam:
    return GymParam("goal_velocity", Uniform(0.0, high), ood=Uniform(high, ood_high), doc="target forward velocity v*")


DIRECTION = GymParam("direction", Choice((-1.0, 1.0)), doc="direction d (+1 forward, -1 backward)")
OBS_NOTE = "Gymnasium v5 observation"


def half_cheetah_vel(horizon: int = 200) -> TaskFamily:
    """HalfCheetahVel: run at a target velocity v* ~ U[0, 2]."""
    return gym_family("HalfCheetahVel", _cheetah_cls(), [_velocity(2.0, 3.0)], horizon=horizon,
                      options={"horizon": horizon}, doc=f"HalfCheetah-v5; r = -|v_x - v*| - 0.05||a||^2 ({OBS_NOTE})")


def half_cheetah_dir(horizon: int = 200) -> TaskFamily:
    """HalfCheetahDir: run forward (d = +1) or backward (d = -1)."""
    return gym_family("HalfCheetahDir", _cheetah_cls(), [DIRECTION], horizon=horizon, options={"horizon": horizon},
                      hash_splits=False, doc=f"HalfCheetah-v5; r = d v_x - 0.05||a||^2 ({OBS_NOTE})")


def ant_vel(horizon: int = 200) -> TaskFamily:
    """AntVel: run at a target velocity v* ~ U[0, 3]."""
    return gym_family("AntVel", _ant_cls(), [_velocity(3.0, 4.0)], horizon=horizon, options={"horizon": horizon},
                      doc=f"Ant-v5; r = -|v_x - v*| + 1 - ctrl - contact + 0.05 ({OBS_NOTE})")


def ant_dir(horizon: int = 200) -> TaskFamily:
    """AntDir: run forward (d = +1) or backward (d = -1)."""
    return gym_family("AntDir", _ant_cls(), [DIRECTION], horizon=horizon, options={"horizon": horizon},
                      hash_splits=False, doc=f"Ant-v5; r = d v_x - ctrl - contact + 0.05 ({OBS_NOTE})")


def ant_goal(horizon: int = 200) -> TaskFamily:
    """AntGoal: walk to a goal position g ~ U[-3, 3]^2."""
    goal = GymParam("goal", Uniform(-3.0, 3.0), ood=Uniform(-4.0, 4.0, -3.0, 3.0), shape=(2,), doc="goal position g")
    return gym_family("AntGoal", _ant_cls(), [goal], horizon=horizon, options={"horizon": horizon},
                      doc=f"Ant-v5; r = -||xy - g||_1 + 4 - ctrl - contact + 0.05 ({OBS_NOTE})")


FAMILIES = {"HalfCheetahVel": half_cheetah_vel, "HalfCheetahDir": half_cheetah_dir, "AntVel": ant_vel,
            "AntDir": ant_dir, "AntGoal": ant_goal}

if AVAILABLE:
    for _name, _factory in FAMILIES.items():
        register_gym_family(_name, _factory)

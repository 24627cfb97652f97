"""Task families shipped with metarl; importing this package registers them (also with Gymnasium)."""

from metarl.envs import bandit, cartpole_var, pendulum_var, point_nav, tabular_mdp
from metarl.gym_registration import register_gymnasium

_BUILTIN = {
    "PointNav": "metarl.envs.point_nav:PointNavEnv",
    "Bandit": "metarl.envs.bandit:BanditEnv",
    "TabularMDP": "metarl.envs.tabular_mdp:TabularMDPEnv",
    "CartPoleVar": "metarl.envs.cartpole_var:CartPoleVarEnv",
    "PendulumVar": "metarl.envs.pendulum_var:PendulumVarEnv",
}

for _name, _entry in _BUILTIN.items():
    register_gymnasium(_name, f"metarl/{_name}-v0", _entry)

from metarl.envs import gym_adapter, mujoco  # noqa: E402  (MuJoCo families register where mujoco is installed)

__all__ = ["bandit", "cartpole_var", "gym_adapter", "mujoco", "pendulum_var", "point_nav", "tabular_mdp"]

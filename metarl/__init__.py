"""metarl: meta-reinforcement learning with batched task families, Transformer policies and MAML."""

from metarl.distributions import Dirichlet, Normal, Uniform
from metarl.evaluation import AdaptationResult, CurveStats, evaluate_adaptation
from metarl.family import TaskFamily, family_names, make_family, register_family
from metarl.task_env import TaskEnv
from metarl.tasks import SPLITS, ParamSpec, Tasks
from metarl.vec_env import VecTaskEnv

__version__ = "0.1.0"

__all__ = [
    "SPLITS", "AdaptationResult", "CurveStats", "Dirichlet", "Normal", "ParamSpec", "TaskEnv", "TaskFamily", "Tasks",
    "Uniform", "VecTaskEnv", "evaluate_adaptation", "family_names", "make_family", "register_family",
]

from metarl import envs as _builtin_envs  # noqa: E402,F401  (registers the built-in families)

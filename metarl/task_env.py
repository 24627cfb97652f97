"""`TaskEnv`: the single-env base, a `gymnasium.Env` fixed to one task, with the common task methods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from metarl.family import make_family


class TaskEnv(gym.Env):
    """One environment variant. The task is plain data (a dict of floats / lists) set at construction
    or by `set_task`; `reset()` never changes it.

    Subclasses set `family_name`, the spaces, and implement `reset` / `step`; `self.p[name]` holds the
    task's parameters as float64 numpy arrays.
    """

    family_name: str = ""

    def __init__(self, task: Mapping[str, Any] | None = None, **options: Any) -> None:
        self.family = make_family(self.family_name, **options)
        self.horizon = self.family.horizon
        self.set_task(self.family.default() if task is None else task)

    def sample_tasks(self, n: int, split: str = "train") -> list[dict[str, Any]]:
        """n tasks of this env's family, drawn from the env's own seeded `np_random`."""
        seed = int(self.np_random.integers(2**62))
        return self.family.sample(n, seed, split).to_dicts()

    def set_task(self, task: Mapping[str, Any]) -> None:
        """Fixes the env to `task` (validated against the family's parameters and ranges)."""
        tasks = self.family.tasks_from(task)
        self._task = tasks.to_dicts()[0]
        self.p = {k: v[0].double().cpu().numpy() for k, v in tasks.params.items()}

    def get_task(self) -> dict[str, Any]:
        return dict(self._task)

    def check_action(self, action: Any) -> np.ndarray:
        """The action as a numpy array, or a clear error (wrong shape, non-finite, outside Discrete(n))."""
        space = self.action_space
        arr = np.asarray(action)
        if isinstance(space, gym.spaces.Discrete):
            if arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{self.family.name}: action {action!r} must be an integer scalar in 0..{space.n - 1}")
            if not 0 <= int(arr) < space.n:
                raise ValueError(f"{self.family.name}: action {int(arr)} outside Discrete({space.n})")
            return arr
        if arr.shape != space.shape:
            raise ValueError(f"{self.family.name}: action has shape {arr.shape}, expected {space.shape}")
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{self.family.name}: action dtype {arr.dtype} is not numeric")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{self.family.name}: non-finite action {arr.tolist()}, expected finite values in {space}")
        return arr.astype(np.float64)

"""Registers task families with Gymnasium: `gymnasium.make(id)` gives a single env, and
`gymnasium.make_vec(id, num_envs, vectorization_mode="vector_entry_point")` the batched torch env."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import torch

from metarl.family import family_options, make_family
from metarl.tasks import Tasks


def make_vec_entry_point(family_name: str, num_envs: int = 1, *, tasks: Tasks | Sequence[Mapping[str, Any]] | None = None,
                         split: str = "train", task_seed: int = 0, device: torch.device | str = "cpu", **kwargs: Any):
    """The batched env of `family_name` with `num_envs` sub-envs, one task each.

    Without `tasks`, `num_envs` tasks are sampled from `split` with seed `task_seed`. Keyword arguments
    that are family options (e.g. `horizon`) configure the family; the rest go to the vector env
    (`autoreset_mode`, `validate_actions`, `seed`, `dtype`).
    """
    names = family_options(family_name)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    family = make_family(family_name, **options)
    if tasks is None:
        tasks = family.sample(num_envs, task_seed, split)
    tasks = family.tasks_from(tasks)
    if len(tasks) != num_envs:
        raise ValueError(f"make_vec({family.env_id}): got {len(tasks)} tasks for num_envs={num_envs}")
    return family.make_vec(tasks, device=device, **kwargs)


def register_gymnasium(family_name: str, env_id: str, entry_point: str) -> None:
    """Registers `env_id` (single env at `entry_point`, batched env through the family)."""
    if env_id in gym.registry:
        return
    gym.register(id=env_id, entry_point=entry_point,
                 vector_entry_point=functools.partial(make_vec_entry_point, family_name))

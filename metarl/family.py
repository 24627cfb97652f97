"""`TaskFamily`: a named family of environment variants, and the registry that finds families by name."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from metarl.tasks import SPLITS, ParamSpec, Tasks, as_generator, flatten_params, sample_params


@dataclass(frozen=True)
class TaskFamily:
    """A family of tasks: parameter specs, a batched torch env and a single Gymnasium env.

    `vec_env_cls(family, tasks, device, **kwargs)` builds the batched env; `env_cls(task=..., **options)`
    builds one `gymnasium.Env`. `options` are the family's structural settings (e.g. number of arms)
    passed to both.
    """

    name: str
    env_id: str
    params: tuple[ParamSpec, ...]
    env_cls: Callable[..., gym.Env]
    vec_env_cls: Callable[..., Any]
    horizon: int
    episodes_per_trial: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)
    default_task: Mapping[str, Any] | None = None
    doc: str = ""
    hash_splits: bool = True
    """False for families with only a few distinct tasks (all-discrete parameters): train and test then sample
    the same distributions from separate seed streams, so a test task may coincide with a training task."""
    success_on_termination: bool = False
    """True where an episode that terminates (before the horizon) has reached the task's goal: evaluation then
    reports a success rate (the fraction of episodes that terminated)."""

    @functools.cached_property
    def _probe(self) -> gym.Env:
        return self.env_cls(**self.options)

    @property
    def observation_space(self) -> gym.Space:
        return self._probe.observation_space

    @property
    def action_space(self) -> gym.Space:
        return self._probe.action_space

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.params)

    def splits(self) -> tuple[str, ...]:
        """The splits every parameter defines (always train and test; ood where declared)."""
        return tuple(sp for sp in SPLITS if all(s.dist(sp) is not None for s in self.params))

    def sample(self, n: int, generator: int | torch.Generator | None = None, split: str = "train") -> Tasks:
        """n tasks from `split`; train and test never share a task, whatever the seeds."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{self.name}.sample: n must be a positive int, got {n!r}")
        params = sample_params(self.params, int(n), as_generator(generator), split, self.name, self.hash_splits)
        return Tasks(self.name, params, split)

    def validate(self, tasks: Tasks) -> Tasks:
        """Returns `tasks` if they belong to this family and lie in its declared ranges, else raises."""
        if not isinstance(tasks, Tasks):
            raise TypeError(f"{self.name}: expected a metarl.Tasks batch, got {type(tasks).__name__}")
        if tasks.family != self.name:
            raise ValueError(f"tasks belong to family {tasks.family!r}, not {self.name!r}")
        if set(tasks.params) != set(self.param_names):
            raise ValueError(f"{self.name} tasks need parameters {sorted(self.param_names)}, got {sorted(tasks.params)}")
        for spec in self.params:
            value = tasks.params[spec.name]
            if tuple(value.shape[1:]) != spec.shape:
                raise ValueError(f"{self.name}: parameter {spec.name!r} has per-task shape {tuple(value.shape[1:])}, "
                                 f"expected {spec.shape}")
            bad = ~spec.admits(value.detach().cpu())
            if bad.any():
                i = int(bad.nonzero()[0])
                allowed = {sp: spec.describe()[sp] for sp in SPLITS}
                raise ValueError(f"{self.name}: task {i} has {spec.name}={value[i].tolist()}, outside the declared "
                                 f"ranges {allowed}")
        return tasks

    def tasks_from(self, tasks: Tasks | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Tasks:
        """Accepts a `Tasks` batch, a list of plain task dicts, or one dict; returns validated `Tasks`."""
        if isinstance(tasks, Mapping):
            tasks = [tasks]
        if not isinstance(tasks, Tasks):
            for i, t in enumerate(tasks):
                if not isinstance(t, Mapping) or set(t) != set(self.param_names):
                    keys = sorted(t) if isinstance(t, Mapping) else type(t).__name__
                    raise ValueError(f"task {i} for {self.name} has keys {keys}, expected {sorted(self.param_names)}")
            tasks = Tasks.from_dicts(self.name, list(tasks))
        return self.validate(tasks)

    def default(self) -> dict[str, Any]:
        """The task a single env uses when none is given (the family's default, else train task 0 of seed 0)."""
        if self.default_task is not None:
            return dict(self.default_task)
        return self.sample(1, 0, "train").to_dicts()[0]

    def make_vec(self, tasks: Tasks | Sequence[Mapping[str, Any]], device: torch.device | str = "cpu", **kwargs: Any):
        """The batched torch env with one sub-env per task, on `device`."""
        return self.vec_env_cls(self, self.tasks_from(tasks), device=device, **kwargs)

    def make(self, task: Mapping[str, Any] | None = None, **kwargs: Any) -> gym.Env:
        """One Gymnasium env fixed to `task` (default: `self.default()`)."""
        return self.env_cls(task=task, **self.options, **kwargs)

    def flat_params(self, tasks: Tasks) -> torch.Tensor:
        """[N, D] float tensor of all task parameters (e.g. for an oracle policy's input)."""
        return flatten_params(tasks.params, self.params)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "gymnasium_id": self.env_id,
            "observation_space": repr(self.observation_space),
            "action_space": repr(self.action_space),
            "horizon": self.horizon,
            "episodes_per_trial": self.episodes_per_trial,
            "options": dict(self.options),
            "params": {s.name: s.describe() for s in self.params},
            "doc": self.doc,
            **({} if self.hash_splits else {"splits": "train and test sample the same distribution with separate seed "
                                                      "streams: test tasks may coincide with training tasks"}),
        }


_FAMILIES: dict[str, Callable[..., TaskFamily]] = {}
_CANONICAL: dict[str, str] = {}


def _key(name: str) -> str:
    name = name.split("/")[-1]
    name = re.sub(r"-v\d+$", "", name)
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register_family(name: str, factory: Callable[..., TaskFamily]) -> None:
    """Registers `factory(**options) -> TaskFamily` under `name` (found by any spelling: 'PointNav',
    'point-nav', 'metarl/PointNav-v0')."""
    _FAMILIES[_key(name)] = factory
    _CANONICAL[_key(name)] = name


def family_names() -> list[str]:
    return sorted(_CANONICAL.values())


def _factory(name: str) -> Callable[..., TaskFamily]:
    key = _key(name)
    if key not in _FAMILIES:
        raise KeyError(f"unknown task family {name!r}; known families: {family_names()}, or a Gymnasium id whose env "
                       f"implements sample_tasks/set_task/get_task, or module:attribute naming a TaskFamily")
    return _FAMILIES[key]


def family_options(name: str) -> set[str]:
    """Names of the structural options family `name` takes (e.g. {'k', 'n_pulls'} for Bandit)."""
    return set(inspect.signature(_factory(name)).parameters)


@functools.cache
def _make_cached(key: str, options: tuple) -> TaskFamily:
    return _FAMILIES[key](**dict(options))


def make_family(name: str, **options: Any) -> TaskFamily:
    """The registered family `name` with its structural `options` (e.g. `make_family("Bandit", k=10)`).

    `name` may also be `module:attribute` (a TaskFamily, or a callable returning one) or the id of a Gymnasium env
    that implements `sample_tasks` / `set_task` / `get_task`; see `metarl.envs.gym_adapter`.
    """
    if _key(name) not in _FAMILIES:
        from metarl.envs.gym_adapter import resolve_external  # the adapter imports this module

        external = resolve_external(name, options)
        if external is not None:
            return external
    factory = _factory(name)
    key = _key(name)
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{_CANONICAL[key]} has no option(s) {unknown}; its options: {sorted(accepted)}")
    frozen = tuple(sorted(options.items()))
    try:
        hash(frozen)
    except TypeError:  # unhashable option values: build without the cache
        return factory(**options)
    return _make_cached(key, frozen)

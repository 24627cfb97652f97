"""Any Gymnasium environment as a task family: declared task parameters, one task per sub-env.

`gym_family(name, env, params)` turns a registered Gymnasium id, or an env class / factory, into a
`TaskFamily`. Each `GymParam` has a name, a distribution per split and the way it reaches the env:

- `"kwarg"`: a constructor keyword (the env is rebuilt when the value changes),
- `"attribute"`: an attribute set on the unwrapped env (e.g. CartPole's `length`),
- `"set_task"`: passed to the env's own `set_task({name: value, ...})`.

Environments that already implement `sample_tasks` / `set_task` / `get_task` plug in without declared
parameters (`gym_family(name, env)`, or `metarl train --env <their id>`). The batched env runs the single envs
in Gymnasium's `SyncVectorEnv` or `AsyncVectorEnv` (`vectorization="sync" | "async"`), each sub-env with its
own task, and converts numpy <-> torch once per step.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from torch import Tensor

from metarl.distributions import Choice, Distribution, Uniform
from metarl.family import TaskFamily, register_family
from metarl.task_env import TaskEnv
from metarl.tasks import ParamSpec, Tasks
from metarl.vec_env import VecTaskEnv

Apply = Literal["kwarg", "attribute", "set_task"]
EnvSource = str | Callable[..., gym.Env]


class SubEnvError(RuntimeError):
    """A sub-env raised; the message names the family, the sub-env index and its task."""


class TaskSpaceError(ValueError):
    """A task gives the env other spaces than the family's, or the env has spaces the adapter does not take."""


@dataclass(frozen=True)
class GymParam:
    """One declared task parameter of an adapted env.

    `train` / `test` / `ood` are distributions (a `(low, high)` tuple means `Uniform(low, high)`; `test`
    defaults to `train`). `apply` says how the value reaches the env; `target` is the keyword / attribute /
    set_task key (default: `name`). Values are floats (integers where every `Choice` value is integral), or
    nested lists for `shape != ()`.
    """

    name: str
    train: Distribution | tuple[float, float]
    test: Distribution | tuple[float, float] | None = None
    ood: Distribution | tuple[float, float] | None = None
    apply: Apply = "attribute"
    shape: tuple[int, ...] = ()
    target: str | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.apply not in ("kwarg", "attribute", "set_task"):
            raise ValueError(f"parameter {self.name!r}: apply={self.apply!r}, expected 'kwarg', 'attribute' or 'set_task'")

    def spec(self) -> ParamSpec:
        train = _dist(self.train)
        return ParamSpec(self.name, tuple(self.shape), train, _dist(self.test) if self.test is not None else train,
                         _dist(self.ood) if self.ood is not None else None, self.doc or f"{self.apply} {self.key}")

    @property
    def key(self) -> str:
        return self.target or self.name

    def value(self, x: Any) -> Any:
        """The plain task value as the env receives it."""
        train = _dist(self.train)
        if isinstance(train, Choice) and all(float(v).is_integer() for v in train.values):
            return np.asarray(x).astype(int).tolist()
        return x


def _dist(d: Distribution | tuple[float, float]) -> Distribution:
    if isinstance(d, tuple):
        return Uniform(float(d[0]), float(d[1]))
    return d


def _env_label(env: EnvSource) -> str:
    return env if isinstance(env, str) else getattr(env, "__qualname__", repr(env))


class GymAdapter:
    """How to build the inner env and apply a task to it; shared by every single env of one family."""

    def __init__(self, name: str, env: EnvSource, params: Sequence[GymParam], horizon: int,
                 make_kwargs: Mapping[str, Any] | None = None) -> None:
        self.name, self.env, self.params, self.horizon = name, env, tuple(params), horizon
        self.make_kwargs = dict(make_kwargs or {})
        self.family: TaskFamily | None = None
        self.raw_spaces: tuple[gym.Space, gym.Space] | None = None  # the default task's (reference) spaces

    def build(self, kwargs: Mapping[str, Any]) -> gym.Env:
        """A fresh inner env with constructor keywords `kwargs` (declared kwarg params + make_kwargs)."""
        try:
            env = gym.make(self.env, **kwargs) if isinstance(self.env, str) else self.env(**kwargs)
        except TypeError as err:
            declared = sorted(p.key for p in self.params if p.apply == "kwarg")
            raise TypeError(f"{self.name}: {_env_label(self.env)} rejects the constructor keywords {sorted(kwargs)} "
                            f"(declared kwarg parameters: {declared}): {err}") from err
        if not isinstance(env, gym.Env):
            raise TypeError(f"{self.name}: {_env_label(self.env)} returned {type(env).__name__}, expected a gymnasium.Env")
        return env

    def apply(self, env: gym.Env, task: Mapping[str, Any]) -> None:
        """Sets the attribute and set_task parameters of `task` on `env`."""
        base = env.unwrapped
        for p in self.params:
            if p.apply == "attribute":
                if not hasattr(base, p.key):
                    public = sorted(a for a in vars(base) if not a.startswith("_"))
                    raise AttributeError(f"{self.name}: parameter {p.name!r} is applied as attribute {p.key!r}, but "
                                         f"{type(base).__name__} has no such attribute (its attributes: {public})")
                setattr(base, p.key, p.value(task[p.name]))
        through_set_task = {p.key: p.value(task[p.name]) for p in self.params if p.apply == "set_task"}
        if through_set_task:
            try:
                set_task = env.get_wrapper_attr("set_task")
            except AttributeError as err:
                raise AttributeError(f"{self.name}: parameters {sorted(through_set_task)} are applied through set_task, "
                                     f"but {type(base).__name__} has no set_task method") from err
            set_task(through_set_task)

    def kwargs(self, task: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.make_kwargs, **{p.key: p.value(task[p.name]) for p in self.params if p.apply == "kwarg"}}


def _check_space(space: gym.Space, what: str, family: str) -> None:
    if isinstance(space, spaces.Discrete):
        if what == "action" and int(space.start) != 0:
            raise TaskSpaceError(f"{family}: Discrete action spaces must start at 0, got {space}")
        return
    if isinstance(space, spaces.Box):
        if what == "action" and len(space.shape) != 1:
            raise TaskSpaceError(f"{family}: Box action spaces must be 1-D, got shape {space.shape}")
        return
    raise TaskSpaceError(f"{family}: {what} space {space} is not supported; the adapter takes Box or Discrete spaces "
                         f"(wrap the env, e.g. with gymnasium.wrappers.FlattenObservation)")


def _observation_space(raw: gym.Space) -> spaces.Box:
    """The family's observation space: a flat Box (Discrete(n) becomes a one-hot Box of length n)."""
    if isinstance(raw, spaces.Discrete):
        return spaces.Box(0.0, 1.0, shape=(int(raw.n),), dtype=np.float32)
    assert isinstance(raw, spaces.Box)
    if len(raw.shape) == 1:
        return raw
    return spaces.Box(raw.low.reshape(-1), raw.high.reshape(-1), dtype=raw.dtype)


def _seed_from(u: np.ndarray) -> int:
    """A 48-bit seed from two uniforms (rounded to float32 first, so float32 and float64 draws agree)."""
    hi, lo = (int(np.float32(x) * 2**24) for x in u)
    return (hi << 24) | lo


class GymTaskEnv(TaskEnv):
    """One adapted env fixed to a task: the inner Gymnasium env with the task applied, truncated at the horizon.

    Each reset without a seed reseeds the inner env from this env's `np_random`, so the whole episode follows
    from this env's seed. Observations are flattened (Discrete: one-hot).
    """

    def __init__(self, adapter: GymAdapter, task: Mapping[str, Any] | None = None, sub_env_index: int | None = None,
                 render_mode: str | None = None, **options: Any) -> None:
        self.adapter, self.sub_env_index, self.render_mode = adapter, sub_env_index, render_mode
        self.family = adapter.family  # type: ignore[assignment]
        self.horizon = adapter.horizon
        self.env: gym.Env | None = None
        self._built_with: dict[str, Any] | None = None
        self._t = 0
        self.set_task(self.family.default() if task is None else task)
        raw_obs, raw_act = adapter.raw_spaces  # type: ignore[misc]
        self.observation_space = _observation_space(raw_obs)
        self.action_space = raw_act
        self._one_hot = isinstance(raw_obs, spaces.Discrete)
        self._flatten = isinstance(raw_obs, spaces.Box) and len(raw_obs.shape) != 1

    @property
    def task(self) -> dict[str, Any]:
        return self.get_task()

    @task.setter
    def task(self, task: Mapping[str, Any]) -> None:
        self.set_task(task)

    def set_task(self, task: Mapping[str, Any]) -> None:
        """Validates `task`, then applies it to the inner env (rebuilt if a constructor keyword changes)."""
        super().set_task(task)
        task = self._task
        kwargs = self.adapter.kwargs(task)
        if self.env is None or kwargs != self._built_with:
            if self.env is not None:
                self.env.close()
            self.env, self._built_with = self.adapter.build(kwargs), kwargs
        self.adapter.apply(self.env, task)
        self._check_spaces(task)

    def _check_spaces(self, task: Mapping[str, Any]) -> None:
        assert self.env is not None
        obs, act = self.env.observation_space, self.env.action_space
        if self.adapter.raw_spaces is None:
            _check_space(obs, "observation", self.adapter.name)
            _check_space(act, "action", self.adapter.name)
            self.adapter.raw_spaces = (obs, act)
            return
        ref_obs, ref_act = self.adapter.raw_spaces
        for what, got, ref in (("observation", obs, ref_obs), ("action", act, ref_act)):
            if got != ref:
                raise TaskSpaceError(f"{self.adapter.name}: task {dict(task)} gives the {what} space {got}, but the "
                                     f"family's (default task's) is {ref}; every task of a family needs the same spaces")

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super(TaskEnv, self).reset(seed=seed)
        inner_seed = seed if seed is not None else _seed_from(self.np_random.random(2))
        obs, info = self.env.reset(seed=inner_seed, options=options)  # type: ignore[union-attr]
        self._t = 0
        return self._obs(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)  # type: ignore[union-attr]
        except Exception as err:
            where = f"sub-env {self.sub_env_index}" if self.sub_env_index is not None else "env"
            raise SubEnvError(f"{self.adapter.name}: {where} (task {self._task}) raised in step: "
                              f"{type(err).__name__}: {err}") from err
        self._t += 1
        return self._obs(obs), float(reward), bool(terminated), bool(truncated) or self._t >= self.horizon, info

    def _obs(self, obs: Any) -> np.ndarray:
        if self._one_hot:
            out = np.zeros(self.observation_space.shape, dtype=np.float32)
            out[int(obs)] = 1.0
            return out
        return np.asarray(obs).reshape(-1) if self._flatten else obs

    def render(self) -> Any:
        return self.env.render() if self.env is not None else None  # type: ignore[func-returns-value]

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


class GymVecTaskEnv(VecTaskEnv):
    """The batched adapted env: Gymnasium's `SyncVectorEnv` / `AsyncVectorEnv` of `GymTaskEnv`s, one task each.

    Takes and returns torch tensors on `device` like every `VecTaskEnv` (observations and rewards float32);
    the sub-envs run on the host. Autoreset modes are Gymnasium's own; `reset(options={"reset_mask": mask})`
    resets some sub-envs (reseeding each from this env's generator). Extra keywords go to the Gymnasium vector env.
    """

    host_envs = True
    default_vectorization = "sync"

    def __init__(self, family: TaskFamily, tasks: Tasks, device: torch.device | str = "cpu", *,
                 vectorization: Literal["sync", "async"] | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 validate_actions: bool = True, dtype: torch.dtype = torch.float32, seed: int | None = None,
                 **vector_kwargs: Any) -> None:
        vectorization = vectorization or self.default_vectorization
        if vectorization not in ("sync", "async"):
            raise ValueError(f"vectorization={vectorization!r}: expected 'sync' or 'async'")
        self.vectorization, self._vector_kwargs = vectorization, vector_kwargs
        self.envs: SyncVectorEnv | AsyncVectorEnv | None = None
        super().__init__(family, tasks, device, autoreset_mode=autoreset_mode, validate_actions=validate_actions,
                         dtype=dtype, seed=seed)
        self._last_obs = torch.zeros((self.num_envs, *self.single_observation_space.shape), device=self.device)

    def _load_tasks(self) -> None:
        dicts = self.tasks.to_dicts()
        if self.envs is None:
            fns = [functools.partial(self.family.make, t, sub_env_index=i) for i, t in enumerate(dicts)]
            cls = SyncVectorEnv if self.vectorization == "sync" else AsyncVectorEnv
            mode = self.metadata["autoreset_mode"]
            # disabled: a sub-env stepped after its episode ended (padding in a rollout) restarts on its own,
            # as Gymnasium's vector envs refuse to step it; `reset` with a reset_mask starts the next episode
            inner = AutoresetMode.NEXT_STEP if mode is AutoresetMode.DISABLED else mode
            self.envs = cls(fns, autoreset_mode=inner, **self._vector_kwargs)
        else:
            self.envs.set_attr("task", dicts)

    def sub_env_tasks(self) -> list[dict[str, Any]]:
        """The task each sub-env reports through `get_task()` (in sub-env order)."""
        return list(self.envs.call("get_task"))  # type: ignore[union-attr]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Tensor, dict]:
        """Resets all sub-envs, or those in `options["reset_mask"]` ([N] bool); `seed` reseeds the env."""
        if seed is not None:
            self._gen.manual_seed(int(seed))
        mask = self._reset_mask(options)
        u = self._rand(self.num_envs, 2, rows=mask).cpu().numpy()  # (N, 2)
        mask_np = mask.cpu().numpy()
        seeds = [_seed_from(u[i]) if mask_np[i] else None for i in range(self.num_envs)]
        extra = {k: v for k, v in (options or {}).items() if k != "reset_mask"}
        if mask_np.all():
            obs, info = self.envs.reset(seed=seeds, options=extra or None)  # type: ignore[union-attr]
        elif mask_np.any():
            obs, info = self.envs.reset(seed=seeds, options={**extra, "reset_mask": mask_np})  # type: ignore[union-attr]
        else:
            return self._last_obs, {}
        self._last_obs = self._tensor(obs, np.float32)
        return self._last_obs, info

    def step(self, action: Tensor | np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor, dict]:
        obs, reward, terminated, truncated, info = self.envs.step(self._host_action(action))  # type: ignore[union-attr]
        self._last_obs = self._tensor(obs, np.float32)
        return (self._last_obs, self._tensor(reward, np.float32), self._tensor(terminated, np.bool_),
                self._tensor(truncated, np.bool_), info)

    def _host_action(self, action: Tensor | np.ndarray) -> np.ndarray:
        """The action as a numpy array for the sub-envs; checked in numpy, with `check_action`'s errors on failure."""
        arr = action.detach().cpu().numpy() if isinstance(action, Tensor) else action
        if not self.validate_actions:
            return np.asarray(arr)
        ok = isinstance(arr, np.ndarray) and arr.shape == self._action_shape and \
            (not isinstance(action, Tensor) or action.device == self.device)
        if ok and self._discrete:
            ok = arr.dtype.kind in "iu" and 0 <= arr.min() and arr.max() < self.single_action_space.n
        elif ok:
            ok = arr.dtype.kind == "f" and bool(np.isfinite(arr).all())
        if not ok:  # the precise error (or, for a valid action of an unusual type, the converted action)
            return self.check_action(action).cpu().numpy()
        return arr

    def _tensor(self, x: np.ndarray, dtype: type) -> Tensor:
        out = torch.from_numpy(np.asarray(x, dtype=dtype))  # the vector env returns fresh arrays: no copy needed
        return out if self.device.type == "cpu" else out.to(self.device)

    def close_extras(self, **kwargs: Any) -> None:
        if self.envs is not None:
            self.envs.close()


class AsyncGymVecTaskEnv(GymVecTaskEnv):
    """`GymVecTaskEnv` whose default is `AsyncVectorEnv` (one process per sub-env)."""

    default_vectorization = "async"


def gym_family(name: str, env: EnvSource, params: Sequence[GymParam] | None = None, *, horizon: int | None = None,
               make_kwargs: Mapping[str, Any] | None = None, env_id: str | None = None, episodes_per_trial: int = 1,
               hash_splits: bool = True, vectorization: Literal["sync", "async"] = "sync",
               options: Mapping[str, Any] | None = None, doc: str = "") -> TaskFamily:
    """A task family from a Gymnasium env (a registered id, or a class / factory taking keyword arguments).

    `params`: the declared task parameters; None for envs that implement `sample_tasks` / `set_task` /
    `get_task` themselves (their tasks' keys become the parameters). `horizon`: steps per episode (default:
    the id's `max_episode_steps`). `make_kwargs`: fixed constructor keywords. `vectorization`: the family's default
    Gymnasium vector env, "sync" or "async" (training uses it; `make_vec` takes it per call). The family is checked at once:
    a parameter the env lacks, or an unsupported space, raises here.
    """
    if params is None:
        params = _params_from_env(name, env, make_kwargs or {})
    names = [p.name for p in params]
    if not params or len(set(names)) != len(names):
        raise ValueError(f"{name}: declare at least one task parameter, with distinct names (got {names})")
    if horizon is None:
        spec = gym.spec(env) if isinstance(env, str) else None
        if spec is None or spec.max_episode_steps is None:
            raise ValueError(f"{name}: give horizon= (steps per episode); {_env_label(env)} declares no max_episode_steps")
        horizon = int(spec.max_episode_steps)
    adapter = GymAdapter(name, env, params, int(horizon), make_kwargs)
    family = TaskFamily(name=name, env_id=env_id or f"metarl/{name}-v0", params=tuple(p.spec() for p in params),
                        env_cls=functools.partial(GymTaskEnv, adapter),
                        vec_env_cls=GymVecTaskEnv if vectorization == "sync" else AsyncGymVecTaskEnv, horizon=int(horizon),
                        episodes_per_trial=episodes_per_trial, options=dict(options or {}), hash_splits=hash_splits,
                        doc=doc or f"{_env_label(env)} with task parameters {names} ({', '.join(p.apply for p in params)})")
    adapter.family = family
    family.observation_space  # noqa: B018  (builds the default task's env: bad params / spaces raise now)
    return family


class EnvTasks:
    """The distribution of an env's own `sample_tasks`: column `key` of tasks drawn with a seed from the generator.

    All parameters of one family share one sampler: the first parameter draws the tasks, the others read
    their columns of the same draw (`sample_params` samples parameters in declared order).
    """

    def __init__(self, sampler: _EnvSampler, key: str, first: bool) -> None:
        self.sampler, self.key, self.first = sampler, key, first

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        if self.first:
            self.sampler.draw(shape[0], int(torch.randint(2**62, (1,), generator=generator)))
        return self.sampler.column(self.key, shape)

    def contains(self, x: Tensor) -> Tensor:
        return torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)

    def describe(self) -> str:
        return f"{self.sampler.label}.sample_tasks"

    def bounds(self) -> tuple[float, float]:
        return (-np.inf, np.inf)


class _EnvSampler:
    def __init__(self, env: gym.Env, label: str) -> None:
        self.env, self.label = env, label
        self.last: list[Mapping[str, Any]] = []

    def draw(self, n: int, seed: int) -> None:
        self.env.unwrapped.np_random = np.random.Generator(np.random.PCG64(seed))
        self.last = list(self.env.get_wrapper_attr("sample_tasks")(n))

    def column(self, key: str, shape: tuple[int, ...]) -> Tensor:
        out = torch.as_tensor(np.array([t[key] for t in self.last], dtype=np.float64))
        return out.reshape(shape)


def _params_from_env(name: str, env: EnvSource, make_kwargs: Mapping[str, Any]) -> list[GymParam]:
    """One `set_task` parameter per key of the env's own tasks (drawn with its `sample_tasks`)."""
    probe = gym.make(env, **make_kwargs) if isinstance(env, str) else env(**make_kwargs)
    missing = [m for m in ("sample_tasks", "set_task", "get_task") if not hasattr(probe.unwrapped, m)]
    if missing:
        raise TypeError(f"{name}: {_env_label(env)} has no {missing}; declare its task parameters instead: "
                        f"metarl.envs.gym_adapter.gym_family(name, env, params=[GymParam(...), ...])")
    sampler = _EnvSampler(probe, _env_label(env))
    sampler.draw(4, 0)
    first = sampler.last[0]
    if not isinstance(first, Mapping):
        raise TypeError(f"{name}: {_env_label(env)}.sample_tasks returns {type(first).__name__}; the adapter needs tasks "
                        f"as dicts of numbers or arrays")
    params = []
    for i, (key, value) in enumerate(first.items()):
        try:
            shape = np.asarray(value, dtype=np.float64).shape
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name}: task value {key}={value!r} is not a number or numeric array") from err
        dist = EnvTasks(sampler, key, first=i == 0)
        params.append(GymParam(key, dist, apply="set_task", shape=shape, doc=f"{key}, from the env's sample_tasks"))  # type: ignore[arg-type]
    return params


def resolve_external(name: str, options: Mapping[str, Any]) -> TaskFamily | None:
    """A family for `module:attribute` or a Gymnasium id with a task interface; None if `name` is neither."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            raise KeyError(f"--env {name!r}: cannot import module {module!r}: {err}") from err
        if hasattr(mod, attr):
            return _family_from_attribute(name, getattr(mod, attr), options)
    if name in gym.registry:
        return _family_from_gym_id(name, tuple(sorted(options.items())))
    return None


def _family_from_attribute(name: str, obj: Any, options: Mapping[str, Any]) -> TaskFamily:
    if isinstance(obj, TaskFamily):
        if options:
            raise TypeError(f"{name} is a TaskFamily instance and takes no options, got {sorted(options)}")
        return obj
    if callable(obj):
        family = obj(**options)
        if isinstance(family, TaskFamily):
            return family
        raise TypeError(f"{name}() returned {type(family).__name__}, expected a metarl TaskFamily")
    raise TypeError(f"{name} is a {type(obj).__name__}, expected a TaskFamily or a callable returning one")


@functools.cache
def _family_from_gym_id(env_id: str, options: tuple) -> TaskFamily:
    return gym_family(env_id.replace("/", "_"), env_id, make_kwargs=dict(options), env_id=env_id)


def register_gym_family(name: str, factory: Callable[..., TaskFamily], env_id: str | None = None) -> None:
    """Registers an adapted family with metarl (`make_family`, `metarl envs`) and Gymnasium (`gym.make`, `gym.make_vec`)."""
    from metarl.gym_registration import make_vec_entry_point

    register_family(name, factory)
    env_id = env_id or f"metarl/{name}-v0"
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=functools.partial(make_single_env, name),
                     vector_entry_point=functools.partial(make_vec_entry_point, name))


def make_single_env(family_name: str, task: Mapping[str, Any] | None = None, **kwargs: Any) -> gym.Env:
    """`gym.make` entry point: the single env of a registered adapted family (family options go to the family)."""
    from metarl.family import family_options, make_family

    names = family_options(family_name)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    return make_family(family_name, **options).make(task, **kwargs)

"""`VecTaskEnv`: the batched, device-resident env base class, one sub-env per task."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import Tensor

from metarl.tasks import Tasks

if TYPE_CHECKING:
    from metarl.family import TaskFamily


def parse_autoreset_mode(mode: AutoresetMode | str) -> AutoresetMode:
    """Parses 'next_step' / 'NextStep' / AutoresetMode.NEXT_STEP (and the same for same_step, disabled)."""
    if isinstance(mode, AutoresetMode):
        return mode
    key = str(mode).replace("_", "").replace("-", "").lower()
    for m in AutoresetMode:
        if m.value.lower() == key:
            return m
    raise ValueError(f"unknown autoreset_mode {mode!r}: expected one of {[m.value for m in AutoresetMode]}")


class VecTaskEnv(VectorEnv):
    """N sub-envs, sub-env i fixed to task i; every tensor lives on `device` with leading dim N.

    `step(action[N, ...])` returns `obs, reward, terminated, truncated, info` as tensors. Episodes are
    truncated at `family.horizon` steps. Autoreset follows Gymnasium's modes: `next_step` (default, as
    `SyncVectorEnv`), `same_step` (the final observation goes to `info["final_obs"]`), or `disabled`
    (rollouts reset sub-envs themselves with `reset(options={"reset_mask": mask})`).

    Subclasses implement `_reset_envs(mask)`, `_step_envs(action) -> (reward, terminated)` and
    `_observe()`; they draw randomness only through `_rand` / `_randn` (in `_reset_envs`, with `rows=mask`
    so that only the sub-envs being reset draw).
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.NEXT_STEP}
    _window: tuple[int, int] | None = None  # (start, total) set by `set_draw_window`

    def __init__(self, family: TaskFamily, tasks: Tasks, device: torch.device | str = "cpu", *,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, validate_actions: bool = True,
                 dtype: torch.dtype = torch.float32, seed: int | None = None) -> None:
        self.family = family
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_envs = len(tasks)
        self.single_observation_space = family.observation_space
        self.single_action_space = family.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.metadata = {**type(self).metadata, "autoreset_mode": parse_autoreset_mode(autoreset_mode)}
        self.render_mode = None
        self.validate_actions = validate_actions
        self.horizon = family.horizon
        self._discrete = isinstance(self.single_action_space, gym.spaces.Discrete)
        self._action_shape = (self.num_envs, *self.single_action_space.shape)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        self._t = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self._needs_reset = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self.set_tasks(tasks)

    # ------------------------------------------------------------------ tasks
    def set_tasks(self, tasks: Tasks) -> None:
        """Gives sub-env i task i (same N); takes effect at once, so reset before the next trial."""
        tasks = self.family.validate(tasks)
        if len(tasks) != self.num_envs:
            raise ValueError(f"set_tasks: got {len(tasks)} tasks for {self.num_envs} sub-envs")
        self.tasks = tasks.to(self.device)
        self.params = {k: v.to(self.dtype) for k, v in self.tasks.params.items()}
        self._load_tasks()

    def get_tasks(self) -> Tasks:
        return self.tasks

    def _load_tasks(self) -> None:
        """Hook: precompute per-task tensors from `self.params`."""

    # ------------------------------------------------------------------ api
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Tensor, dict]:
        """Resets all sub-envs, or those in `options["reset_mask"]` ([N] bool); `seed` reseeds the env."""
        if seed is not None:
            self._gen.manual_seed(int(seed))
        mask = self._reset_mask(options)
        self._reset_envs(mask)
        self._t.masked_fill_(mask, 0)
        self._needs_reset.masked_fill_(mask, False)
        return self._observe(), {}

    def step(self, action: Tensor | np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor, dict]:
        if self.validate_actions:
            action = self.check_action(action)
        reward, terminated = self._step_envs(action)
        self._t += 1
        truncated = self._t >= self.horizon
        info: dict[str, Any] = {}
        mode = self.metadata["autoreset_mode"]
        if mode is AutoresetMode.NEXT_STEP:
            pending = self._needs_reset
            if pending.any():  # these sub-envs ended last step: this step resets them instead
                self._restart(pending)
                reward = reward.masked_fill(pending, 0.0)
                terminated = terminated & ~pending
                truncated = truncated & ~pending
            self._needs_reset = terminated | truncated
            obs = self._observe()
        elif mode is AutoresetMode.SAME_STEP:
            obs = self._observe()
            done = terminated | truncated
            if done.any():
                info["final_obs"], info["_final_obs"] = obs, done
                self._restart(done)
                obs = self._observe()
        else:
            obs = self._observe()
        return obs, reward, terminated, truncated, info

    def _restart(self, mask: Tensor) -> None:
        self._reset_envs(mask)
        self._t.masked_fill_(mask, 0)

    def close_extras(self, **kwargs: Any) -> None:
        pass

    # ------------------------------------------------------------------ checks
    def check_action(self, action: Tensor | np.ndarray) -> Tensor:
        """The action as a tensor on the env's device, or a clear error about what is wrong with it."""
        if isinstance(action, np.ndarray):
            action = torch.from_numpy(action).to(self.device)
        if not isinstance(action, Tensor):
            raise TypeError(f"{self.family.name}: action must be a torch.Tensor or numpy array of shape "
                            f"{self._action_shape}, got {type(action).__name__}")
        if action.device != self.device:
            raise ValueError(f"{self.family.name}: action is on {action.device}, the env is on {self.device}")
        if tuple(action.shape) != self._action_shape:
            raise ValueError(f"{self.family.name}: action has shape {tuple(action.shape)}, expected "
                             f"{self._action_shape} (num_envs={self.num_envs}, action_space={self.single_action_space})")
        if self._discrete:
            if action.dtype == torch.bool or action.is_floating_point() or action.is_complex():
                raise TypeError(f"{self.family.name}: Discrete actions need an integer dtype, got {action.dtype}")
            n = self.single_action_space.n
            if ((action < 0) | (action >= n)).any():
                bad = action[(action < 0) | (action >= n)][0].item()
                raise ValueError(f"{self.family.name}: action {bad} outside Discrete({n}), expected 0..{n - 1}")
            return action.long()
        if not action.is_floating_point():
            raise TypeError(f"{self.family.name}: Box actions need a floating dtype, got {action.dtype}")
        if not torch.isfinite(action).all():
            rows = (~torch.isfinite(action)).reshape(self.num_envs, -1).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"{self.family.name}: non-finite action for sub-env(s) {rows[:10]}: "
                             f"{action[rows[0]].tolist()}; expected finite values in {self.single_action_space}")
        return action.to(self.dtype)

    def _reset_mask(self, options: dict[str, Any] | None) -> Tensor:
        if not options or options.get("reset_mask") is None:
            return torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        mask = torch.as_tensor(options["reset_mask"], device=self.device)
        if mask.dtype != torch.bool or tuple(mask.shape) != (self.num_envs,):
            raise ValueError(f"reset_mask must be a bool array of shape ({self.num_envs},), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        return mask

    # ------------------------------------------------------------------ randomness
    def _rand(self, *shape: int, rows: Tensor | None = None) -> Tensor:
        """Uniform [0, 1) of `shape` (leading dim N); with `rows` ([N] bool) only those sub-envs draw, the rest get 0."""
        return self._draw(torch.rand, shape, rows)

    def _randn(self, *shape: int, rows: Tensor | None = None) -> Tensor:
        """Standard normal of `shape` (leading dim N); `rows` as in `_rand`."""
        return self._draw(torch.randn, shape, rows)

    def set_draw_window(self, start: int | None = None, total: int | None = None) -> None:
        """Draw randomness as sub-envs ``[start, start + N)`` of an env with `total` sub-envs would (a rank's shard
        of a distributed rollout); no arguments restore the plain draws. Exact for resets of all sub-envs."""
        self._window = None if start is None else (int(start), int(total if total is not None else self.num_envs))

    def _draw(self, sampler: Callable[..., Tensor], shape: tuple[int, ...], rows: Tensor | None) -> Tensor:
        window = self._window
        if window is not None:  # draw for the whole global batch, keep this shard's rows
            full = sampler((window[1], *shape[1:]), generator=self._gen, device=self.device, dtype=self.dtype)
            block = full[window[0]:window[0] + shape[0]]
            return block if rows is None else block * rows.reshape(-1, *([1] * (len(shape) - 1))).to(self.dtype)
        if rows is None:
            return sampler(shape, generator=self._gen, device=self.device, dtype=self.dtype)
        out = torch.zeros(shape, device=self.device, dtype=self.dtype)
        out[rows] = sampler((int(rows.sum()), *shape[1:]), generator=self._gen, device=self.device, dtype=self.dtype)
        return out

    # ------------------------------------------------------------------ subclass hooks
    def _reset_envs(self, mask: Tensor) -> None:
        raise NotImplementedError

    def _step_envs(self, action: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _observe(self) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.family.name}, num_envs={self.num_envs}, device={self.device})"

"""`Trajectories`: one typed batch `[N tasks, E episodes, T steps, ...]` from rollout to adaptation to update."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Trajectories:
    """Rollouts of N tasks, E episodes each, T steps per episode (padded; `valid` marks real steps).

    Consecutive groups of `episodes_per_trial` episodes of a task form one trial: the policy's history runs
    through them. `E = trials * episodes_per_trial`. The history inputs the policy consumed at each step
    (`prev_action`, `prev_reward`, `episode_start`) are stored, so sequence mode can recompute the step
    outputs exactly.
    """

    obs: Tensor  # (N, E, T, D)
    actions: Tensor  # (N, E, T, A) float for Box, (N, E, T) long for Discrete; the policy's (see HistoryPolicy.env_action)
    rewards: Tensor  # (N, E, T)
    terminated: Tensor  # (N, E, T) bool: the episode ended in a terminal state at this step
    truncated: Tensor  # (N, E, T) bool: the episode was cut at the horizon at this step
    valid: Tensor  # (N, E, T) bool: a real step (False after an episode ended)
    log_probs: Tensor  # (N, E, T) log-probability of the action under the collecting policy
    values: Tensor  # (N, E, T) value estimates of the collecting policy
    last_value: Tensor  # (N, E) value of the observation after a truncated episode's last step (0 if none)
    prev_action: Tensor  # (N, E, T, A) encoded previous action the policy saw
    prev_reward: Tensor  # (N, E, T)
    episode_start: Tensor  # (N, E, T) bool
    episodes_per_trial: int = 1

    @property
    def num_tasks(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_episodes(self) -> int:
        return self.rewards.shape[1]

    @property
    def horizon(self) -> int:
        return self.rewards.shape[2]

    @property
    def num_steps(self) -> int:
        """Number of real (valid) env steps in the batch."""
        return int(self.valid.sum())

    def episode_returns(self) -> Tensor:
        """(N, E) undiscounted return of each episode."""
        return (self.rewards * self.valid).sum(dim=2)

    def trial_sequences(self, x: Tensor) -> Tensor:
        """Regroups (N, E, T, ...) into (N, trials, episodes_per_trial * T, ...): one sequence per trial."""
        n, e, t = x.shape[:3]
        return x.reshape(n, e // self.episodes_per_trial, self.episodes_per_trial * t, *x.shape[3:])

    def to(self, device: torch.device | str) -> Trajectories:
        return self.map(lambda v: v.to(device))

    def map(self, fn) -> Trajectories:
        """Applies `fn` to every tensor field."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Trajectories(**{k: fn(v) if isinstance(v, Tensor) else v for k, v in fields.items()})

    def select_tasks(self, index: Tensor | slice) -> Trajectories:
        return self.map(lambda v: v[index])

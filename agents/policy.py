"""Pieces shared by the policies: spaces, the per-step input token, input checks, output heads.

Inputs per step (the "token"), identical for every policy:

- ``obs`` ``[.., D]`` float: the observation.
- ``prev_action`` ``[.., A]`` float: the previous action as given by `encode_prev_action` (Box: the raw action;
  Discrete(n): a one-hot vector of size n, so A = n); all zeros at the first step of a trial.
- ``prev_reward`` ``[..]`` float: the previous reward; 0 at the first step of a trial.
- ``episode_start`` ``[..]`` bool: True on the first step of each episode.

Sequence mode takes ``[B, T, ...]`` (whole histories) and an optional ``valid [B, T]`` bool mask (False marks
padding: steps after an episode ended early); step mode takes ``[B, ...]`` (one step with a cache) and an optional
``step_mask [B]`` bool (False: the row's step is padding and leaves the cache as it was).

`HistoryPolicy` is the base of both policies: it holds the spaces and the action-distribution methods a rollout
engine calls without importing this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from gymnasium import spaces
from torch import Tensor, nn

from . import distributions as D


class PolicyOutput(NamedTuple):
    """What a policy returns for each step.

    ``dist`` is the Gaussian mean (Box) or the logits (Discrete), ``[.., A]``. ``log_std`` is the state-independent
    log standard deviation expanded to the shape of ``dist`` (Box; a broadcast view of one ``[A]`` parameter) or an
    empty placeholder ``[.., 0]`` (Discrete). ``value`` is the state value ``[..]``. All three share the leading
    dims ``[..]``, so outputs can be reshaped, stacked or indexed field by field.
    """

    dist: Tensor
    log_std: Tensor
    value: Tensor


@dataclass(frozen=True)
class SpaceSpec:
    """The sizes a policy reads from its spaces."""

    obs_dim: int
    """D: the length of an observation vector."""
    action_dim: int
    """A: the width of ``prev_action`` and of ``PolicyOutput.dist`` (Box: action length; Discrete: n)."""
    discrete: bool
    """True for a Discrete action space (categorical policy), False for a Box (diagonal Gaussian)."""

    @property
    def token_dim(self) -> int:
        """Width of the concatenated token [obs, prev_action, prev_reward, episode_start]."""
        return self.obs_dim + self.action_dim + 2

    @staticmethod
    def from_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> SpaceSpec:
        """Checks the spaces and reads their sizes; raises for a space a policy cannot handle."""
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise TypeError(f"observation space must be a 1-D gymnasium.spaces.Box, got {observation_space}")
        return SpaceSpec(observation_space.shape[0], action_input_dim(action_space), isinstance(action_space, spaces.Discrete))


def action_input_dim(action_space: spaces.Space) -> int:
    """A: the width of an encoded action (Box: its length; Discrete(n): n)."""
    if isinstance(action_space, spaces.Discrete):
        if int(action_space.start) != 0:
            raise ValueError(f"Discrete action spaces must start at 0, got {action_space}")
        return int(action_space.n)
    if isinstance(action_space, spaces.Box) and len(action_space.shape) == 1 and action_space.shape[0] > 0:
        return action_space.shape[0]
    raise TypeError(f"action space must be a 1-D gymnasium.spaces.Box or a Discrete, got {action_space}")


def encode_prev_action(action: Tensor, action_space: spaces.Space, dtype: torch.dtype = torch.float32) -> Tensor:
    """Turns actions into the ``prev_action`` input.

    Box ``[.., A]`` -> float ``[.., A]``; Discrete int ``[..]`` -> one-hot ``[.., n]``.
    """
    size = action_input_dim(action_space)
    if isinstance(action_space, spaces.Discrete):
        classes = torch.arange(size, device=action.device)  # (n,)
        return (action.long().unsqueeze(-1) == classes).to(dtype)  # (.., n)
    return action.to(dtype)


def make_token(obs: Tensor, prev_action: Tensor, prev_reward: Tensor, episode_start: Tensor, dtype: torch.dtype) -> Tensor:
    """Concatenates one step's inputs: ``[.., D + A + 2]`` in `dtype`."""
    parts = [obs, prev_action, prev_reward.unsqueeze(-1), episode_start.unsqueeze(-1)]
    return torch.cat([p.to(dtype) for p in parts], dim=-1)


def check_inputs(
    spec: SpaceSpec, obs: Tensor, prev_action: Tensor, prev_reward: Tensor, episode_start: Tensor, step: bool
) -> None:
    """Raises early, naming the bad shape or dtype and what was expected (step mode: ``[B, ..]``; sequence: ``[B, T, ..]``)."""
    lead_names = "[B]" if step else "[B, T]"
    n_lead = 1 if step else 2
    if obs.dim() != n_lead + 1 or obs.shape[-1] != spec.obs_dim:
        raise ValueError(
            f"obs has shape {tuple(obs.shape)}, expected {lead_names[:-1]}, {spec.obs_dim}] "
            f"({'step' if step else 'sequence'} mode)"
        )
    lead = tuple(obs.shape[:-1])
    _check(prev_action, lead + (spec.action_dim,), "prev_action")
    _check(prev_reward, lead, "prev_reward")
    _check(episode_start, lead, "episode_start")
    if not obs.is_floating_point() or not prev_action.is_floating_point() or not prev_reward.is_floating_point():
        raise TypeError(
            f"obs, prev_action, prev_reward must be floating point, got {obs.dtype}, {prev_action.dtype}, {prev_reward.dtype}"
        )
    if episode_start.dtype != torch.bool:
        raise TypeError(f"episode_start must be torch.bool, got {episode_start.dtype}")


def check_mask(mask: Tensor | None, lead: tuple[int, ...], name: str) -> None:
    """Raises unless `mask` is None or a bool tensor of shape `lead` (``[B, T]`` for ``valid``, ``[B]`` for ``step_mask``)."""
    if mask is None:
        return
    _check(mask, lead, name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be torch.bool, got {mask.dtype}")


def check_mode_kwargs(step: bool, valid: Tensor | None, step_mask: Tensor | None, inplace: bool,
                      history_bound: int | None = None) -> None:
    """Raises for an option of the other mode (``valid`` is for sequence mode, ``step_mask``, ``inplace`` and
    ``history_bound`` for step mode) and for a ``history_bound`` below 1."""
    if step and valid is not None:
        raise ValueError("valid is a sequence-mode mask ([B, T]); in step mode pass step_mask ([B])")
    if not step and (step_mask is not None or inplace or history_bound is not None):
        raise ValueError("step_mask, inplace and history_bound need step mode (a cache); in sequence mode pass valid "
                         "([B, T])")
    if history_bound is not None and history_bound < 1:
        raise ValueError(f"history_bound must be >= 1 (the step being taken counts), got {history_bound}")


def _check(x: Tensor, expected: tuple[int, ...], name: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {expected}")


class PolicyHead(nn.Module):
    """Linear action head, linear value head and the state-independent ``log_std`` (a buffer ``[0]`` for Discrete)."""

    log_std: Tensor

    def __init__(self, spec: SpaceSpec, dist_in: int, value_in: int, init_log_std: float):
        super().__init__()
        self.dist = nn.Linear(dist_in, spec.action_dim)
        self.value = nn.Linear(value_in, 1)
        if spec.discrete:
            self.register_buffer("log_std", torch.zeros(0))
        else:
            self.log_std = nn.Parameter(torch.full((spec.action_dim,), float(init_log_std)))
        nn.init.normal_(self.dist.weight, std=0.01)
        nn.init.zeros_(self.dist.bias)
        nn.init.normal_(self.value.weight, std=1.0 / value_in**0.5)
        nn.init.zeros_(self.value.bias)

    def forward(self, dist_features: Tensor, value_features: Tensor) -> PolicyOutput:
        """``[.., dist_in]``, ``[.., value_in]`` -> ``dist [.., A]``, ``log_std [.., A]``, ``value [..]``."""
        dist = self.dist(dist_features)  # (.., A)
        log_std = self.log_std.expand(*dist.shape[:-1], self.log_std.shape[-1])  # (.., A) or (.., 0)
        return PolicyOutput(dist, log_std, self.value(value_features).squeeze(-1))


class HistoryPolicy(nn.Module):
    """Base of the policies: the spaces, their sizes and the action distribution (delegating to `distributions`).

    `encode_prev_action`, `action_noise`, `sample_action`, `mode_action` and `log_prob` are what a rollout engine
    needs besides ``forward`` and ``initial_cache``; `entropy` and `kl` serve the learners.
    """

    action_low: Tensor
    action_high: Tensor
    reads_history: bool = True
    """Whether outputs depend on earlier steps (False for the MLP): only then do in-context episodes differ."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, normalize_actions: bool = True):
        super().__init__()
        self.spec = SpaceSpec.from_spaces(observation_space, action_space)
        self.observation_space = observation_space
        self.action_space = action_space
        bounded = isinstance(action_space, spaces.Box) and bool(action_space.is_bounded("both"))
        self.normalize_actions = normalize_actions and bounded
        if self.normalize_actions:  # not persistent: they follow from the action space
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32), persistent=False)
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32), persistent=False)

    @property
    def discrete(self) -> bool:
        """True for a Discrete action space (categorical policy)."""
        return self.spec.discrete

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the parameters."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def encode_prev_action(self, action: Tensor) -> Tensor:
        """Actions -> ``prev_action`` in the parameters' dtype (Box ``[.., A]``; Discrete ``[..]`` -> one-hot ``[.., n]``)."""
        return encode_prev_action(action, self.action_space, self.dtype)

    def action_noise(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device | str | None = None
    ) -> Tensor:
        """Noise for `sample_action` at ``batch_size`` rows, ``[batch_size, A]``, drawn from `generator`."""
        return D.make_noise((batch_size, self.spec.action_dim), self.discrete, generator, device, self.dtype)

    def sample_action(self, out: PolicyOutput, noise: Tensor) -> Tensor:
        """An action per row from `noise` (see `action_noise`): Box ``[.., A]``, Discrete int64 ``[..]``."""
        return D.sample(out, noise)

    def env_action(self, action: Tensor) -> Tensor:
        """The action the environment receives for a policy action.

        With ``normalize_actions`` and a Box with finite bounds, the policy acts in [-1, 1] per dimension and this
        maps the action, clipped to [-1, 1], linearly onto [low, high] (as Stable-Baselines3's action rescaling and
        rllab's ``normalize`` do), so that the initial Gaussian (std 1) explores the whole range. Otherwise the
        action as it is. Trajectories keep the policy's actions (what `log_prob` scores).
        """
        if not self.normalize_actions:
            return action
        low, high = self.action_low.to(action), self.action_high.to(action)
        return low + (action.clamp(-1.0, 1.0) + 1.0) * 0.5 * (high - low)

    def mode_action(self, out: PolicyOutput) -> Tensor:
        """The deterministic action: the mean (Box ``[.., A]``) or the most likely index (Discrete ``[..]``)."""
        return D.mode(out)

    def log_prob(self, out: PolicyOutput, action: Tensor) -> Tensor:
        """Log-probability of `action` per step, ``[..]``."""
        return D.log_prob(out, action, self.discrete)

    def entropy(self, out: PolicyOutput) -> Tensor:
        """Entropy per step, ``[..]``."""
        return D.entropy(out, self.discrete)

    def kl(self, old_out: PolicyOutput, new_out: PolicyOutput) -> Tensor:
        """KL(old || new) per step, ``[..]``."""
        return D.kl(old_out, new_out, self.discrete)

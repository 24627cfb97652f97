"""The classic MAML policy: an MLP from the observation to a Gaussian mean (or logits), with the Transformer's interface.

The action trunk reads only the observation: obs -> hidden layers -> mean. The value is a separate small network
on the observation (linear by default, `MLPConfig.value_hidden`), so adapting the action trunk never changes it.
``prev_action``, ``prev_reward`` and ``episode_start`` are checked and ignored, and so are the padding masks
(``valid``, ``step_mask``) and ``inplace``. Sequence mode maps each step independently; step mode returns the given
cache (an empty dict from `initial_cache`) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
from gymnasium import spaces
from torch import Tensor, nn

from .policy import HistoryPolicy, PolicyHead, PolicyOutput, check_inputs, check_mask, check_mode_kwargs

Cache = dict[str, Tensor]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class MLPConfig:
    """Sizes of `MLPPolicy`."""

    hidden: tuple[int, ...] = (100, 100)
    """Hidden layer widths of the action trunk (MAML paper: 2 x 100 ReLU)."""
    activation: Literal["relu", "tanh"] = "relu"
    """Nonlinearity after each hidden layer."""
    init_log_std: float = 0.0
    """Initial log standard deviation of the Gaussian policy (Box actions)."""
    normalize_actions: bool = True
    """Box actions with finite bounds: act in [-1, 1] and rescale linearly to [low, high] for the environment."""
    value_hidden: tuple[int, ...] = ()
    """Hidden widths of the separate value network on the observation; () means a linear value."""
    init: Literal["default", "glorot"] = "default"
    """Weight initialisation: "default" (PyTorch's for hidden layers, N(0, 0.01) action head) or "glorot"
    (Glorot-uniform weights and zero biases in every action layer, the head included: the MAML paper's rllab
    policy; a larger head lets the inner step move the hidden features too)."""

    def __post_init__(self) -> None:
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if any(h < 1 for h in self.hidden + self.value_hidden):
            raise ValueError(f"hidden widths must be >= 1, got hidden={self.hidden}, value_hidden={self.value_hidden}")
        if self.init not in ("default", "glorot"):
            raise ValueError(f"init must be 'default' or 'glorot', got {self.init!r}")


def mlp(sizes: tuple[int, ...], activation: str) -> nn.Sequential:
    """Linear layers between consecutive `sizes`, each followed by the activation."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), _ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class MLPPolicy(HistoryPolicy):
    """Feed-forward policy with the Transformer's call signature (sequence mode ``[B, T, ..]``, step mode ``[B, ..]``)."""

    reads_history = False

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, config: MLPConfig | None = None):
        config = config or MLPConfig()
        super().__init__(observation_space, action_space, config.normalize_actions)
        self.config = config
        cfg = self.config
        self.trunk = mlp((self.spec.obs_dim,) + cfg.hidden, cfg.activation)
        self.value_trunk = mlp((self.spec.obs_dim,) + cfg.value_hidden, cfg.activation)
        dist_in = cfg.hidden[-1] if cfg.hidden else self.spec.obs_dim
        value_in = cfg.value_hidden[-1] if cfg.value_hidden else self.spec.obs_dim
        self.head = PolicyHead(self.spec, dist_in, value_in, cfg.init_log_std)
        if cfg.init == "glorot":
            for layer in [*self.trunk, self.head.dist]:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def initial_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        capacity: int | None = None,
    ) -> Cache:
        """The MLP keeps no state: an empty dict (`capacity` is accepted for the common interface)."""
        return {}

    @overload
    def forward(
        self, obs: Tensor, prev_action: Tensor, prev_reward: Tensor, episode_start: Tensor,
        cache: None = None, isolate_episodes: bool = False, *, valid: Tensor | None = None,
    ) -> PolicyOutput: ...

    @overload
    def forward(
        self, obs: Tensor, prev_action: Tensor, prev_reward: Tensor, episode_start: Tensor,
        cache: Cache, isolate_episodes: bool = False, *, step_mask: Tensor | None = None, inplace: bool = False,
        history_bound: int | None = None,
    ) -> tuple[PolicyOutput, Cache]: ...

    def forward(
        self, obs: Tensor, prev_action: Tensor, prev_reward: Tensor, episode_start: Tensor,
        cache: Cache | None = None, isolate_episodes: bool = False, *, valid: Tensor | None = None,
        step_mask: Tensor | None = None, inplace: bool = False, history_bound: int | None = None,
    ) -> PolicyOutput | tuple[PolicyOutput, Cache]:
        """Sequence mode when `cache` is None, else one step returning the same cache dict, unchanged."""
        step = cache is not None
        check_inputs(self.spec, obs, prev_action, prev_reward, episode_start, step=step)
        check_mode_kwargs(step, valid, step_mask, inplace, history_bound)
        check_mask(step_mask if step else valid, tuple(episode_start.shape), "step_mask" if step else "valid")
        x = obs.to(self.head.dist.weight.dtype)
        out = self.head(self.trunk(x), self.value_trunk(x))
        return out if cache is None else (out, cache)

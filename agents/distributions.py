"""Action distributions as pure functions of a `PolicyOutput`, safe under ``torch.func.vmap`` and ``grad``.

Box actions: a diagonal Gaussian with mean ``out.dist [.., A]`` and ``out.log_std`` either ``[A]`` or with the
leading dims of ``dist`` or a prefix of them (``[N, A]`` against ``[N, M, A]``: aligned on the left, broadcast over
the rest); actions ``[.., A]``. Discrete actions: a categorical with logits ``out.dist [.., n]``; actions are int64
indices ``[..]``.
``torch.distributions`` is not used: its argument validation does not run under vmap.

Randomness comes from outside: `sample` takes ``noise`` with the shape of ``out.dist``, standard normal for Box
and uniform [0, 1) for Discrete (turned into Gumbel noise). `make_noise` and `draw_noise` draw it from a generator.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .policy import PolicyOutput

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def is_discrete(out: PolicyOutput) -> bool:
    """True when `out` comes from a Discrete-action policy (its ``log_std`` is the empty placeholder)."""
    return out.log_std.shape[-1] == 0


def aligned_log_std(out: PolicyOutput) -> Tensor:
    """``out.log_std`` reshaped to broadcast against ``out.dist``.

    ``[A]`` and ``[.., A]`` matching dist stay; ``[N, A]`` with dist ``[N, M, A]`` becomes ``[N, 1, A]``.
    """
    log_std = out.log_std
    missing = out.dist.dim() - log_std.dim()
    if missing <= 0 or log_std.dim() == 1:
        return log_std
    return log_std.reshape(*log_std.shape[:-1], *([1] * missing), log_std.shape[-1])


def log_prob(out: PolicyOutput, action: Tensor, discrete: bool) -> Tensor:
    """Log-probability of `action` per step: ``[..]``."""
    if discrete:
        logp = torch.log_softmax(out.dist, dim=-1)  # (.., n)
        return torch.gather(logp, -1, action.long().unsqueeze(-1)).squeeze(-1)
    log_std = aligned_log_std(out)
    z = (action - out.dist) * torch.exp(-log_std)  # (.., A)
    return (-0.5 * z.square() - log_std - _HALF_LOG_2PI).sum(-1)


def entropy(out: PolicyOutput, discrete: bool) -> Tensor:
    """Entropy per step: ``[..]``."""
    if discrete:
        logp = torch.log_softmax(out.dist, dim=-1)  # (.., n)
        return -(logp.exp() * logp).sum(-1)
    per_dim = (aligned_log_std(out) + 0.5 + _HALF_LOG_2PI).expand_as(out.dist)  # (.., A)
    return per_dim.sum(-1)


def kl(old_out: PolicyOutput, new_out: PolicyOutput, discrete: bool) -> Tensor:
    """KL(old || new) per step: ``[..]``."""
    if discrete:
        old_logp = torch.log_softmax(old_out.dist, dim=-1)  # (.., n)
        new_logp = torch.log_softmax(new_out.dist, dim=-1)
        return (old_logp.exp() * (old_logp - new_logp)).sum(-1)
    old_log_std, new_log_std = aligned_log_std(old_out), aligned_log_std(new_out)
    ratio = torch.exp(2 * (old_log_std - new_log_std))  # var_old / var_new, broadcasts to (.., A)
    shift = (old_out.dist - new_out.dist) * torch.exp(-new_log_std)  # (.., A)
    return 0.5 * (ratio + shift.square() - 1).sum(-1) + (new_log_std - old_log_std).expand_as(shift).sum(-1)


def sample(out: PolicyOutput, noise: Tensor) -> Tensor:
    """An action from `noise` (the shape of ``out.dist``): Box ``mean + std * noise``; Discrete Gumbel-max index ``[..]``."""
    if is_discrete(out):
        tiny = torch.finfo(noise.dtype).tiny
        gumbel = -torch.log(-torch.log(noise.clamp_min(tiny)))  # (.., n)
        return torch.argmax(out.dist + gumbel, dim=-1)
    return out.dist + torch.exp(aligned_log_std(out)) * noise


def mode(out: PolicyOutput) -> Tensor:
    """The deterministic action: the mean (Box ``[.., A]``) or the most likely index (Discrete ``[..]``)."""
    if is_discrete(out):
        return torch.argmax(out.dist, dim=-1)
    return out.dist


def make_noise(
    shape: tuple[int, ...],
    discrete: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Noise for `sample` of `shape` (that of ``out.dist``): uniform [0, 1) when `discrete`, else standard normal."""
    draw = torch.rand if discrete else torch.randn
    return draw(shape, generator=generator, device=device, dtype=dtype)


def draw_noise(out: PolicyOutput, generator: torch.Generator | None = None) -> Tensor:
    """Noise for `sample` with the shape of ``out.dist``: standard normal (Box) or uniform [0, 1) (Discrete)."""
    return make_noise(tuple(out.dist.shape), is_discrete(out), generator, out.dist.device, out.dist.dtype)

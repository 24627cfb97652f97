"""Returns, GAE, rllab's linear feature baseline and advantage normalisation for batched rollouts.

Every tensor is laid out `[N tasks, E episodes, T steps]` (observations `[N, E, T, D]`). `valid` marks the real
steps: an episode fills a prefix of its T slots and the rest is padding. `terminated` marks the step on which
an episode ended in a terminal state.

Bootstrap rules, for a valid step t:
- if `terminated[t]`, nothing follows it: the value after it is 0 and the recursion stops there;
- else if step t + 1 is valid, step t + 1 follows it;
- else t is the last valid step of a truncated episode: the value after it is `last_value` `[N, E]`, the value
  of the observation after the last valid step (0 where `last_value` is not given).

Padding is never read: whatever invalid steps hold (NaN included) changes nothing, and they come out as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: rllab clips observations to this range before building baseline features.
OBS_CLIP = 10.0
#: rllab scales the step index by this before taking its powers.
TIME_SCALE = 100.0


def _check_layout(valid: Tensor, **tensors: Tensor | None) -> None:
    """Raises unless `valid` is a bool [N, E, T] tensor and each given tensor has its shape."""
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    if valid.dim() != 3:
        raise ValueError(f"valid must have shape [N, E, T], got {tuple(valid.shape)}")
    for name, x in tensors.items():
        if x is not None and x.shape != valid.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(valid.shape)} (the shape of valid)")


def _last_value(last_value: Tensor | None, like: Tensor) -> Tensor:
    """`last_value` [N, E] checked, or zeros of that shape."""
    if last_value is None:
        return torch.zeros_like(like[..., 0])
    if last_value.shape != like.shape[:-1]:
        raise ValueError(f"last_value has shape {tuple(last_value.shape)}, expected {tuple(like.shape[:-1])}")
    return last_value


def _successors(valid: Tensor, terminated: Tensor | None) -> tuple[Tensor, Tensor]:
    """(continues, bootstraps), each [N, E, T] bool: step t is followed by step t + 1 / by `last_value`."""
    valid_next = torch.cat([valid[..., 1:], torch.zeros_like(valid[..., :1])], dim=-1)  # (N, E, T)
    live = valid if terminated is None else valid & ~terminated
    return live & valid_next, live & ~valid_next


def _shift_left(x: Tensor) -> Tensor:
    """x[..., t + 1] at position t, 0 at the last position."""
    return torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)


def _reverse_scan(x: Tensor, decay: Tensor) -> Tensor:
    """out[..., t] = x[..., t] + decay[..., t] * out[..., t + 1], with out[..., T] = 0."""
    acc = torch.zeros_like(x[..., 0])  # (N, E)
    outs = []
    for t in range(x.shape[-1] - 1, -1, -1):
        acc = x[..., t] + decay[..., t] * acc
        outs.append(acc)
    return torch.stack(outs[::-1], dim=-1)  # (N, E, T)


def discounted_returns(
    rewards: Tensor,
    valid: Tensor,
    gamma: float,
    terminated: Tensor | None = None,
    last_value: Tensor | None = None,
) -> Tensor:
    """Reward-to-go [N, E, T]: G_t = r_t + gamma * (value after t), following the module's bootstrap rules."""
    _check_layout(valid, rewards=rewards, terminated=terminated)
    boot_value = _last_value(last_value, rewards)  # (N, E)
    continues, bootstraps = _successors(valid, terminated)
    r = torch.where(valid, rewards, 0.0)  # (N, E, T)
    tail = torch.where(bootstraps, gamma * boot_value[..., None], 0.0)  # (N, E, T)
    return _reverse_scan(r + tail, gamma * continues.to(rewards.dtype))


def gae(
    rewards: Tensor,
    values: Tensor,
    valid: Tensor,
    gamma: float,
    lam: float,
    terminated: Tensor | None = None,
    last_value: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns (advantages + values), both [N, E, T], 0 at invalid steps.

    delta_t = r_t + gamma * V(after t) - V_t, with V(after t) from the module's bootstrap rules, and
    A_t = delta_t + gamma * lam * A_{t+1} while step t + 1 follows step t (the sum stops at a termination
    and at the last valid step). Differentiable in `values` and `last_value`.
    """
    _check_layout(valid, rewards=rewards, values=values, terminated=terminated)
    boot_value = _last_value(last_value, rewards)  # (N, E)
    continues, bootstraps = _successors(valid, terminated)
    r = torch.where(valid, rewards, 0.0)  # (N, E, T)
    v = torch.where(valid, values, 0.0)  # (N, E, T)
    next_v = torch.where(continues, _shift_left(v), torch.where(bootstraps, boot_value[..., None], 0.0))  # (N, E, T)
    delta = torch.where(valid, r + gamma * next_v - v, 0.0)  # (N, E, T)
    advantages = _reverse_scan(delta, gamma * lam * continues.to(delta.dtype))
    return advantages, advantages + v


def linear_baseline_features(obs: Tensor, valid: Tensor) -> Tensor:
    """rllab's baseline features [N, E, T, 2D + 4]: (o, o^2, s, s^2, s^3, 1), 0 at invalid steps.

    o is the observation clipped to [-10, 10] and s = t / 100 with t the step index within the episode.
    """
    if obs.dim() != 4 or obs.shape[:3] != valid.shape:
        raise ValueError(f"obs has shape {tuple(obs.shape)}, expected [N, E, T, D] with [N, E, T] = {tuple(valid.shape)}")
    _check_layout(valid)
    o = obs.clamp(-OBS_CLIP, OBS_CLIP)  # (N, E, T, D)
    steps = torch.arange(obs.shape[2], dtype=obs.dtype, device=obs.device) / TIME_SCALE  # (T,)
    s = steps[:, None].expand(*obs.shape[:3], 1)  # (N, E, T, 1)
    feats = torch.cat([o, o**2, s, s**2, s**3, torch.ones_like(s)], dim=-1)  # (N, E, T, 2D + 4)
    return torch.where(valid[..., None], feats, 0.0)


def fit_linear_baseline(features: Tensor, returns: Tensor, valid: Tensor, reg: float = 1e-5, attempts: int = 5) -> Tensor:
    """Per-task ridge-regression weights [N, F] of `returns` on `features` over each task's valid steps.

    Solves (X^T X + c I) w = X^T y for every task at once. As in rllab, c starts at `reg` and is multiplied by
    10 while the solution is not finite, up to `attempts` values; all of them are solved in one batched call
    and each task keeps its first finite solution (its last one if none is finite).
    """
    _check_layout(valid, returns=returns)
    if features.dim() != 4 or features.shape[:3] != valid.shape:
        raise ValueError(
            f"features has shape {tuple(features.shape)}, expected [N, E, T, F] with [N, E, T] = {tuple(valid.shape)}"
        )
    x = torch.where(valid[..., None], features, 0.0).flatten(1, 2)  # (N, E*T, F)
    y = torch.where(valid, returns, 0.0).flatten(1, 2)  # (N, E*T)
    gram = x.mT @ x  # (N, F, F)
    rhs = x.mT @ y[..., None]  # (N, F, 1)
    n, f = gram.shape[0], gram.shape[-1]
    coeffs = torch.tensor([reg * 10.0**k for k in range(attempts)], dtype=gram.dtype, device=gram.device)  # (K,)
    eye = torch.eye(f, dtype=gram.dtype, device=gram.device)
    lhs = gram + coeffs[:, None, None, None] * eye  # (K, N, F, F)
    sol, info = torch.linalg.solve_ex(lhs, rhs.expand(attempts, n, f, 1))  # (K, N, F, 1), (K, N)
    sol = sol.squeeze(-1)  # (K, N, F)
    ok = (info == 0) & torch.isfinite(sol).all(dim=-1)  # (K, N)
    first_ok = torch.where(ok.any(dim=0), ok.to(torch.int8).argmax(dim=0), attempts - 1)  # (N,)
    return sol.gather(0, first_ok[None, :, None].expand(1, n, f)).squeeze(0)  # (N, F)


def linear_baseline_values(obs: Tensor, valid: Tensor, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Values [N, E, T] of rllab's linear feature baseline fitted per task to `returns`, 0 at invalid steps."""
    feats = linear_baseline_features(obs, valid)  # (N, E, T, F)
    weights = fit_linear_baseline(feats, returns, valid, reg)  # (N, F)
    values = torch.einsum("netf,nf->net", feats, weights)  # (N, E, T)
    return torch.where(valid, values, 0.0)


def normalize_advantages(adv: Tensor, valid: Tensor, per_task: bool, eps: float = 1e-8) -> Tensor:
    """(adv - mean) / (std + eps) over the valid steps, of each task or of the whole batch; 0 at invalid steps.

    std is the population standard deviation (divides by the count, as numpy's default in rllab).
    """
    _check_layout(valid, adv=adv)
    dims = (1, 2) if per_task else (0, 1, 2)
    count = valid.sum(dim=dims, keepdim=True).clamp_min(1).to(adv.dtype)  # (N or 1, 1, 1)
    mean = torch.where(valid, adv, 0.0).sum(dim=dims, keepdim=True) / count
    centred = torch.where(valid, adv - mean, 0.0)  # (N, E, T)
    std = (centred.square().sum(dim=dims, keepdim=True) / count).sqrt()
    return centred / (std + eps)

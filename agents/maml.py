"""MAML for policies held as parameter dicts: batched inner adaptation with ``torch.func`` and the outer objectives.

Every task's adaptation runs in one ``vmap(grad(inner_loss))`` call per inner step, no Python loop over tasks.
Shared parameters are plain tensors (leading dims as in the module); adapted parameters are stacked per task
with a leading dim N. The inner loss is the MAML paper's vanilla policy gradient with advantages from a linear
feature baseline refitted per task; the outer objectives are the TRPO surrogate, its KL and a PPO clipped loss,
each a mean over tasks of a mean over that task's valid steps.

Trajectories enter as `Trajectories [N, E, T, ...]`; one task's slice (fields ``[E, T, ...]``) is regrouped into
its trials ``[E / episodes_per_trial, episodes_per_trial * T, ...]`` and run through the policy's sequence mode,
with padding steps masked (``valid``) so that they are neither attended to nor counted as positions.

Second-order gradients need a twice-differentiable policy: use ``attention="math"`` for the Transformer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from metarl.returns import discounted_returns, gae, linear_baseline_values, normalize_advantages
from metarl.trajectories import Trajectories

from .policy import HistoryPolicy, PolicyOutput

Params = dict[str, Tensor]
_POLICY_INPUTS = ("obs", "prev_action", "prev_reward", "episode_start")


@dataclass(frozen=True)
class MAMLConfig:
    """Inner-loop settings of MAML."""

    inner_lr: float = 0.1
    """Step size of each inner policy-gradient step (the initial value of every Meta-SGD step size)."""
    inner_steps: int = 1
    """Number of inner gradient steps K. `adapt` takes all K on the support trajectories it is given; `MAMLLearner`
    collects fresh support trajectories before each step, with each task's current parameters (as the MAML
    authors' RL code did), and logs the return before adaptation and after every step."""
    first_order: bool = False
    """Treat the inner gradients as constants (first-order MAML): no second derivatives in the meta-gradient."""
    gamma: float = 0.99
    """Discount factor of the inner advantages."""
    gae_lambda: float = 1.0
    """GAE lambda of the inner advantages on the linear baseline; 1.0 gives discounted returns minus the baseline."""
    normalize_advantages: bool = True
    """Standardise the inner advantages over each task's valid steps (rllab's ``center_adv``)."""
    adapt: str = "all"
    """Which parameters the inner steps change: "all", "heads" (names under ``head.``) or comma-separated name
    prefixes, e.g. "head.dist,blocks.1."."""
    meta_sgd: bool = False
    """Learn a step size per parameter entry (Meta-SGD); `adapt` then takes them from `init_step_sizes`."""
    isolate_episodes: bool = False
    """Reset the policy's history at every episode start in the inner loss (else it runs through the trial)."""
    task_chunk: int | None = None
    """Tasks per vectorised call (``vmap``'s chunk_size) in adaptation and the outer losses; None: the whole
    meta-batch at once. On a CPU a few tasks per chunk keep each chunk's activations in cache and can be much
    faster (docs/results/bench_maml.md). Gradients agree up to float rounding, which TRPO's conjugate gradient can
    amplify: runs with different chunks are close, not bit-identical."""

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        check_task_chunk(self.task_chunk)
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"gamma and gae_lambda must lie in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if not self.adapt.strip() or any(not p.strip() for p in self.adapt.split(",")):
            raise ValueError(f"adapt must be 'all', 'heads' or comma-separated name prefixes, got {self.adapt!r}")


def check_task_chunk(chunk: int | None) -> None:
    """Raises unless `chunk` is None or a positive int."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"task_chunk must be None (all tasks at once) or an int >= 1, got {chunk!r}")


def adapted_names(params: Params, adapt: str) -> list[str]:
    """The keys of `params` the inner steps change; raises for a prefix that matches none."""
    if adapt == "all":
        return list(params)
    prefixes = ("head.",) if adapt == "heads" else tuple(p.strip() for p in adapt.split(","))
    for prefix in prefixes:
        if not any(k.startswith(prefix) for k in params):
            raise ValueError(f"adapt prefix {prefix!r} matches no parameter; names are {sorted(params)}")
    return [k for k in params if k.startswith(prefixes)]


def init_step_sizes(params: Params, config: MAMLConfig) -> Params:
    """Meta-SGD step sizes: one tensor per adapted parameter, its shape, filled with `config.inner_lr`."""
    names = adapted_names(params, config.adapt)
    return {k: torch.full_like(params[k].detach(), config.inner_lr).requires_grad_(True) for k in names}


def _tensor_fields(traj: Trajectories) -> dict[str, Tensor]:
    """The tensor fields of `traj` by name."""
    return {f.name: getattr(traj, f.name) for f in dataclasses.fields(traj) if isinstance(getattr(traj, f.name), Tensor)}


def _zero_padding(x: Tensor, valid: Tensor) -> Tensor:
    """`x` ``[*valid.shape, ...]`` with its padding entries set to 0, so that no NaN there can reach a gradient."""
    mask = valid.reshape(*valid.shape, *([1] * (x.dim() - valid.dim())))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of `x` over the True entries of `valid` (0 when there are none); entries elsewhere are never read."""
    total = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    return total / valid.sum().clamp_min(1).to(x.dtype)


def policy_outputs(policy: HistoryPolicy, params: Params, traj: Trajectories, isolate_episodes: bool = False) -> PolicyOutput:
    """Sequence-mode outputs of one task's trajectories (fields ``[E, T, ...]``) -> PolicyOutput ``[E, T, ...]``.

    The episodes of each trial form one sequence; padding steps are zeroed and passed as invalid, so they neither
    enter the history nor shift positions. Their outputs are meaningless and must be masked by the caller.
    """
    e, t = traj.valid.shape
    k = traj.episodes_per_trial
    if e % k:
        raise ValueError(f"trajectories hold {e} episodes, not a multiple of episodes_per_trial={k}")
    valid = traj.valid.reshape(e // k, k * t)  # (trials, L)

    def seq(x: Tensor) -> Tensor:  # (E, T, ...) -> (trials, L, ...), zeros at padding
        return _zero_padding(x.reshape(e // k, k * t, *x.shape[2:]), valid)

    inputs = tuple(seq(getattr(traj, name)) for name in _POLICY_INPUTS)
    out = functional_call(policy, params, inputs, {"isolate_episodes": isolate_episodes, "valid": valid})
    return PolicyOutput(*(x.reshape(e, t, *x.shape[2:]) for x in out))


class AffineLayerNormSplit(TorchFunctionMode):
    """Within it, ``F.layer_norm(x, shape, weight, bias)`` runs as ``F.layer_norm(x, shape) * weight + bias``.

    The same function, but its gradient under ``vmap`` stays twice differentiable: PyTorch's batching rule for the
    affine layer-norm backward gives a wrong derivative w.r.t. the input once differentiated again
    (pytorch/functorch#534), which would silently corrupt second-order MAML of any policy with ``nn.LayerNorm``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.layer_norm:
            return func(*args, **kwargs)
        named = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args)) | kwargs
        weight, bias = named.pop("weight", None), named.pop("bias", None)
        y = F.layer_norm(**named)
        y = y if weight is None else y * weight
        return y if bias is None else y + bias


def _over_tasks(fn: Callable[..., Any], traj: Trajectories, *args: Any, in_dims: tuple[int | None, ...] | None = None,
                chunk: int | None = None) -> Any:
    """``vmap`` over tasks of ``fn(one_task_traj, *args)``; `in_dims` for `args` (default 0 each: stacked ``[N, ...]``);
    `chunk` tasks per vectorised call (None: all)."""
    check_task_chunk(chunk)
    k = traj.episodes_per_trial

    def one(fields: dict[str, Tensor], *xs: Any) -> Any:
        return fn(Trajectories(**fields, episodes_per_trial=k), *xs)

    dims = (0,) * len(args) if in_dims is None else in_dims
    return vmap(one, in_dims=(0, *dims), chunk_size=chunk)(_tensor_fields(traj), *args)


def batched_policy_outputs(
    policy: HistoryPolicy, task_params: Params, traj: Trajectories, isolate_episodes: bool = False,
    task_chunk: int | None = None,
) -> PolicyOutput:
    """`policy_outputs` of every task with its own parameters (stacked ``[N, ...]``) -> PolicyOutput ``[N, E, T, ...]``;
    `task_chunk` tasks per vectorised call (None: all)."""
    return _over_tasks(lambda tr, p: policy_outputs(policy, p, tr, isolate_episodes), traj, task_params, chunk=task_chunk)


def inner_loss(
    policy: HistoryPolicy, params: Params, traj: Trajectories, advantages: Tensor, isolate_episodes: bool = False
) -> Tensor:
    """Vanilla policy-gradient loss of one task: -(sum over valid steps of log pi(a|h) * A) / (number of valid steps).

    `traj` has fields ``[E, T, ...]`` and `advantages` ``[E, T]`` (constants).
    """
    out = policy_outputs(policy, params, traj, isolate_episodes)
    logp = policy.log_prob(out, _zero_padding(traj.actions, traj.valid))  # (E, T)
    return -_masked_mean(logp * _zero_padding(advantages, traj.valid), traj.valid)


@torch.no_grad()
def support_advantages(traj: Trajectories, config: MAMLConfig | None = None) -> Tensor:
    """Inner-loss advantages ``[N, E, T]`` (no grad), 0 at padding.

    Discounted returns (no bootstrap after a truncation, as in rllab) are regressed on rllab's linear features
    separately for each task; the advantages are GAE(gamma, lambda) on those baseline values, which for
    lambda = 1 is returns minus baseline. Optionally standardised per task (`MAMLConfig.normalize_advantages`).
    """
    cfg = config or MAMLConfig()
    returns = discounted_returns(traj.rewards, traj.valid, cfg.gamma, traj.terminated)  # (N, E, T)
    baseline = linear_baseline_values(traj.obs, traj.valid, returns)  # (N, E, T)
    adv, _ = gae(traj.rewards, baseline, traj.valid, cfg.gamma, cfg.gae_lambda, traj.terminated)
    return normalize_advantages(adv, traj.valid, per_task=True) if cfg.normalize_advantages else adv


def adapt(
    policy: HistoryPolicy,
    params: Params,
    support: Trajectories,
    config: MAMLConfig,
    step_sizes: Params | None = None,
    stacked: bool = False,
) -> Params:
    """K inner steps theta_i <- theta_i - lr * grad inner_loss(theta_i; support_i) for all N tasks at once.

    `params`: the shared parameters (a full set of the module's parameters), or with `stacked=True` per-task
    parameters ``[N, ...]`` (e.g. to continue adapting from an earlier `adapt`). Returns every key of `params`
    stacked per task ``[N, ...]``: adapted ones changed, the others expanded unchanged. Differentiable w.r.t.
    `params` (second order unless `config.first_order`) and `step_sizes` (Meta-SGD, from `init_step_sizes`).
    """
    if config.meta_sgd != (step_sizes is not None):
        raise ValueError(f"step_sizes must be given exactly when config.meta_sgd is True (meta_sgd={config.meta_sgd})")
    names = adapted_names(params, config.adapt)
    lrs = step_sizes if step_sizes is not None else {k: config.inner_lr for k in names}
    if set(lrs) != set(names):
        raise ValueError(f"step_sizes has keys {sorted(lrs)}, expected the adapted parameters {sorted(names)}")
    advantages = support_advantages(support, config)  # (N, E, T)
    fixed = {k: v for k, v in params.items() if k not in names}
    fast = {k: params[k] for k in names}

    def loss(fast_p: Params, traj: Trajectories, fixed_p: Params, adv: Tensor) -> Tensor:
        return inner_loss(policy, {**fixed_p, **fast_p}, traj, adv, config.isolate_episodes)

    def task_grad(traj: Trajectories, fast_p: Params, fixed_p: Params, adv: Tensor) -> Params:
        return grad(loss)(fast_p, traj, fixed_p, adv)

    for step in range(config.inner_steps):
        in_dims = (None if step == 0 and not stacked else 0, 0 if stacked else None, 0)  # shared or per task
        with AffineLayerNormSplit():
            grads = _over_tasks(task_grad, support, fast, fixed, advantages, in_dims=in_dims, chunk=config.task_chunk)
        if config.first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast = {k: fast[k] - lrs[k] * grads[k] for k in names}
    n = support.num_tasks
    if stacked:
        return {**fixed, **fast}
    return {k: fast[k] if k in fast else v.expand(n, *v.shape) for k, v in params.items()}


def _check_task_tensor(name: str, x: Tensor, traj: Trajectories) -> None:
    if x.shape != traj.valid.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(traj.valid.shape)} (the shape of valid)")


def _ratio(policy: HistoryPolicy, params: Params, traj: Trajectories, old_log_probs: Tensor, isolate: bool) -> Tensor:
    """pi_new(a) / pi_old(a) per step of one task, ``[E, T]``, 1 at padding."""
    out = policy_outputs(policy, params, traj, isolate)
    logp = policy.log_prob(out, _zero_padding(traj.actions, traj.valid))  # (E, T)
    return torch.exp(_zero_padding(logp - old_log_probs, traj.valid))


def _ratio_objective(
    policy: HistoryPolicy, adapted_params: Params, query: Trajectories, old_log_probs: Tensor, advantages: Tensor,
    isolate_episodes: bool, clip: float | None, task_chunk: int | None,
) -> Tensor:
    """Mean over tasks of -(mean over valid steps of r A), or of PPO's min(r A, clip(r) A) when `clip` is set."""
    _check_task_tensor("old_log_probs", old_log_probs, query)
    _check_task_tensor("advantages", advantages, query)

    def one(traj: Trajectories, p: Params, old: Tensor, adv: Tensor) -> Tensor:
        ratio, adv = _ratio(policy, p, traj, old, isolate_episodes), _zero_padding(adv, traj.valid)  # (E, T)
        objective = ratio * adv
        if clip is not None:
            objective = torch.minimum(objective, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
        return -_masked_mean(objective, traj.valid)

    return _over_tasks(one, query, adapted_params, old_log_probs, advantages, chunk=task_chunk).mean()


def outer_surrogate(
    policy: HistoryPolicy,
    adapted_params: Params,
    query: Trajectories,
    old_log_probs: Tensor,
    advantages: Tensor,
    isolate_episodes: bool = False,
    task_chunk: int | None = None,
) -> Tensor:
    """TRPO surrogate loss: mean over tasks of -(mean over valid steps of exp(logp_new - logp_old) * A).

    `adapted_params` stacked ``[N, ...]`` (from `adapt`); `old_log_probs`, `advantages` ``[N, E, T]`` (constants);
    `task_chunk` tasks per vectorised call (None: all).
    """
    return _ratio_objective(policy, adapted_params, query, old_log_probs, advantages, isolate_episodes, None, task_chunk)


def ppo_outer_loss(
    policy: HistoryPolicy,
    adapted_params: Params,
    query: Trajectories,
    old_log_probs: Tensor,
    advantages: Tensor,
    isolate_episodes: bool = False,
    clip: float = 0.2,
    task_chunk: int | None = None,
) -> Tensor:
    """PPO clipped loss: mean over tasks of -(mean over valid steps of min(r A, clip(r, 1 - clip, 1 + clip) A))."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return _ratio_objective(policy, adapted_params, query, old_log_probs, advantages, isolate_episodes, clip, task_chunk)


def outer_kl(
    policy: HistoryPolicy, adapted_params: Params, query: Trajectories, old_outputs: PolicyOutput,
    isolate_episodes: bool = False, task_chunk: int | None = None,
) -> Tensor:
    """Mean over tasks of the mean over valid steps of KL(old || new).

    `old_outputs`: PolicyOutput ``[N, E, T, ...]`` of the collecting parameters (constants), e.g.
    `batched_policy_outputs` under ``torch.no_grad``.
    """
    _check_task_tensor("old_outputs.value", old_outputs.value, query)

    def one(traj: Trajectories, p: Params, old_dist: Tensor, old_log_std: Tensor, old_value: Tensor) -> Tensor:
        out = policy_outputs(policy, p, traj, isolate_episodes)
        old = PolicyOutput(_zero_padding(old_dist, traj.valid), _zero_padding(old_log_std, traj.valid), old_value)
        return _masked_mean(policy.kl(old, out), traj.valid)

    return _over_tasks(one, query, adapted_params, *old_outputs, chunk=task_chunk).mean()

"""The numerical pieces of a TRPO update for parameters held as a dict of tensors (`torch.func` style).

Nothing here knows about policies or environments: the caller passes closures that map a params dict to a
scalar tensor. `trpo_step` follows Schulman et al. (2015) as used by MAML-RL: natural-gradient direction by
conjugate gradient on the Hessian of the mean KL (the Fisher matrix), a step scaled to the KL bound, and a
backtracking line search that accepts the first candidate that lowers the loss and keeps the KL within it.

Distributed use: pass `allreduce`, a function that returns the mean of a tensor across workers without
changing its input (e.g. clone, `torch.distributed.all_reduce`, divide by the world size). It is applied to
the loss gradient, to each Fisher-vector product (before damping is added) and to the loss and KL values used
for decisions, so every worker computes the same direction, the same step and the same line-search outcome.
Each worker's closures should return means over its own shard; equal shards then average to the global mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypedDict

import torch
from torch import Tensor

Params = dict[str, Tensor]
ScalarFn = Callable[[Params], Tensor]
Reduce = Callable[[Tensor], Tensor]


class TRPOInfo(TypedDict):
    """What one `trpo_step` did; plain Python numbers for logging."""

    loss_before: float
    loss_after: float
    kl: float
    step_fraction: float
    accepted: bool
    cg_residual: float
    grad_norm: float
    ls_evals: int


def _identity(x: Tensor) -> Tensor:
    return x


def flatten(tree: Params) -> Tensor:
    """All tensors of `tree`, in key order, concatenated into one 1-D tensor."""
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflatten(flat: Tensor, like: Params) -> Params:
    """Splits a 1-D tensor into a dict with the keys, order, shapes and dtypes of `like` (views where possible)."""
    sizes = [t.numel() for t in like.values()]
    if flat.numel() != sum(sizes):
        raise ValueError(f"unflatten: got {flat.numel()} elements, `like` holds {sum(sizes)}")
    chunks = flat.split(sizes)
    return {k: c.view(t.shape).to(t.dtype) for (k, t), c in zip(like.items(), chunks)}


def _fresh_leaves(params: Params) -> Params:
    """Detached copies of `params` (sharing storage) that require grad, as roots of a new graph."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def _grad(output: Tensor, inputs: Params, create_graph: bool = False, retain_graph: bool = False) -> Tensor:
    """Flat gradient of a scalar w.r.t. `inputs`; zeros for inputs the scalar does not depend on."""
    if not output.requires_grad:
        return torch.zeros_like(flatten(inputs)).detach()
    grads = torch.autograd.grad(
        output,
        list(inputs.values()),
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return torch.cat([g.reshape(-1) for g in grads])


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    iters: int = 10,
    residual_tol: float = 1e-10,
) -> Tensor:
    """Approximate solution x of A x = b for symmetric positive definite A given as `matvec(v) = A v`.

    Starts from x = 0 and runs at most `iters` iterations, stopping early once the squared residual
    ||b - A x||^2 falls below `residual_tol` (one host sync per iteration for that decision).
    """
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - A x
    p = b.clone()  # search direction
    rr = r @ r
    for _ in range(iters):
        if bool(rr < residual_tol):
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def make_hvp(
    scalar_fn: ScalarFn,
    params: Params,
    damping: float = 0.0,
    allreduce: Reduce | None = None,
) -> Callable[[Tensor], Tensor]:
    """Flat Hessian-vector product `v -> allreduce(H v) + damping * v`, H the Hessian of `scalar_fn` at `params`.

    Uses double backprop: `scalar_fn` is evaluated once, its gradient is built with `create_graph=True`, and each
    call differentiates `grad . v` through that retained graph. Unlike forward-over-reverse
    (`torch.func.jvp(torch.func.grad(f))`) this needs no forward-mode AD rules and works when `scalar_fn`
    itself calls `torch.autograd.grad` (a MAML inner step), `torch.func.vmap` or `torch.func.functional_call`.
    """
    reduce = allreduce or _identity
    leaves = _fresh_leaves(params)
    with torch.enable_grad():
        g = _grad(scalar_fn(leaves), leaves, create_graph=True, retain_graph=True)  # (P,)

    def hvp(v: Tensor) -> Tensor:
        with torch.enable_grad():
            hv = _grad(g @ v.detach(), leaves, retain_graph=True)  # (P,)
        return reduce(hv) + damping * v

    return hvp


def hessian_vector_product(scalar_fn: ScalarFn, params: Params, vector: Params, damping: float = 0.0) -> Params:
    """H v + damping * v as a dict like `params`, H the Hessian of `scalar_fn` at `params` (see `make_hvp`)."""
    hvp = make_hvp(scalar_fn, params, damping)
    return unflatten(hvp(flatten(vector)), params)


def _loss_and_grad(loss_fn: ScalarFn, params: Params, reduce: Reduce) -> tuple[Tensor, Tensor]:
    """(reduced loss at `params`, reduced flat gradient (P,)), both detached."""
    leaves = _fresh_leaves(params)
    with torch.enable_grad():
        loss = loss_fn(leaves)
        g = _grad(loss, leaves)
    return reduce(loss.detach()), reduce(g)


def _evaluate(loss_fn: ScalarFn, kl_fn: ScalarFn, candidate: Params, reduce: Reduce) -> Tensor:
    """Reduced [loss, kl] (2,) at `candidate`, without building a graph."""
    with torch.no_grad():
        return reduce(torch.stack([loss_fn(candidate), kl_fn(candidate)]).detach())


def _with_grad_flags(new: Params, like: Params) -> Params:
    """Independent copies of `new` that require grad where `like` does."""
    return {k: v.detach().clone().requires_grad_(like[k].requires_grad) for k, v in new.items()}


def trpo_step(
    params: Params,
    loss_fn: ScalarFn,
    kl_fn: ScalarFn,
    max_kl: float = 0.01,
    cg_iters: int = 10,
    cg_damping: float = 1e-5,
    ls_steps: int = 15,
    ls_ratio: float = 0.8,
    allreduce: Reduce | None = None,
) -> tuple[Params, TRPOInfo]:
    """One TRPO update of `params`: natural-gradient direction, KL-scaled step, backtracking line search.

    `loss_fn(p)` is the surrogate loss to minimise; `kl_fn(p)` the mean KL between the fixed old policy and
    the policy at `p` (0 with zero gradient at `params`). Its Hessian F at `params` is the Fisher matrix. The
    direction is s = CG(F + cg_damping I, -g), the full step beta * s with beta = sqrt(2 max_kl / s^T F s),
    and candidates params + ls_ratio^k * beta * s, k = 0 .. ls_steps - 1, are tried in order; the first with
    loss below the loss at `params` and KL <= max_kl is returned. Otherwise `params` itself is returned and
    `info["accepted"]` is False.

    Each closure is evaluated once with grad at `params` and once per candidate under `torch.no_grad`; a
    closure that needs gradients inside (e.g. a MAML inner step) must open `torch.enable_grad()` itself.
    See the module docstring for `allreduce`. Returned tensors require grad where the inputs did.
    """
    reduce = allreduce or _identity
    loss_before, g = _loss_and_grad(loss_fn, params, reduce)  # (), (P,)
    fvp = make_hvp(kl_fn, params, cg_damping, reduce)
    s = conjugate_gradient(fvp, -g, iters=cg_iters)  # (P,)
    fs = fvp(s)  # (P,)
    shs = s @ fs
    info = TRPOInfo(
        loss_before=float(loss_before),
        loss_after=float(loss_before),
        kl=0.0,
        step_fraction=0.0,
        accepted=False,
        cg_residual=float(torch.linalg.vector_norm(fs + g)),
        grad_norm=float(torch.linalg.vector_norm(g)),
        ls_evals=0,
    )
    if not (math.isfinite(float(shs)) and float(shs) > 0.0):
        return params, info
    full_step = torch.sqrt(2.0 * max_kl / shs) * s  # (P,)
    x0 = flatten(params).detach()  # (P,)
    for k in range(ls_steps):
        fraction = ls_ratio**k
        candidate = unflatten(x0 + fraction * full_step, params)
        loss_kl = _evaluate(loss_fn, kl_fn, candidate, reduce)  # (2,)
        info["ls_evals"] = k + 1
        if bool((loss_kl[0] < loss_before) & (loss_kl[1] <= max_kl)):
            info["loss_after"], info["kl"] = loss_kl.tolist()
            info["step_fraction"], info["accepted"] = fraction, True
            return _with_grad_flags(candidate, params), info
    return params, info

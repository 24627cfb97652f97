"""TRPO pieces against ground truth: explicit solves and Hessians, the analytic natural-gradient step, the line search."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metarl.trpo import (
    conjugate_gradient,
    flatten,
    hessian_vector_product,
    make_hvp,
    trpo_step,
    unflatten,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64


def spd(n: int, low: float, high: float, gen: torch.Generator, device: str = "cpu") -> Tensor:
    """[n, n] symmetric matrix with eigenvalues spread over [low, high]."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    eig = torch.linspace(low, high, n, dtype=F64)
    return (q * eig @ q.T).to(device)


def two_tensors(gen: torch.Generator, device: str = "cpu") -> dict[str, Tensor]:
    """A params dict holding a (2, 2) and a (3,) tensor: 7 numbers."""
    return {
        "w": torch.randn(2, 2, generator=gen, dtype=F64).to(device),
        "b": torch.randn(3, generator=gen, dtype=F64).to(device),
    }


def quadratic_kl(x0: Tensor, fisher: Tensor, quartic: float = 0.0):
    """kl(p) = 0.5 d^T F d + quartic * sum(d^4), d = flatten(p) - x0: zero with zero gradient at x0."""

    def kl(p: dict[str, Tensor]) -> Tensor:
        d = flatten(p) - x0  # (P,)
        return 0.5 * d @ fisher @ d + quartic * (d**4).sum()

    return kl


def linear_loss(g: Tensor):
    """loss(p) = g . flatten(p)."""
    return lambda p: g @ flatten(p)


def test_flatten_unflatten_round_trip():
    tree = {"z": torch.randn(3, 4), "a": torch.randn(5, dtype=F64), "m": torch.randn(2, 1, 2)}
    flat = flatten(tree)
    assert flat.shape == (12 + 5 + 4,)
    back = unflatten(flat, tree)
    assert list(back) == ["z", "a", "m"]
    for k, v in tree.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype
        assert torch.equal(back[k], v)
    with pytest.raises(ValueError, match="unflatten"):
        unflatten(flat[:-1], tree)


def test_cg_solves_small_spd_system():
    gen = torch.Generator().manual_seed(0)
    a = spd(20, 0.1, 10.0, gen)
    b = torch.randn(20, generator=gen, dtype=F64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=60, residual_tol=1e-24)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), atol=1e-6, rtol=0)


def test_cg_ten_iterations_on_well_conditioned_system():
    gen = torch.Generator().manual_seed(1)
    a = spd(100, 1.0, 2.0, gen)
    b = torch.randn(100, generator=gen, dtype=F64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=10)
    assert torch.linalg.vector_norm(b - a @ x) < 1e-6 * torch.linalg.vector_norm(b)


def test_cg_stops_once_residual_is_small():
    calls = []
    b = torch.randn(10, dtype=F64)

    def identity(v: Tensor) -> Tensor:
        calls.append(1)
        return v

    x = conjugate_gradient(identity, b, iters=10)
    torch.testing.assert_close(x, b)
    assert len(calls) == 1


def nonlinear(p: dict[str, Tensor]) -> Tensor:
    """A smooth scalar coupling both tensors of `two_tensors`."""
    w, b = p["w"], p["b"]
    return torch.sin(w).sum() * b[0] + (w @ b[1:]).pow(3).sum() + torch.exp(b).prod() + (w * w.T).sum() ** 2


def explicit_hvp(fn, params: dict[str, Tensor], vector: dict[str, Tensor]) -> Tensor:
    """Flat H v with H from torch.autograd.functional.hessian of `fn` as a function of the flat parameters."""
    hess = torch.autograd.functional.hessian(lambda x: fn(unflatten(x, params)), flatten(params))
    return hess @ flatten(vector)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_hvp_matches_explicit_hessian(damping):
    gen = torch.Generator().manual_seed(2)
    params, vector = two_tensors(gen), two_tensors(gen)
    hv = hessian_vector_product(nonlinear, params, vector, damping)
    assert list(hv) == ["w", "b"] and hv["w"].shape == (2, 2)
    expected = explicit_hvp(nonlinear, params, vector) + damping * flatten(vector)
    torch.testing.assert_close(flatten(hv), expected, atol=1e-8, rtol=0)


def test_hvp_through_vmap_functional_call_and_inner_grad_step():
    """The HVP differentiates closures built like a MAML objective: vmap, functional_call, an inner grad step."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 6, 3, dtype=F64)  # (tasks, points, in)
    y = torch.randn(5, 6, 1, dtype=F64)

    def task_loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return ((functional_call(model, p, (xb,)) - yb) ** 2).mean()

    def adapted_loss(p: dict[str, Tensor]) -> Tensor:
        inner = torch.autograd.grad(task_loss(p, x[0], y[0]), list(p.values()), create_graph=True)
        fast = {k: v - 0.1 * g for (k, v), g in zip(p.items(), inner)}
        return vmap(task_loss, in_dims=(None, 0, 0))(fast, x, y).mean()

    vector = {k: torch.randn_like(v) for k, v in params.items()}
    hv = hessian_vector_product(adapted_loss, params, vector, damping=1e-5)
    expected = explicit_hvp(adapted_loss, params, vector) + 1e-5 * flatten(vector)
    torch.testing.assert_close(flatten(hv), expected, atol=1e-8, rtol=0)


def test_make_hvp_is_zero_plus_damping_for_a_linear_function():
    params = {"a": torch.ones(3, dtype=F64)}
    hvp = make_hvp(lambda p: p["a"].sum(), params, damping=0.5)
    v = torch.arange(3, dtype=F64)
    torch.testing.assert_close(hvp(v), 0.5 * v)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_loss_takes_the_analytic_natural_gradient_step(device):
    gen = torch.Generator().manual_seed(4)
    params = two_tensors(gen, device)
    x0 = flatten(params)
    fisher = spd(7, 1.0, 3.0, gen, device)
    g = torch.randn(7, generator=gen, dtype=F64).to(device)
    new, info = trpo_step(params, linear_loss(g), quadratic_kl(x0, fisher))
    f_inv_g = torch.linalg.solve(fisher, g)
    expected = x0 - math.sqrt(2 * 0.01 / float(g @ f_inv_g)) * f_inv_g
    torch.testing.assert_close(flatten(new), expected, atol=1e-5, rtol=0)
    assert info["accepted"] and info["step_fraction"] == 1.0 and info["ls_evals"] == 1
    assert info["kl"] <= 0.01 and info["kl"] == pytest.approx(0.01, rel=1e-3)
    assert info["loss_after"] < info["loss_before"]
    assert info["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(g)))
    assert info["cg_residual"] < 1e-8
    assert new["w"].device == params["w"].device and new["w"].shape == (2, 2)


def test_quadratic_loss_step_improves_within_kl():
    gen = torch.Generator().manual_seed(5)
    params = two_tensors(gen)
    x0 = flatten(params)
    fisher, curvature = spd(7, 0.5, 2.0, gen), spd(7, 0.1, 1.0, gen)
    target = x0 + torch.randn(7, generator=gen, dtype=F64)

    def loss(p: dict[str, Tensor]) -> Tensor:
        d = flatten(p) - target  # (P,)
        return 0.5 * d @ curvature @ d

    new, info = trpo_step(params, loss, quadratic_kl(x0, fisher))
    assert info["accepted"]
    assert float(loss(new)) < float(loss(params))
    assert float(quadratic_kl(x0, fisher)(new)) <= 0.01
    assert info["loss_after"] == pytest.approx(float(loss(new)))


def test_line_search_rejects_when_loss_never_improves():
    gen = torch.Generator().manual_seed(6)
    params = two_tensors(gen)
    x0 = flatten(params)
    a = torch.randn(7, generator=gen, dtype=F64)

    def steep_bowl(p: dict[str, Tensor]) -> Tensor:
        d = flatten(p) - x0  # (P,)
        return -(a @ d) + 1e6 * (d @ d)

    new, info = trpo_step(params, steep_bowl, quadratic_kl(x0, torch.eye(7, dtype=F64)))
    assert new is params
    assert not info["accepted"] and info["ls_evals"] == 15 and info["step_fraction"] == 0.0
    assert info["loss_after"] == info["loss_before"]


def test_line_search_backtracks_when_full_step_breaks_the_kl():
    gen = torch.Generator().manual_seed(7)
    params = two_tensors(gen)
    x0 = flatten(params)
    fisher = spd(7, 1.0, 3.0, gen)
    g = torch.randn(7, generator=gen, dtype=F64)
    kl = quadratic_kl(x0, fisher, quartic=1e3)
    new, info = trpo_step(params, linear_loss(g), kl)
    assert info["accepted"] and info["step_fraction"] < 1.0 and info["ls_evals"] > 1
    assert float(kl(new)) <= 0.01 and info["kl"] == pytest.approx(float(kl(new)))
    longer = x0 + (flatten(new) - x0) / 0.8
    assert float(kl(unflatten(longer, params))) > 0.01


def test_allreduce_hook_sees_gradient_fvps_and_line_search_values():
    gen = torch.Generator().manual_seed(8)
    params = two_tensors(gen)
    x0 = flatten(params)
    fisher = spd(7, 1.0, 3.0, gen)
    g = torch.randn(7, generator=gen, dtype=F64)
    seen: list[tuple[int, ...]] = []

    def record(t: Tensor) -> Tensor:
        seen.append(tuple(t.shape))
        return t.clone()

    kl = quadratic_kl(x0, fisher, quartic=1e3)
    plain, plain_info = trpo_step(params, linear_loss(g), kl)
    hooked, info = trpo_step(params, linear_loss(g), kl, allreduce=record)
    torch.testing.assert_close(flatten(hooked), flatten(plain))
    assert info == plain_info
    assert seen.count(()) == 1  # loss at params
    assert seen.count((7,)) >= 3  # gradient, CG products, s^T F s
    assert seen.count((2,)) == info["ls_evals"]  # [loss, kl] per candidate


@pytest.mark.parametrize("device", DEVICES)
def test_trpo_step_on_a_logistic_policy(device):
    torch.manual_seed(9)
    policy = nn.Linear(4, 3).double().to(device)
    params = {k: v.detach().clone() for k, v in policy.named_parameters()}
    obs = torch.randn(256, 4, dtype=F64, device=device)  # (B, obs)
    actions = torch.randint(0, 3, (256,), device=device)  # (B,)
    advantages = torch.randn(256, dtype=F64, device=device)  # (B,)
    old_logp = torch.log_softmax(functional_call(policy, params, (obs,)), dim=-1).detach()  # (B, 3)

    def log_probs(p: dict[str, Tensor]) -> Tensor:
        return torch.log_softmax(functional_call(policy, p, (obs,)), dim=-1)  # (B, 3)

    def surrogate(p: dict[str, Tensor]) -> Tensor:
        ratio = torch.exp(log_probs(p).gather(1, actions[:, None])[:, 0] - old_logp.gather(1, actions[:, None])[:, 0])
        return -(ratio * advantages).mean()

    def mean_kl(p: dict[str, Tensor]) -> Tensor:
        return (old_logp.exp() * (old_logp - log_probs(p))).sum(-1).mean()

    params_grad = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    new, info = trpo_step(params_grad, surrogate, mean_kl)
    assert info["accepted"]
    assert all(v.requires_grad and v.is_leaf for v in new.values())
    with torch.no_grad():
        assert float(surrogate(new)) < float(surrogate(params))
        assert float(mean_kl(new)) <= 0.01
        assert info["kl"] == pytest.approx(float(mean_kl(new)))
    assert info["kl"] > 0.001


def test_zero_gradient_returns_params_without_line_search():
    gen = torch.Generator().manual_seed(10)
    params = two_tensors(gen)
    new, info = trpo_step(params, lambda p: (flatten(p) * 0).sum(), quadratic_kl(flatten(params), torch.eye(7, dtype=F64)))
    assert new is params and not info["accepted"] and info["ls_evals"] == 0 and info["grad_norm"] == 0.0

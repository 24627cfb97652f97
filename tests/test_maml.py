"""MAML: batched torch.func meta-gradients == a per-task autograd loop, finite differences, Meta-SGD, advantages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch.func import functional_call, grad, vmap

from metarl.agents import distributions as D
from metarl.agents.maml import (
    AffineLayerNormSplit,
    MAMLConfig,
    adapt,
    adapted_names,
    batched_policy_outputs,
    init_step_sizes,
    inner_loss,
    outer_kl,
    outer_surrogate,
    policy_outputs,
    ppo_outer_loss,
    support_advantages,
)
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.agents.policy import PolicyOutput, encode_prev_action
from metarl.agents.transformer import TransformerConfig, TransformerPolicy
from metarl.returns import discounted_returns, linear_baseline_values
from metarl.trajectories import Trajectories
from metarl.trpo import make_hvp

OBS = spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
ACTION_SPACES = {"box": spaces.Box(-1, 1, shape=(2,), dtype=np.float32), "discrete": spaces.Discrete(4)}
N, E, T, EPT = 3, 4, 5, 2
F64 = torch.float64


def make_policy(kind: str, action: str) -> torch.nn.Module:
    """A small float64 policy with O(1) random weights, so that second-order terms are not negligible."""
    if kind == "mlp":
        policy = MLPPolicy(OBS, ACTION_SPACES[action], MLPConfig(hidden=(8, 8), activation="tanh"))
    else:
        config = TransformerConfig(n_layers=1, d_model=8, n_heads=2, context=4, attention="math")
        policy = TransformerPolicy(OBS, ACTION_SPACES[action], config)
    policy = policy.to(F64)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0.0, 0.3)
    return policy


def shared_params(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_(True) for k, v in policy.named_parameters()}


def make_trajectories(discrete: bool, n: int = N, e: int = E, t: int = T, ept: int = EPT, pad=float("nan")) -> Trajectories:
    """Random float64 rollouts; some episodes terminate early, padding holds `pad` (NaN: never read)."""
    lengths = torch.randint(2, t + 1, (n, e))  # (n, e)
    lengths[0, 0] = t
    steps = torch.arange(t)
    valid = steps < lengths[..., None]  # (n, e, t)
    last = steps == (lengths[..., None] - 1)
    terminated = last & (lengths[..., None] < t)
    truncated = last & ~terminated

    def padded(x: torch.Tensor) -> torch.Tensor:
        mask = valid.reshape(*valid.shape, *([1] * (x.dim() - 3)))
        return torch.where(mask, x, torch.full((), pad, dtype=x.dtype)) if x.is_floating_point() else x

    space = ACTION_SPACES["discrete" if discrete else "box"]
    actions = torch.randint(0, 4, (n, e, t)) if discrete else torch.randn(n, e, t, 2, dtype=F64)
    episode_start = steps.expand(n, e, t) == 0
    return Trajectories(
        obs=padded(torch.randn(n, e, t, 3, dtype=F64)),
        actions=padded(actions),
        rewards=padded(torch.randn(n, e, t, dtype=F64)),
        terminated=terminated,
        truncated=truncated,
        valid=valid,
        log_probs=padded(torch.randn(n, e, t, dtype=F64)),
        values=padded(torch.randn(n, e, t, dtype=F64)),
        last_value=torch.zeros(n, e, dtype=F64),
        prev_action=padded(encode_prev_action(actions.roll(1, dims=2), space, F64)),
        prev_reward=padded(torch.randn(n, e, t, dtype=F64)),
        episode_start=episode_start,
        episodes_per_trial=ept,
    )


def query_targets(policy, params, support, query, config: MAMLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Old log-probs near those of the adapted policy (ratios near 1) and advantages, [N, E, T], 0 at padding."""
    with torch.no_grad():
        plain = dataclasses.replace(config, meta_sgd=False)
        out = batched_policy_outputs(policy, adapt(policy, params, support, plain), query)
        actions = torch.where(query.valid.view(*query.valid.shape, *([1] * (query.actions.dim() - 3))), query.actions, 0)
        logp = D.log_prob(out, actions, policy.discrete)
    old = torch.where(query.valid, logp + 0.1 * torch.randn_like(logp), 0.0)
    return old, support_advantages(query, config)


# --- the plain per-task reference ---------------------------------------------------------------------------------------


def reference_outputs(policy, params, traj_i: Trajectories, isolate: bool) -> PolicyOutput:
    """One task ([E, T, ...]): each trial's episodes run as one sequence through the module with `params`."""
    e, t = traj_i.valid.shape
    trials, length = e // traj_i.episodes_per_trial, traj_i.episodes_per_trial * t
    valid = traj_i.valid.reshape(trials, length)
    inputs = []
    for x in (traj_i.obs, traj_i.prev_action, traj_i.prev_reward, traj_i.episode_start):
        x = x.reshape(trials, length, *x.shape[2:]).clone()
        x[~valid] = 0
        inputs.append(x)
    out = functional_call(policy, params, tuple(inputs), {"isolate_episodes": isolate, "valid": valid})
    return PolicyOutput(*(x.reshape(e, t, *x.shape[2:]) for x in out))


def reference_log_probs(policy, params, traj_i: Trajectories, isolate: bool) -> torch.Tensor:
    """log pi(a) at the valid steps of one task, flattened."""
    out = reference_outputs(policy, params, traj_i, isolate)
    actions = traj_i.actions.clone()
    actions[~traj_i.valid] = 0
    return D.log_prob(out, actions, policy.discrete)[traj_i.valid]


def per_task_reference_meta_gradient(policy, params, support, query, old_log_probs, query_adv, config, step_sizes=None):
    """Meta-gradient of the TRPO surrogate by a Python loop over tasks with torch.autograd.grad(create_graph=True).

    `support`: one Trajectories for all `config.inner_steps` steps, or a list with one per step."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    lrs = {k: v.detach().clone().requires_grad_(True) for k, v in (step_sizes or {}).items()}
    supports = support if isinstance(support, list) else [support] * config.inner_steps
    support_advs = [support_advantages(s, config) for s in supports]
    names = adapted_names(leaves, config.adapt)
    total = torch.zeros((), dtype=F64)
    for i in range(query.num_tasks):
        theta = {k: v.clone() for k, v in leaves.items()}  # this task's own copy, still a function of `leaves`
        q_i = query.select_tasks(i)
        for step_support, step_adv in zip(supports, support_advs):
            s_i = step_support.select_tasks(i)
            logp = reference_log_probs(policy, theta, s_i, config.isolate_episodes)
            loss = -(logp * step_adv[i][s_i.valid]).sum() / s_i.valid.sum()
            grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=not config.first_order,
                                        allow_unused=True, materialize_grads=True)
            theta = {**theta, **{k: theta[k] - lrs.get(k, config.inner_lr) * g for k, g in zip(names, grads)}}
        logp = reference_log_probs(policy, theta, q_i, False)
        ratio = torch.exp(logp - old_log_probs[i][q_i.valid])
        total = total - (ratio * query_adv[i][q_i.valid]).mean() / query.num_tasks
    wrt = {**leaves, **{f"lr:{k}": v for k, v in lrs.items()}}
    return dict(zip(wrt, torch.autograd.grad(total, list(wrt.values()), allow_unused=True, materialize_grads=True)))


def batched_meta_gradient(policy, params, support, query, old_log_probs, query_adv, config, step_sizes=None):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    lrs = {k: v.detach().clone().requires_grad_(True) for k, v in step_sizes.items()} if step_sizes else None
    adapted = adapt(policy, leaves, support, config, lrs)
    loss = outer_surrogate(policy, adapted, query, old_log_probs, query_adv)
    wrt = {**leaves, **{f"lr:{k}": v for k, v in (lrs or {}).items()}}
    return dict(zip(wrt, torch.autograd.grad(loss, list(wrt.values()), allow_unused=True, materialize_grads=True)))


def setup(kind: str, action: str, **config):
    policy = make_policy(kind, action)
    params = shared_params(policy)
    cfg = MAMLConfig(**{"inner_lr": 0.1, **config})
    support, query = make_trajectories(policy.discrete), make_trajectories(policy.discrete)
    old, adv = query_targets(policy, params, support, query, cfg)
    return policy, params, cfg, support, query, old, adv


# --- tests ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("action", ["box", "discrete"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_meta_gradient_matches_per_task_loop(kind, action, first_order, inner_steps):
    policy, params, cfg, support, query, old, adv = setup(
        kind, action, first_order=first_order, inner_steps=inner_steps, isolate_episodes=kind == "transformer"
    )
    got = batched_meta_gradient(policy, params, support, query, old, adv, cfg)
    want = per_task_reference_meta_gradient(policy, params, support, query, old, adv, cfg)
    assert set(got) == set(want)
    for k in want:
        assert torch.isfinite(got[k]).all(), k
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    assert max(float(g.abs().max()) for g in got.values()) > 1e-3


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_task_chunks_give_the_same_losses_and_meta_gradient(kind, chunk):
    policy, params, cfg, support, query, old, adv = setup(kind, "box", inner_steps=2)
    chunked = dataclasses.replace(cfg, task_chunk=chunk)
    got = batched_meta_gradient(policy, params, support, query, old, adv, chunked)
    want = batched_meta_gradient(policy, params, support, query, old, adv, cfg)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-10, msg=k)
    adapted = adapt(policy, params, support, cfg)
    outputs = batched_policy_outputs(policy, adapted, query)
    for x, y in zip(batched_policy_outputs(policy, adapted, query, task_chunk=chunk), outputs):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=0)
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in adapted.items()}
    old_outputs = PolicyOutput(*(x.detach() for x in outputs))
    torch.testing.assert_close(outer_kl(policy, moved, query, old_outputs, task_chunk=chunk),
                               outer_kl(policy, moved, query, old_outputs), atol=1e-12, rtol=0)
    torch.testing.assert_close(ppo_outer_loss(policy, moved, query, old, adv, task_chunk=chunk),
                               ppo_outer_loss(policy, moved, query, old, adv), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_steps_on_fresh_support_batches_match_per_task_loop(kind):
    """The learner's K steps: step k adapts on its own batch, continuing from the per-task parameters (stacked)."""
    policy, params, cfg, support, query, old, adv = setup(kind, "box", meta_sgd=True)
    step_sizes = {k: v * (1.0 + torch.rand_like(v)) for k, v in init_step_sizes(params, cfg).items()}
    second = make_trajectories(policy.discrete)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    lrs = {k: v.detach().clone().requires_grad_(True) for k, v in step_sizes.items()}
    adapted = adapt(policy, leaves, support, cfg, lrs)
    adapted = adapt(policy, adapted, second, cfg, lrs, stacked=True)
    loss = outer_surrogate(policy, adapted, query, old, adv)
    wrt = {**leaves, **{f"lr:{k}": v for k, v in lrs.items()}}
    got = dict(zip(wrt, torch.autograd.grad(loss, list(wrt.values()), allow_unused=True, materialize_grads=True)))
    two_steps = dataclasses.replace(cfg, inner_steps=2)
    want = per_task_reference_meta_gradient(policy, params, [support, second], query, old, adv, two_steps, step_sizes)
    same_batch = per_task_reference_meta_gradient(policy, params, support, query, old, adv, two_steps, step_sizes)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    assert max(float((want[k] - same_batch[k]).abs().max()) for k in want) > 1e-4  # the second batch matters


def meta_objective(policy, cfg, support, query, old, adv):
    return lambda p: outer_surrogate(policy, adapt(policy, p, support, cfg), query, old, adv)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("action", ["box", "discrete"])
def test_second_order_matches_finite_differences_and_differs_from_first_order(kind, action):
    policy, params, cfg, support, query, old, adv = setup(kind, action, inner_steps=2)
    second = batched_meta_gradient(policy, params, support, query, old, adv, cfg)
    first = batched_meta_gradient(policy, params, support, query, old, adv, dataclasses.replace(cfg, first_order=True))
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    objective = meta_objective(policy, cfg, support, query, old, adv)
    eps = 1e-5
    with torch.no_grad():
        plus = objective({k: v + eps * direction[k] for k, v in params.items()})
        minus = objective({k: v - eps * direction[k] for k, v in params.items()})
    finite_diff = float(plus - minus) / (2 * eps)
    analytic = float(sum((second[k] * direction[k]).sum() for k in params))
    assert abs(finite_diff - analytic) < 1e-6 * max(1.0, abs(analytic))
    gap = sum(float((second[k] - first[k]).square().sum()) for k in params) ** 0.5
    norm = sum(float(second[k].square().sum()) for k in params) ** 0.5
    assert gap > 0.02 * norm  # a detached second-order term would be noticed


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_meta_sgd_step_sizes_get_gradients(kind):
    policy, params, cfg, support, query, old, adv = setup(kind, "box", meta_sgd=True, inner_steps=2)
    step_sizes = init_step_sizes(params, cfg)
    assert set(step_sizes) == set(params) and all(bool((s == 0.1).all()) for s in step_sizes.values())
    got = batched_meta_gradient(policy, params, support, query, old, adv, cfg, step_sizes)
    want = per_task_reference_meta_gradient(policy, params, support, query, old, adv, cfg, step_sizes)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    for k in step_sizes:
        if "value" not in k:  # the inner loss does not depend on the value head
            assert got[f"lr:{k}"].abs().max() > 1e-6, k
    plain = dataclasses.replace(cfg, meta_sgd=False)
    with torch.no_grad():
        a, b = adapt(policy, params, support, cfg, step_sizes), adapt(policy, params, support, plain)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_adapt_heads_leaves_trunk_shared(kind):
    policy, params, cfg, support, query, old, adv = setup(kind, "discrete", adapt="heads", inner_steps=2)
    adapted = adapt(policy, params, support, cfg)
    assert set(adapted) == set(params)
    for k, v in adapted.items():
        assert v.shape == (N, *params[k].shape), k
        if not k.startswith("head."):
            assert torch.equal(v, params[k].expand_as(v)), k
    assert (adapted["head.dist.weight"] - params["head.dist.weight"]).abs().amax(dim=(1, 2)).min() > 1e-4
    got = batched_meta_gradient(policy, params, support, query, old, adv, cfg)
    want = per_task_reference_meta_gradient(policy, params, support, query, old, adv, cfg)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("action", ["box", "discrete"])
def test_one_inner_step_lowers_each_inner_loss(kind, action):
    policy = make_policy(kind, action)
    params = shared_params(policy)
    cfg = MAMLConfig(inner_lr=0.01, isolate_episodes=True)
    support = make_trajectories(policy.discrete)
    adv = support_advantages(support, cfg)
    with torch.no_grad():
        adapted = adapt(policy, params, support, cfg)
        for i in range(N):
            task = support.select_tasks(i)
            before = inner_loss(policy, params, task, adv[i], True)
            after = inner_loss(policy, {k: v[i] for k, v in adapted.items()}, task, adv[i], True)
            assert after < before - 1e-6, (i, float(before), float(after))


def test_policy_outputs_skip_padding():
    """Padding inside a trial changes neither the outputs at valid steps nor their positions."""
    policy = make_policy("transformer", "box")
    traj = make_trajectories(False, n=1, e=4, t=5, ept=4).select_tasks(0)
    with torch.no_grad():
        out = policy_outputs(policy, {k: v.detach() for k, v in policy.named_parameters()}, traj)
        inputs = tuple(x[traj.valid][None] for x in (traj.obs, traj.prev_action, traj.prev_reward, traj.episode_start))
        compact = policy(*inputs)  # the trial's valid steps only, (1, L, ..)
    assert not traj.valid.all()
    torch.testing.assert_close(out.dist[traj.valid], compact.dist[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out.value[traj.valid], compact.value[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("action", ["box", "discrete"])
def test_outer_kl_and_ppo(action):
    policy, params, cfg, support, query, old, adv = setup("transformer", action)
    adapted = adapt(policy, params, support, cfg)
    old_outputs = PolicyOutput(*(x.detach() for x in batched_policy_outputs(policy, adapted, query)))
    kl = outer_kl(policy, adapted, query, old_outputs)
    assert abs(kl.item()) < 1e-12
    (kl_grad,) = torch.autograd.grad(kl, params["embed.weight"])
    assert kl_grad.abs().max() < 1e-10
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in adapted.items()}
    assert outer_kl(policy, moved, query, old_outputs).item() > 1e-4

    logp_now = torch.where(query.valid, D.log_prob(old_outputs, torch.where(
        query.valid.view(*query.valid.shape, *([1] * (query.actions.dim() - 3))), query.actions, 0), policy.discrete), 0.0)
    for loss_fn in (outer_surrogate, ppo_outer_loss):  # at ratio 1 both are -mean(A)
        value = loss_fn(policy, adapted, query, logp_now, adv)
        want = -torch.stack([adv[i][query.valid[i]].mean() for i in range(N)]).mean()
        torch.testing.assert_close(value, want, atol=1e-10, rtol=0)
    clipped = ppo_outer_loss(policy, adapted, query, logp_now - 1.0, adv.abs(), clip=0.2)  # ratios e > 1.2
    want = -torch.stack([1.2 * adv[i][query.valid[i]].abs().mean() for i in range(N)]).mean()
    torch.testing.assert_close(clipped, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("action", ["box", "discrete"])
def test_trpo_fisher_product_through_adapt_matches_per_task_loop(action):
    """The outer TRPO step's Fisher-vector product (Hessian of KL(old || adapt(theta))) equals the per-task loop's."""
    policy, params, cfg, support, query, old, adv = setup("transformer", action)
    shared = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        old_outputs = batched_policy_outputs(policy, adapt(policy, shared, support, cfg), query)
    support_adv = support_advantages(support, cfg)

    def kl_batched(p):
        return outer_kl(policy, adapt(policy, p, support, cfg), query, old_outputs)

    def kl_loop(p):
        total = torch.zeros((), dtype=F64)
        for i in range(N):
            s_i, q_i = support.select_tasks(i), query.select_tasks(i)
            loss = -(reference_log_probs(policy, p, s_i, False) * support_adv[i][s_i.valid]).sum() / s_i.valid.sum()
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True, allow_unused=True, materialize_grads=True)
            theta = {k: v - cfg.inner_lr * g for (k, v), g in zip(p.items(), grads)}
            old_i = PolicyOutput(*(x[i] for x in old_outputs))
            total = total + policy.kl(old_i, reference_outputs(policy, theta, q_i, False))[q_i.valid].mean() / N
        return total

    v = torch.randn(sum(x.numel() for x in shared.values()), dtype=F64)
    got, want = make_hvp(kl_batched, shared)(v), make_hvp(kl_loop, shared)(v)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)
    assert want.abs().max() > 1e-2


def test_layer_norm_split_keeps_second_order_under_vmap():
    """vmap(grad) through an affine LayerNorm, differentiated again, equals the per-example loop (pytorch/functorch#534)."""
    x = torch.randn(3, 5, 4, dtype=F64)
    params = {"w": torch.randn(4, 4, dtype=F64), "g": torch.randn(4, dtype=F64), "b": torch.randn(4, dtype=F64)}

    def f(p, xi):
        return torch.nn.functional.layer_norm(xi @ p["w"], (4,), p["g"], p["b"]).sin().sum()

    def meta(p, batched: bool):
        if batched:
            with AffineLayerNormSplit():
                g = vmap(grad(f), in_dims=(None, 0))(p, x)
        else:
            g = {k: torch.stack([grad(f)(p, xi)[k] for xi in x]) for k in p}
        return sum(f({k: p[k] - 0.3 * g[k][i] for k in p}, x[i]) for i in range(3))

    got, want = grad(meta)(params, True), grad(meta)(params, False)
    for k in params:
        torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=0)
    with AffineLayerNormSplit():
        split = f(params, x)
    torch.testing.assert_close(split, f(params, x), atol=1e-12, rtol=0)


def test_support_advantages_fit_a_baseline_per_task():
    base = make_trajectories(False, n=1)
    twice = base.map(lambda x: torch.cat([x, x]))  # two tasks with the same observations and episode lengths
    traj = Trajectories(**{**vars(twice), "rewards": torch.cat([base.rewards, 10 * base.rewards])})
    cfg = MAMLConfig(normalize_advantages=False)
    adv = support_advantages(traj, cfg)  # (2, E, T)
    valid = traj.valid
    assert torch.isfinite(adv).all() and (adv[~valid] == 0).all()
    torch.testing.assert_close(adv[1], 10 * adv[0], atol=1e-9, rtol=1e-9)  # a shared baseline would break this
    returns = discounted_returns(traj.rewards, valid, cfg.gamma, traj.terminated)
    baseline = linear_baseline_values(traj.obs, valid, returns)
    torch.testing.assert_close(adv, torch.where(valid, returns - baseline, 0.0), atol=1e-9, rtol=0)
    assert (baseline[1] - baseline[0]).abs().max() > 1.0
    for i in range(2):
        torch.testing.assert_close(support_advantages(traj.select_tasks([i]), cfg)[0], adv[i], atol=1e-9, rtol=0)

    other_padding = traj.map(lambda x: torch.where(
        valid.view(*valid.shape, *([1] * (x.dim() - 3))), x, 123.0) if x.is_floating_point() and x.dim() >= 3 else x)
    torch.testing.assert_close(support_advantages(other_padding, cfg), adv, atol=0, rtol=0)

    normalized = support_advantages(traj, MAMLConfig(normalize_advantages=True))
    for i in range(2):
        torch.testing.assert_close(normalized[i][valid[i]].mean(), torch.tensor(0.0, dtype=F64), atol=1e-9, rtol=0)
        torch.testing.assert_close(normalized[i][valid[i]].std(unbiased=False), torch.tensor(1.0, dtype=F64), atol=1e-6,
                                   rtol=0)
    gae_adv = support_advantages(traj, MAMLConfig(normalize_advantages=False, gae_lambda=0.5))
    assert (gae_adv - adv).abs().max() > 1e-3 and (gae_adv[~valid] == 0).all()


def test_bad_inputs_are_named():
    policy, params, cfg, support, query, old, adv = setup("mlp", "box")
    with pytest.raises(ValueError, match="'trunks.'"):
        adapt(policy, params, support, MAMLConfig(adapt="trunks."))
    with pytest.raises(ValueError, match="adapt must be"):
        MAMLConfig(adapt="body,")
    with pytest.raises(ValueError, match="inner_steps"):
        MAMLConfig(inner_steps=0)
    for chunk in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"task_chunk must be None .* got {chunk!r}"):
            MAMLConfig(task_chunk=chunk)
    with pytest.raises(ValueError, match="task_chunk must be"):
        outer_surrogate(policy, adapt(policy, params, support, cfg), query, old, adv, task_chunk=0)
    with pytest.raises(ValueError, match="step_sizes"):
        adapt(policy, params, support, MAMLConfig(meta_sgd=True))
    with pytest.raises(ValueError, match="episodes_per_trial=3"):
        policy_outputs(policy, params, Trajectories(**{**vars(support.select_tasks(0)), "episodes_per_trial": 3}))
    with pytest.raises(ValueError, match=r"advantages has shape \(3, 4\)"):
        outer_surrogate(policy, adapt(policy, params, support, cfg), query, old, adv[..., 0])

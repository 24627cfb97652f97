"""Returns, GAE, the linear feature baseline and advantage normalisation against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl.returns import (
    discounted_returns,
    fit_linear_baseline,
    gae,
    linear_baseline_features,
    linear_baseline_values,
    normalize_advantages,
)

DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def t_(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def one_task(episodes, dtype=torch.float64):
    """[1, E, T] from a list of E episodes."""
    return torch.tensor([episodes], dtype=dtype)


def four_episodes(dtype):
    """One task, four episodes of up to 3 steps, rewards (1, 2, 4), values (1, 2, 3), last_value 8.

    0: terminated at step 2; 1: truncated after step 2; 2: truncated after step 1 (one padding step);
    3: terminated at step 1 (one padding step).
    """
    rewards = one_task([[1, 2, 4]] * 4, dtype)
    values = one_task([[1, 2, 3]] * 4, dtype)
    valid = torch.tensor([[[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]]], dtype=torch.bool)
    terminated = torch.tensor([[[0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0]]], dtype=torch.bool)
    last_value = t_([[8, 8, 8, 8]], dtype)
    return rewards, values, valid, terminated, last_value


def random_batch(n=3, e=4, t=6, d=2, dtype=torch.float64, seed=0):
    """Random rollouts with episode lengths in [1, t], terminated on the last valid step half the time."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n, e), generator=g)  # (N, E)
    steps = torch.arange(t)
    valid = steps < lengths[..., None]  # (N, E, T)
    ends = torch.rand(n, e, generator=g) < 0.5  # (N, E)
    terminated = (steps == lengths[..., None] - 1) & ends[..., None]  # (N, E, T)
    rewards = torch.randn(n, e, t, generator=g, dtype=dtype)
    values = torch.randn(n, e, t, generator=g, dtype=dtype)
    last_value = torch.randn(n, e, generator=g, dtype=dtype)
    obs = 4 * torch.randn(n, e, t, d, generator=g, dtype=dtype)  # some beyond the clip range
    return dict(rewards=rewards, values=values, valid=valid, terminated=terminated, last_value=last_value, obs=obs)


def pad_with_garbage(x, extra, fill):
    """x [..., T] or [..., T, D] extended along T by `extra` steps of `fill`."""
    return torch.cat([x, torch.full((*x.shape[:2], extra, *x.shape[3:]), fill, dtype=x.dtype)], dim=2)


# discounted returns ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_discounted_returns_termination_vs_truncation(dtype):
    rewards, _, valid, terminated, last_value = four_episodes(dtype)
    out = discounted_returns(rewards, valid, 0.5, terminated, last_value)
    expected = one_task(
        [
            [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4],  # terminated: no bootstrap
            [1 + 0.5 * 2 + 0.25 * 4 + 0.125 * 8, 2 + 0.5 * 4 + 0.25 * 8, 4 + 0.5 * 8],  # truncated: bootstrap from 8
            [1 + 0.5 * 2 + 0.25 * 8, 2 + 0.5 * 8, 0],  # truncated after step 1
            [1 + 0.5 * 2, 2, 0],  # terminated at step 1
        ],
        dtype,
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_discounted_returns_without_last_value_does_not_bootstrap():
    rewards, _, valid, terminated, _ = four_episodes(torch.float64)
    out = discounted_returns(rewards, valid, 0.5, terminated)
    expected = one_task([[3, 4, 4], [3, 4, 4], [2, 2, 0], [2, 2, 0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_discounted_returns_without_terminated_treats_ends_as_truncation():
    rewards, _, valid, _, last_value = four_episodes(torch.float64)
    out = discounted_returns(rewards, valid, 0.5, None, last_value)
    expected = one_task([[4, 6, 8], [4, 6, 8], [4, 6, 0], [4, 6, 0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# GAE ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_hand_computed(dtype):
    rewards, values, valid, terminated, last_value = four_episodes(dtype)
    adv, ret = gae(rewards, values, valid, 0.5, 0.5, terminated, last_value)
    # deltas: truncated (1 + 1 - 1, 2 + 1.5 - 2, 4 + 4 - 3) = (1, 1.5, 5); terminated last step: 4 - 3 = 1;
    # episode 2 (truncated after step 1): (1, 2 + 4 - 2) = (1, 4); episode 3 (terminated at step 1): (1, 0).
    # A_t = delta_t + 0.25 * A_{t+1}
    expected = one_task(
        [
            [1 + 0.25 * (1.5 + 0.25 * 1), 1.5 + 0.25 * 1, 1],
            [1 + 0.25 * (1.5 + 0.25 * 5), 1.5 + 0.25 * 5, 5],
            [1 + 0.25 * 4, 4, 0],
            [1 + 0.25 * 0, 0, 0],
        ],
        dtype,
    )
    assert adv.dtype == ret.dtype == dtype
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)
    torch.testing.assert_close(ret, expected + values * valid, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_lambda_one_is_returns_minus_values(dtype):
    b = random_batch(dtype=dtype)
    adv, ret = gae(b["rewards"], b["values"], b["valid"], 0.9, 1.0, b["terminated"], b["last_value"])
    returns = discounted_returns(b["rewards"], b["valid"], 0.9, b["terminated"], b["last_value"])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv, (returns - b["values"]) * b["valid"], **tol)
    torch.testing.assert_close(ret, returns, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_lambda_zero_is_td_error(dtype):
    b = random_batch(dtype=dtype)
    r, v, valid, term, last = b["rewards"], b["values"], b["valid"], b["terminated"], b["last_value"]
    gamma = 0.9
    expected = torch.zeros_like(r)
    n, e, t = r.shape
    for i in range(n):
        for j in range(e):
            for k in range(t):
                if not valid[i, j, k]:
                    continue
                if term[i, j, k]:
                    next_v = 0.0
                elif k + 1 < t and valid[i, j, k + 1]:
                    next_v = v[i, j, k + 1]
                else:
                    next_v = last[i, j]
                expected[i, j, k] = r[i, j, k] + gamma * next_v - v[i, j, k]
    adv, _ = gae(r, v, valid, gamma, 0.0, term, last)
    torch.testing.assert_close(adv, expected)


def test_padding_is_ignored():
    b = random_batch()
    t, extra = b["valid"].shape[-1], 3
    padded = {
        "rewards": pad_with_garbage(b["rewards"], extra, float("nan")),
        "values": pad_with_garbage(b["values"], extra, 1e9),
        "valid": pad_with_garbage(b["valid"], extra, False),
        "terminated": pad_with_garbage(b["terminated"], extra, True),
        "obs": pad_with_garbage(b["obs"], extra, float("nan")),
    }
    # garbage inside the existing padding too
    inside = ~b["valid"]
    padded["rewards"][:, :, :t][inside] = float("inf")
    padded["values"][:, :, :t][inside] = float("nan")
    kw = dict(gamma=0.9, terminated=b["terminated"], last_value=b["last_value"])
    kw_pad = dict(kw, terminated=padded["terminated"])

    ret = discounted_returns(b["rewards"], b["valid"], **kw)
    ret_pad = discounted_returns(padded["rewards"], padded["valid"], **kw_pad)
    torch.testing.assert_close(ret_pad[:, :, :t], ret, rtol=0, atol=0)
    assert (ret_pad[:, :, t:] == 0).all()

    adv, gret = gae(b["rewards"], b["values"], b["valid"], lam=0.95, **kw)
    adv_pad, gret_pad = gae(padded["rewards"], padded["values"], padded["valid"], lam=0.95, **kw_pad)
    torch.testing.assert_close(adv_pad[:, :, :t], adv, rtol=0, atol=0)
    torch.testing.assert_close(gret_pad[:, :, :t], gret, rtol=0, atol=0)
    assert (adv_pad[:, :, t:] == 0).all() and (gret_pad[:, :, t:] == 0).all()

    base = linear_baseline_values(b["obs"], b["valid"], ret)
    base_pad = linear_baseline_values(padded["obs"], padded["valid"], ret_pad)
    torch.testing.assert_close(base_pad[:, :, :t], base)
    assert (base_pad[:, :, t:] == 0).all()

    norm = normalize_advantages(adv, b["valid"], per_task=True)
    norm_pad = normalize_advantages(adv_pad, padded["valid"], per_task=True)
    torch.testing.assert_close(norm_pad[:, :, :t], norm)
    assert (norm_pad[:, :, t:] == 0).all()


def test_gae_gradients_flow_into_values():
    rewards, values, valid, terminated, last_value = four_episodes(torch.float64)
    values.requires_grad_(True)
    last_value.requires_grad_(True)
    adv, _ = gae(rewards, values, valid, 0.5, 0.0, terminated, last_value)
    adv.sum().backward()
    # lambda = 0: A_t = r_t + gamma V(after t) - V_t, so dSum/dV_t = -1 + 0.5 * [step t - 1 continues into t]
    expected = one_task([[-1, -0.5, -0.5], [-1, -0.5, -0.5], [-1, -0.5, 0], [-1, -0.5, 0]])
    torch.testing.assert_close(values.grad, expected, rtol=0, atol=0)
    # only the truncated episodes bootstrap
    torch.testing.assert_close(last_value.grad, t_([[0, 0.5, 0.5, 0]]), rtol=0, atol=0)

    values.grad = None
    last_value.grad = None
    adv, _ = gae(rewards, values, valid, 0.5, 1.0, terminated, last_value)
    adv.sum().backward()
    # lambda = 1: A_t = G_t - V_t with G_t independent of the values
    torch.testing.assert_close(values.grad, -valid.double(), rtol=0, atol=0)
    torch.testing.assert_close(last_value.grad, t_([[0, 0.125 + 0.25 + 0.5, 0.25 + 0.5, 0]]), rtol=0, atol=0)


def test_gae_gradcheck():
    b = random_batch(n=2, e=2, t=4)
    values = b["values"].clone().requires_grad_(True)
    last_value = b["last_value"].clone().requires_grad_(True)

    def fn(v, lv):
        return gae(b["rewards"], v, b["valid"], 0.9, 0.8, b["terminated"], lv)

    assert torch.autograd.gradcheck(fn, (values, last_value))


# linear feature baseline ----------------------------------------------------------------------------------------


def numpy_features(obs, length):
    """rllab's features for one episode of `length` steps, written out in numpy."""
    o = np.clip(obs[:length], -10, 10)
    s = np.arange(length).reshape(-1, 1) / 100.0
    return np.concatenate([o, o**2, s, s**2, s**3, np.ones((length, 1))], axis=1)


def numpy_fit(obs, valid, returns, reg=1e-5):
    """Per-task ridge fit on the normal equations, one task at a time."""
    weights = []
    for i in range(obs.shape[0]):
        lengths = valid[i].sum(axis=1)
        x = np.concatenate([numpy_features(obs[i, j], lengths[j]) for j in range(obs.shape[1])])
        y = np.concatenate([returns[i, j, : lengths[j]] for j in range(obs.shape[1])])
        weights.append(np.linalg.solve(x.T @ x + reg * np.eye(x.shape[1]), x.T @ y))
    return np.stack(weights)


def test_features_hand_computed():
    obs = t_([[[[0.5, -12.0], [3.0, 20.0], [7.0, 7.0]]]])  # (1, 1, 3, 2)
    valid = torch.tensor([[[True, True, False]]])
    feats = linear_baseline_features(obs, valid)
    episode = [
        [0.5, -10.0, 0.25, 100.0, 0.0, 0.0, 0.0, 1.0],
        [3.0, 10.0, 9.0, 100.0, 0.01, 0.0001, 0.000001, 1.0],
        [0.0] * 8,
    ]
    expected = one_task([episode])
    torch.testing.assert_close(feats, expected)


def test_batched_baseline_matches_per_task_numpy_fit():
    b = random_batch(n=4, e=5, t=8, d=3)
    returns = discounted_returns(b["rewards"], b["valid"], 0.99, b["terminated"], b["last_value"])
    feats = linear_baseline_features(b["obs"], b["valid"])
    weights = fit_linear_baseline(feats, returns, b["valid"])
    expected = numpy_fit(b["obs"].numpy(), b["valid"].numpy(), returns.numpy())
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5, atol=1e-5)

    values = linear_baseline_values(b["obs"], b["valid"], returns)
    by_hand = torch.einsum("netf,nf->net", feats, torch.from_numpy(expected)) * b["valid"]
    torch.testing.assert_close(values, by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_baseline_fits_an_exactly_linear_target(dtype):
    b = random_batch(n=3, e=6, t=100, d=2, dtype=dtype)  # a horizon like the MAML tasks'
    feats = linear_baseline_features(b["obs"], b["valid"])  # (N, E, T, 8)
    w_true = torch.randn(3, feats.shape[-1], dtype=dtype, generator=torch.Generator().manual_seed(1))
    target = torch.einsum("netf,nf->net", feats, w_true)  # (N, E, T)
    values = linear_baseline_values(b["obs"], b["valid"], target)
    assert values.dtype == dtype
    scale = target.abs().max().item()
    tol = 1e-4 * scale if dtype == torch.float32 else 1e-6 * scale
    torch.testing.assert_close(values, target, rtol=0, atol=tol)


def test_baseline_float32_close_to_float64():
    b = random_batch(n=3, e=5, t=8, d=2)
    returns = discounted_returns(b["rewards"], b["valid"], 0.99, b["terminated"], b["last_value"])
    v64 = linear_baseline_values(b["obs"], b["valid"], returns)
    v32 = linear_baseline_values(b["obs"].float(), b["valid"], returns.float())
    torch.testing.assert_close(v32.double(), v64, rtol=1e-3, atol=1e-3)


def test_baseline_retries_with_larger_regularisation():
    # Two identical feature columns of 100: in float32, 1e4 + 1e-5 and 1e4 + 1e-4 round to 1e4, so the first two
    # regularised systems are exactly singular; 1e-3 survives rounding and gives a finite solution.
    feats = torch.full((1, 1, 1, 2), 100.0)
    returns = torch.tensor([[[3.0]]])
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    assert not torch.isfinite(fit_linear_baseline(feats, returns, valid, attempts=1)).all()
    weights = fit_linear_baseline(feats, returns, valid)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(100 * weights.sum(), torch.tensor(3.0), rtol=1e-3, atol=1e-3)


def test_baseline_on_task_without_valid_steps_is_zero():
    b = random_batch()
    valid = b["valid"].clone()
    valid[1] = False
    returns = discounted_returns(b["rewards"], valid, 0.9)
    values = linear_baseline_values(b["obs"], valid, returns)
    assert torch.isfinite(values).all()
    assert (values[1] == 0).all()


# normalisation --------------------------------------------------------------------------------------------------


def test_normalize_hand_computed():
    adv = t_([[[1, 3, 100]], [[10, 20, 30]]])  # (2, 1, 3)
    valid = torch.tensor([[[True, True, False]], [[True, True, True]]])
    per_task = normalize_advantages(adv, valid, per_task=True, eps=0.0)
    # task 0: mean 2, std 1; task 1: mean 20, std sqrt(200 / 3)
    s1 = (200 / 3) ** 0.5
    torch.testing.assert_close(per_task, t_([[[-1, 1, 0]], [[-10 / s1, 0, 10 / s1]]]))
    overall = normalize_advantages(adv, valid, per_task=False, eps=0.0)
    # valid values 1, 3, 10, 20, 30: mean 12.8, population variance
    # (11.8^2 + 9.8^2 + 2.8^2 + 7.2^2 + 17.2^2) / 5 = 590.8 / 5 = 118.16
    s = 118.16**0.5
    expected = t_([[[(1 - 12.8) / s, (3 - 12.8) / s, 0]], [[(10 - 12.8) / s, (20 - 12.8) / s, (30 - 12.8) / s]]])
    torch.testing.assert_close(overall, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_task", [True, False])
def test_normalize_moments(dtype, per_task):
    b = random_batch(dtype=dtype)
    adv = 5 + 3 * b["rewards"]
    out = normalize_advantages(adv, b["valid"], per_task=per_task)
    assert out.dtype == dtype
    assert (out[~b["valid"]] == 0).all()
    groups = [out[i][b["valid"][i]] for i in range(out.shape[0])] if per_task else [out[b["valid"]]]
    for g in groups:
        if g.numel() > 1:
            torch.testing.assert_close(g.mean().item(), 0.0, rtol=0, atol=1e-5)
            torch.testing.assert_close(g.std(unbiased=False).item(), 1.0, rtol=0, atol=1e-5)


# devices and input checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_device(device):
    b = {k: v.to(device) for k, v in random_batch().items()}
    adv, ret = gae(b["rewards"], b["values"], b["valid"], 0.99, 0.95, b["terminated"], b["last_value"])
    base = linear_baseline_values(b["obs"], b["valid"], ret)
    norm = normalize_advantages(adv, b["valid"], per_task=True)
    assert adv.device.type == ret.device.type == base.device.type == norm.device.type == device
    cpu = random_batch()
    adv_cpu, _ = gae(cpu["rewards"], cpu["values"], cpu["valid"], 0.99, 0.95, cpu["terminated"], cpu["last_value"])
    torch.testing.assert_close(adv.cpu(), adv_cpu)


def test_bad_inputs_are_named():
    b = random_batch()
    with pytest.raises(TypeError, match="valid must be a bool"):
        discounted_returns(b["rewards"], b["valid"].float(), 0.9)
    with pytest.raises(ValueError, match=r"values has shape \(3, 4, 5\)"):
        gae(b["rewards"], b["values"][..., :5], b["valid"], 0.9, 0.95)
    with pytest.raises(ValueError, match=r"last_value has shape \(3,\)"):
        discounted_returns(b["rewards"], b["valid"], 0.9, last_value=b["last_value"][:, 0])
    with pytest.raises(ValueError, match="obs has shape"):
        linear_baseline_features(b["obs"][..., 0], b["valid"])

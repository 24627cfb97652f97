"""MLPPolicy (same interface as the Transformer), the methods both policies share, and the pure distribution functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch.distributions import Categorical, Normal, kl_divergence
from torch.func import functional_call, grad, vmap

from metarl.agents import distributions as D
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.agents.policy import HistoryPolicy, PolicyOutput, encode_prev_action
from metarl.agents.transformer import TransformerConfig, TransformerPolicy

OBS = spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
ACTION_SPACES = {"box": spaces.Box(-1, 1, shape=(2,), dtype=np.float32), "discrete": spaces.Discrete(4)}


def make_inputs(B: int, T: int, discrete: bool) -> tuple[torch.Tensor, ...]:
    """obs [B, T, 3], prev_action [B, T, A], prev_reward [B, T], episode_start [B, T]."""
    space = ACTION_SPACES["discrete" if discrete else "box"]
    actions = torch.randint(0, 4, (B, T)) if discrete else torch.randn(B, T, 2)
    episode_start = torch.zeros(B, T, dtype=torch.bool)
    episode_start[:, 0] = True
    return torch.randn(B, T, 3), encode_prev_action(actions, space), torch.randn(B, T), episode_start


@pytest.mark.parametrize("action", ["box", "discrete"])
def test_sequence_equals_step_and_cache_unchanged(action):
    policy = MLPPolicy(OBS, ACTION_SPACES[action], MLPConfig(hidden=(8, 8), activation="tanh", value_hidden=(5,)))
    inputs = make_inputs(2, 5, policy.discrete)
    with torch.no_grad():
        seq = policy(*inputs)
        cache = policy.initial_cache(2)
        for t in range(5):
            out, new_cache = policy(*(x[:, t] for x in inputs), cache=cache, isolate_episodes=True)
            assert new_cache is cache
            torch.testing.assert_close(out.dist, seq.dist[:, t], atol=1e-6, rtol=0)
            torch.testing.assert_close(out.value, seq.value[:, t], atol=1e-6, rtol=0)
    assert seq.dist.shape == (2, 5, policy.spec.action_dim) and seq.value.shape == (2, 5)
    assert seq.log_std.shape == (2, 5, 0 if policy.discrete else 2)


def test_masks_are_checked_and_ignored():
    policy = MLPPolicy(OBS, ACTION_SPACES["box"], MLPConfig(hidden=(8,)))
    inputs = make_inputs(2, 5, False)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(policy(*inputs, valid=valid), policy(*inputs), atol=0, rtol=0)
        cache = policy.initial_cache(2)
        out, same = policy(*(x[:, 0] for x in inputs), cache=cache, step_mask=valid[:, 2], inplace=True)
        assert same is cache
        torch.testing.assert_close(out.dist, policy(*inputs).dist[:, 0], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"valid has shape \(2,\), expected \(2, 5\)"):
        policy(*inputs, valid=valid[:, 0])
    with pytest.raises(TypeError, match="step_mask must be torch.bool"):
        policy(*(x[:, 0] for x in inputs), cache={}, step_mask=torch.ones(2))


def test_vmap_over_task_parameters_with_empty_cache():
    policy = MLPPolicy(OBS, ACTION_SPACES["box"], MLPConfig(hidden=(8,)))
    N = 3
    params = {k: torch.stack([v.detach() + 0.1 * i * torch.randn_like(v) for i in range(N)])
              for k, v in policy.named_parameters()}
    inputs = [torch.stack(xs) for xs in zip(*(make_inputs(2, 4, False) for _ in range(N)))]  # each [N, 2, 4, ..]
    with torch.no_grad():
        seq = vmap(lambda p, *x: functional_call(policy, p, x))(params, *inputs)
        out, cache = vmap(lambda p, c, *x: functional_call(policy, p, x, {"cache": c}))(
            params, policy.initial_cache(2), *(x[:, :, 0] for x in inputs)
        )
        assert cache == {} and out.log_std.shape == (N, 2, 2) and seq.log_std.shape == (N, 2, 4, 2)
        for i in range(N):
            ref = functional_call(policy, {k: v[i] for k, v in params.items()}, tuple(x[i] for x in inputs))
            for got, want in zip((f[i] for f in seq), ref):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.dist[i], ref.dist[:, 0], atol=1e-5, rtol=0)


def test_second_order_maml_matches_autograd():
    policy = MLPPolicy(OBS, ACTION_SPACES["box"], MLPConfig(hidden=(6, 6))).double()
    params = {k: v.detach() for k, v in policy.named_parameters()}
    obs, prev_action, prev_reward, episode_start = make_inputs(2, 6, False)
    inputs = (obs.double(), prev_action.double(), prev_reward.double(), episode_start)
    actions, adv = torch.randn(2, 6, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)

    def loss(p):
        out = functional_call(policy, p, inputs)
        return -(D.log_prob(out, actions, False) * adv).mean() + 0.5 * (out.value - adv).square().mean()

    def meta_loss(p):
        g = grad(loss)(p)
        return loss({k: p[k] - 0.5 * g[k] for k in p})

    g_func = grad(meta_loss)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    gs = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    outer = loss({k: leaves[k] - 0.5 * g for k, g in zip(leaves, gs)})
    g_auto = torch.autograd.grad(outer, list(leaves.values()))
    for k, g in zip(leaves, g_auto):
        torch.testing.assert_close(g_func[k], g, atol=1e-5, rtol=0)


def test_wrong_obs_shape_and_bad_config():
    policy = MLPPolicy(OBS, ACTION_SPACES["box"])
    _, prev_action, prev_reward, episode_start = make_inputs(2, 5, False)
    with pytest.raises(ValueError, match=r"obs has shape \(2, 5, 4\), expected \[B, T, 3\]"):
        policy(torch.zeros(2, 5, 4), prev_action, prev_reward, episode_start)
    with pytest.raises(ValueError, match="'sigmoid'"):
        MLPConfig(activation="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Dict"):
        MLPPolicy(OBS, spaces.Dict({"a": spaces.Discrete(2)}))
    with pytest.raises(ValueError, match="init must be 'default' or 'glorot', got 'he'"):
        MLPConfig(init="he")  # type: ignore[arg-type]


def test_glorot_init_covers_every_action_layer():
    torch.manual_seed(0)
    policy = MLPPolicy(OBS, ACTION_SPACES["box"], MLPConfig(hidden=(64, 64), init="glorot"))
    layers = [m for m in policy.trunk if isinstance(m, torch.nn.Linear)] + [policy.head.dist]
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    default = MLPPolicy(OBS, ACTION_SPACES["box"], MLPConfig(hidden=(64, 64)))
    assert default.head.dist.weight.std() < 0.02 < policy.head.dist.weight.std()  # N(0, 0.01) head by default


TINY_TRANSFORMER = TransformerConfig(n_layers=1, d_model=8, n_heads=2, context=4)
POLICIES = {
    "mlp": lambda action: MLPPolicy(OBS, ACTION_SPACES[action], MLPConfig(hidden=(8,))),
    "transformer": lambda action: TransformerPolicy(OBS, ACTION_SPACES[action], TINY_TRANSFORMER),
}


@pytest.mark.parametrize("kind", sorted(POLICIES))
@pytest.mark.parametrize("action", ["box", "discrete"])
def test_shared_policy_methods(kind, action):
    """The rollout-facing methods use the policy's own action space and delegate to `distributions`."""
    policy = POLICIES[kind](action).double()
    discrete = action == "discrete"
    assert isinstance(policy, HistoryPolicy) and policy.action_space is ACTION_SPACES[action] and policy.observation_space is OBS
    actions = torch.tensor([3, 0]) if discrete else torch.randn(2, 2)
    prev_action = policy.encode_prev_action(actions)
    assert prev_action.dtype == torch.float64 and prev_action.shape == (2, policy.spec.action_dim)
    if discrete:
        assert prev_action.tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]
    noise = policy.action_noise(2, torch.Generator().manual_seed(1), "cpu")
    draw = torch.rand if discrete else torch.randn  # uniform [0, 1) for Gumbel-max, standard normal for a Gaussian
    assert torch.equal(noise, draw(2, policy.spec.action_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    out, _ = policy(torch.randn(2, 3, dtype=torch.float64), prev_action, torch.zeros(2, dtype=torch.float64),
                    torch.ones(2, dtype=torch.bool), cache=policy.initial_cache(2))
    sampled = policy.sample_action(out, noise)
    assert torch.equal(sampled, D.sample(out, noise)) and torch.equal(policy.mode_action(out), D.mode(out))
    assert sampled.shape == actions.shape
    torch.testing.assert_close(policy.log_prob(out, sampled), D.log_prob(out, sampled, discrete))
    torch.testing.assert_close(policy.entropy(out), D.entropy(out, discrete))
    other = PolicyOutput(out.dist + 0.1, out.log_std - 0.2 * (not discrete), out.value)
    torch.testing.assert_close(policy.kl(out, other), D.kl(out, other, discrete))
    assert policy.kl(out, out).abs().max() < 1e-12


# distributions


def gaussian_out(*batch: int) -> PolicyOutput:
    return PolicyOutput(torch.randn(*batch, 3), 0.3 * torch.randn(3), torch.zeros(batch))


def categorical_out(*batch: int) -> PolicyOutput:
    return PolicyOutput(torch.randn(*batch, 5), torch.zeros(0), torch.zeros(batch))


def test_gaussian_matches_torch_distributions():
    old, new = gaussian_out(4, 6), gaussian_out(4, 6)
    action = torch.randn(4, 6, 3)
    ref_old, ref_new = Normal(old.dist, old.log_std.exp()), Normal(new.dist, new.log_std.exp())
    torch.testing.assert_close(D.log_prob(old, action, False), ref_old.log_prob(action).sum(-1))
    torch.testing.assert_close(D.entropy(old, False), ref_old.entropy().sum(-1))
    torch.testing.assert_close(D.kl(old, new, False), kl_divergence(ref_old, ref_new).sum(-1))
    noise = torch.randn(4, 6, 3)
    torch.testing.assert_close(D.sample(old, noise), old.dist + old.log_std.exp() * noise)
    assert torch.equal(D.mode(old), old.dist) and not D.is_discrete(old)


def test_categorical_matches_torch_distributions():
    old, new = categorical_out(4, 6), categorical_out(4, 6)
    action = torch.randint(0, 5, (4, 6))
    ref_old, ref_new = Categorical(logits=old.dist), Categorical(logits=new.dist)
    torch.testing.assert_close(D.log_prob(old, action, True), ref_old.log_prob(action))
    torch.testing.assert_close(D.entropy(old, True), ref_old.entropy())
    torch.testing.assert_close(D.kl(old, new, True), kl_divergence(ref_old, ref_new))
    assert torch.equal(D.mode(old), old.dist.argmax(-1)) and D.is_discrete(old)


def test_categorical_sample_follows_the_probabilities():
    out = categorical_out(1)
    draws = 20000
    many = PolicyOutput(out.dist.expand(draws, 5), out.log_std, out.value.expand(draws))
    noise = D.draw_noise(many, torch.Generator().manual_seed(0))
    assert noise.shape == (draws, 5) and 0 <= noise.min() and noise.max() < 1
    actions = D.sample(many, noise)
    assert torch.equal(actions, D.sample(many, noise))
    freq = torch.bincount(actions, minlength=5) / draws
    torch.testing.assert_close(freq, torch.softmax(out.dist[0], -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("discrete", [False, True])
def test_distributions_under_vmap(discrete):
    N = 3
    make = categorical_out if discrete else gaussian_out
    outs = [make(4) for _ in range(N)]
    stacked = PolicyOutput(*(torch.stack(f) for f in zip(*outs)))
    action = torch.randint(0, 5, (N, 4)) if discrete else torch.randn(N, 4, 3)
    noise = torch.rand(N, 4, 5) if discrete else torch.randn(N, 4, 3)

    def per_task(out, other, a, u):
        return D.log_prob(out, a, discrete), D.entropy(out, discrete), D.kl(out, other, discrete), D.sample(out, u), D.mode(out)

    other = PolicyOutput(*(torch.stack(f) for f in zip(*(make(4) for _ in range(N)))))
    batched = vmap(per_task)(stacked, other, action, noise)
    for i in range(N):
        ref = per_task(PolicyOutput(*(f[i] for f in stacked)), PolicyOutput(*(f[i] for f in other)), action[i], noise[i])
        for got, want in zip(batched, ref):
            torch.testing.assert_close(got[i], want)


def test_log_std_aligned_on_leading_dims():
    """log_std [A], [N, A] (per task) and expanded [N, M, A] against dist [N, M, A] give the same results."""
    N, M = 3, 4
    dist, log_std = torch.randn(N, M, 2), 0.3 * torch.randn(N, 2)
    per_task = PolicyOutput(dist, log_std, torch.zeros(N, M))
    expanded = PolicyOutput(dist, log_std.unsqueeze(1).expand(N, M, 2), torch.zeros(N, M))
    other = PolicyOutput(dist + 0.5, 0.1 * torch.randn(2), torch.zeros(N, M))
    action, noise = torch.randn(N, M, 2), torch.randn(N, M, 2)
    for a, b in ((per_task, expanded), (other, PolicyOutput(other.dist, other.log_std.expand(N, M, 2), other.value))):
        torch.testing.assert_close(D.log_prob(a, action, False), D.log_prob(b, action, False))
        torch.testing.assert_close(D.entropy(a, False), D.entropy(b, False))
        torch.testing.assert_close(D.sample(a, noise), D.sample(b, noise))
    torch.testing.assert_close(D.kl(per_task, other, False), D.kl(expanded, other, False))
    ref = Normal(dist, log_std.unsqueeze(1).exp())
    torch.testing.assert_close(D.log_prob(per_task, action, False), ref.log_prob(action).sum(-1))
    torch.testing.assert_close(D.entropy(per_task, False), ref.entropy().sum(-1))


def test_box_actions_are_rescaled_to_the_bounds_for_the_env():
    """With normalize_actions (default) the policy acts in [-1, 1]; env_action maps that onto [low, high], clipped."""
    box = spaces.Box(low=np.array([-0.1, 0.0], dtype=np.float32), high=np.array([0.1, 2.0], dtype=np.float32))
    obs_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
    policy = MLPPolicy(obs_space, box)
    action = torch.tensor([[-1.0, 1.0], [0.0, 0.0], [5.0, -3.0]])
    expected = torch.tensor([[-0.1, 2.0], [0.0, 1.0], [0.1, 0.0]])
    torch.testing.assert_close(policy.env_action(action), expected)
    raw = MLPPolicy(obs_space, box, MLPConfig(normalize_actions=False))
    assert torch.equal(raw.env_action(action), action)
    unbounded = MLPPolicy(obs_space, spaces.Box(-np.inf, np.inf, (2,), np.float32))
    assert not unbounded.normalize_actions and torch.equal(unbounded.env_action(action), action)

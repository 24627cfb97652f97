"""TransformerPolicy: sequence mode == cached step mode, causality and windows, per-task vmap, second-order MAML."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch.func import functional_call, grad, vmap

from metarl.agents.distributions import log_prob
from metarl.agents.policy import PolicyOutput, encode_prev_action
from metarl.agents.transformer import TransformerConfig, TransformerPolicy, attend

OBS = spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
ACTION_SPACES = {"box": spaces.Box(-1, 1, shape=(2,), dtype=np.float32), "discrete": spaces.Discrete(4)}
SMALL = dict(n_layers=2, d_model=16, n_heads=2, context=5)


def make_policy(action: str = "box", dtype: torch.dtype = torch.float32, **overrides) -> TransformerPolicy:
    """A small policy with O(1) random weights, so mismatches are not hidden by tiny outputs."""
    policy = TransformerPolicy(OBS, ACTION_SPACES[action], TransformerConfig(**{**SMALL, **overrides})).to(dtype)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0.0, 0.3)
    return policy


def make_inputs(policy: TransformerPolicy, B: int, T: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """obs [B, T, 3], prev_action [B, T, A], prev_reward [B, T], episode_start [B, T] with boundaries inside."""
    space = ACTION_SPACES["discrete" if policy.discrete else "box"]
    actions = torch.randint(0, 4, (B, T)) if policy.discrete else torch.randn(B, T, 2)
    prev_action = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], dim=1)
    episode_start = torch.zeros(B, T, dtype=torch.bool)
    episode_start[:, 0] = True
    episode_start[:, T // 3] = True
    episode_start[0, T // 2] = True
    return (torch.randn(B, T, 3, dtype=dtype), encode_prev_action(prev_action, space, dtype), torch.randn(B, T, dtype=dtype),
            episode_start)


def padded_trial(policy: TransformerPolicy, episode_len: int = 8) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Inputs [3, 2 * episode_len, ..] of a two-episode trial laid out like a rollout buffer, and valid [3, T].

    Row 0's first episode ends after 3 steps (padding in the middle of the trial, one padding step flagged as an
    episode start), row 1 starts with two padding steps, row 2's first episode ends after 6 steps and its second
    after 2.
    """
    B, T = 3, 2 * episode_len
    obs, prev_action, prev_reward, _ = make_inputs(policy, B, T)
    episode_start = torch.zeros(B, T, dtype=torch.bool)
    episode_start[:, [0, episode_len]] = True
    episode_start[0, 5] = True
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 3:episode_len] = False
    valid[1, :2] = False
    valid[2, 6:episode_len] = False
    valid[2, episode_len + 2:] = False
    return (obs, prev_action, prev_reward, episode_start), valid


def compacted(
    policy: TransformerPolicy, inputs: tuple[torch.Tensor, ...], valid: torch.Tensor, isolate: bool
) -> list[PolicyOutput]:
    """Ground truth per row: sequence mode on the row's valid steps alone (the padding cut out)."""
    rows = []
    for b in range(valid.shape[0]):
        keep = valid[b].nonzero().squeeze(-1)
        rows.append(policy(*(x[b : b + 1, keep] for x in inputs), isolate_episodes=isolate))
    return rows


def run_steps(
    policy: TransformerPolicy, inputs: tuple[torch.Tensor, ...], isolate: bool, valid: torch.Tensor | None = None,
    inplace: bool = False,
) -> PolicyOutput:
    """Loops step mode over T (``step_mask = valid[:, t]``); stacks the outputs to [B, T, ..]."""
    cache = policy.initial_cache(inputs[0].shape[0])
    outs = []
    for t in range(inputs[0].shape[1]):
        mask = None if valid is None else valid[:, t]
        out, new_cache = policy(*(x[:, t] for x in inputs), cache=cache, isolate_episodes=isolate, step_mask=mask,
                                inplace=inplace)
        assert (new_cache is cache) == inplace
        cache = new_cache
        outs.append(out)
    return stack_outputs(outs)


def stack_outputs(outs: list[PolicyOutput]) -> PolicyOutput:
    """Per-step outputs [B, ..] -> [B, T, ..]."""
    return PolicyOutput(*(torch.stack(fields, 1) for fields in zip(*outs)))


def assert_outputs_close(a: PolicyOutput, b: PolicyOutput, atol: float = 1e-5) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("action", ["box", "discrete"])
@pytest.mark.parametrize("T", [4, 13], ids=["shorter_than_context", "longer_than_context"])
@pytest.mark.parametrize("isolate", [False, True])
@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_sequence_equals_step(action, T, isolate, attention):
    policy = make_policy(action, attention=attention)
    inputs = make_inputs(policy, 3, T)
    with torch.no_grad():
        seq = policy(*inputs, isolate_episodes=isolate)
        assert seq.dist.shape == (3, T, policy.spec.action_dim) and seq.value.shape == (3, T)
        assert seq.dist.abs().max() > 0.1
        assert_outputs_close(seq, run_steps(policy, inputs, isolate))


@pytest.mark.parametrize("action", ["box", "discrete"])
@pytest.mark.parametrize("isolate", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_padding_step_mask_equals_valid(action, isolate, inplace):
    """A trial longer than the context with padding inside: step mode with step_mask == sequence mode with valid ==
    sequence mode on the valid steps alone."""
    policy = make_policy(action)
    inputs, valid = padded_trial(policy)
    with torch.no_grad():
        seq = policy(*inputs, isolate_episodes=isolate, valid=valid)
        steps = run_steps(policy, inputs, isolate, valid, inplace)
        for out in (seq, steps):
            assert all(torch.isfinite(f).all() for f in out)
        assert_outputs_close(PolicyOutput(*(f[valid] for f in seq)), PolicyOutput(*(f[valid] for f in steps)))
        for b, ref in enumerate(compacted(policy, inputs, valid, isolate)):
            assert_outputs_close(PolicyOutput(*(f[b, valid[b]] for f in seq)), PolicyOutput(*(f[0] for f in ref)))
        if not isolate:  # the padding would have mattered
            assert (policy(*inputs).dist[0, 8:] - seq.dist[0, 8:]).abs().max() > 1e-3


def test_inplace_step_updates_the_given_cache():
    policy = make_policy()
    inputs, valid = padded_trial(policy)
    cache, copied = policy.initial_cache(3), policy.initial_cache(3)
    tensors = dict(cache)
    with torch.no_grad():
        for t in range(6):
            step_inputs = tuple(x[:, t] for x in inputs)
            out, same = policy(*step_inputs, cache=cache, step_mask=valid[:, t], inplace=True)
            ref, copied = policy(*step_inputs, cache=copied, step_mask=valid[:, t])
            assert same is cache and all(cache[k] is v for k, v in tensors.items())
            assert_outputs_close(out, ref, atol=0)
            for k in cache:
                assert torch.equal(cache[k], copied[k]), k
    assert cache["step"].tolist() == [3, 4, 6]


@pytest.mark.parametrize("inplace", [False, True])
def test_masked_rows_look_ahead_and_leave_no_trace(inplace):
    """A row with step_mask False gets the output it would get if kept (a bootstrap step), and afterwards it acts as
    if that step never happened: a probe step from its cache equals one from a cache fed only its kept steps."""
    policy = make_policy(context=4)
    inputs, _ = padded_trial(policy)
    obs, prev_action, prev_reward, start = (x[:, 1] for x in inputs)
    probe = (obs, prev_action, prev_reward, torch.zeros_like(start))  # continues the episode: reads the history
    refs = [policy.initial_cache(1) for _ in range(3)]  # row b's cache fed only its kept steps

    def row(x, b):
        return x[b:b + 1]

    def copy(c):
        return {k: v.clone() for k, v in c.items()}

    with torch.no_grad():
        cache = policy.initial_cache(3)
        for t in range(6):  # the ring is full and wraps around at the masked steps
            step_inputs = tuple(x[:, t] for x in inputs)
            kept, _ = policy(*step_inputs, cache=copy(cache), isolate_episodes=True)
            mask = torch.tensor([False, True, t % 2 == 0])
            out, cache = policy(*step_inputs, cache=cache, isolate_episodes=True, step_mask=mask, inplace=inplace)
            assert_outputs_close(out, kept, atol=1e-6)
            for b in range(3):
                if mask[b]:
                    _, refs[b] = policy(*(row(x, b) for x in step_inputs), cache=refs[b], isolate_episodes=True)
                assert torch.equal(cache["step"][b:b + 1], refs[b]["step"]) and torch.equal(cache["valid"][b:b + 1],
                                                                                             refs[b]["valid"])
                got, _ = policy(*probe, cache=copy(cache), isolate_episodes=True)
                want, _ = policy(*(row(x, b) for x in probe), cache=copy(refs[b]), isolate_episodes=True)
                assert_outputs_close(PolicyOutput(*(f[b:b + 1] for f in got)), want, atol=1e-6)


def test_masked_step_mode_gradients_match_sequence_mode():
    """Differentiating through step mode with a step mask (out of place) gives sequence mode's gradients."""
    policy = make_policy(dtype=torch.float64)
    inputs, valid = padded_trial(policy, 4)
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    params = dict(policy.named_parameters())

    def total(out: PolicyOutput) -> torch.Tensor:
        return (out.value * valid).sum() + ((out.dist + out.log_std).sum(-1) * valid).sum()

    seq_grads = torch.autograd.grad(total(policy(*inputs, isolate_episodes=True, valid=valid)), list(params.values()))
    step_grads = torch.autograd.grad(total(run_steps(policy, inputs, True, valid)), list(params.values()))
    for name, a, b in zip(params, seq_grads, step_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.filterwarnings("error:There is a performance drop")  # no per-sample fallback under vmap
@pytest.mark.parametrize("action", ["box", "discrete"])
def test_vmap_inplace_step_equals_loop(action):
    """Per-task parameters under vmap with a batched cache updated in place == a loop over tasks without vmap."""
    policy = make_policy(action)
    N = 3
    params = stacked_params(policy, N)
    trials = [padded_trial(policy) for _ in range(N)]
    inputs = [torch.stack(xs) for xs in zip(*(t[0] for t in trials))]  # each [N, 3, T, ..]
    valid = torch.stack([t[1] for t in trials])  # [N, 3, T]
    kwargs = {"isolate_episodes": True}
    step_fn = vmap(lambda p, c, m, *x: functional_call(policy, p, x, {"cache": c, "step_mask": m, "inplace": True, **kwargs}))
    cache = {k: torch.stack([v] * N) for k, v in policy.initial_cache(3).items()}
    tensors = dict(cache)
    with torch.no_grad():
        outs = []
        for t in range(valid.shape[-1]):
            out, cache = step_fn(params, cache, valid[:, :, t], *(x[:, :, t] for x in inputs))
            outs.append(out)
        assert all(torch.equal(cache[k], v) for k, v in tensors.items())  # the writes reached the given tensors
        batched = stack_outputs([PolicyOutput(*(f.movedim(0, 1) for f in out)) for out in outs])  # [3, T, N, ..]
        for i in range(N):
            module_i = {k: v[i] for k, v in params.items()}
            loop_cache = policy.initial_cache(3)
            for t in range(valid.shape[-1]):
                ref, loop_cache = functional_call(policy, module_i, tuple(x[i, :, t] for x in inputs),
                                                  {"cache": loop_cache, "step_mask": valid[i, :, t], **kwargs})
                assert_outputs_close(PolicyOutput(*(f[:, t, i] for f in batched)), ref)
            for k in loop_cache:
                torch.testing.assert_close(tensors[k][i], loop_cache[k], atol=1e-5, rtol=0)


def test_mask_arguments_are_checked():
    policy = make_policy()
    inputs, valid = padded_trial(policy)
    step_inputs = tuple(x[:, 0] for x in inputs)
    with pytest.raises(ValueError, match=r"valid has shape \(3, 15\), expected \(3, 16\)"):
        policy(*inputs, valid=valid[:, 1:])
    with pytest.raises(TypeError, match="valid must be torch.bool"):
        policy(*inputs, valid=valid.float())
    with pytest.raises(ValueError, match=r"step_mask has shape \(3, 16\), expected \(3,\)"):
        policy(*step_inputs, cache=policy.initial_cache(3), step_mask=valid)
    with pytest.raises(ValueError, match="in step mode pass step_mask"):
        policy(*step_inputs, cache=policy.initial_cache(3), valid=valid)
    with pytest.raises(ValueError, match="need step mode"):
        policy(*inputs, inplace=True)


@pytest.mark.parametrize("action", ["box", "discrete"])
def test_attention_settings_agree(action):
    math_policy = make_policy(action, attention="math")
    sdpa_policy = make_policy(action, attention="sdpa")
    sdpa_policy.load_state_dict(math_policy.state_dict())
    inputs, valid = padded_trial(math_policy, 7)
    with torch.no_grad():
        for isolate in (False, True):
            assert_outputs_close(math_policy(*inputs, isolate_episodes=isolate), sdpa_policy(*inputs, isolate_episodes=isolate))
            math_out = math_policy(*inputs, isolate_episodes=isolate, valid=valid)
            sdpa_out = sdpa_policy(*inputs, isolate_episodes=isolate, valid=valid)
            assert_outputs_close(*(PolicyOutput(*(f[valid] for f in out)) for out in (math_out, sdpa_out)))


def test_cache_is_not_modified():
    policy = make_policy()
    inputs = make_inputs(policy, 2, 1)
    cache = policy.initial_cache(2)
    before = {k: v.clone() for k, v in cache.items()}
    _, new_cache = policy(*(x[:, 0] for x in inputs), cache=cache)
    for k in cache:
        assert torch.equal(cache[k], before[k]), k
    assert new_cache["step"].tolist() == [1, 1] and new_cache["valid"][:, 0].all()


def perturb_step(inputs: tuple[torch.Tensor, ...], t: int) -> tuple[torch.Tensor, ...]:
    obs, prev_action, prev_reward, episode_start = (x.clone() for x in inputs)
    obs[:, t] += 1.0
    prev_reward[:, t] -= 2.0
    return obs, prev_action, prev_reward, episode_start


@pytest.mark.parametrize("isolate", [False, True])
def test_causal(isolate):
    policy = make_policy(context=50)
    inputs = make_inputs(policy, 2, 12)
    t = 6
    with torch.no_grad():
        base = policy(*inputs, isolate_episodes=isolate)
        changed = policy(*perturb_step(inputs, t), isolate_episodes=isolate)
    torch.testing.assert_close(changed.dist[:, :t], base.dist[:, :t], atol=0, rtol=0)
    torch.testing.assert_close(changed.value[:, :t], base.value[:, :t], atol=0, rtol=0)
    assert (changed.dist[:, t] - base.dist[:, t]).abs().max() > 1e-3


def test_sliding_window_and_episode_isolation():
    """One layer: step i sees only steps (i - context, i]; isolated, only steps of its own episode."""
    policy = make_policy(n_layers=1, context=4)
    inputs = make_inputs(policy, 2, 10)  # episodes start at 0 and 3 (row 0 also at 5)
    with torch.no_grad():
        base = policy(*inputs)
        changed = policy(*perturb_step(inputs, 1))
        assert (changed.dist[:, 4] - base.dist[:, 4]).abs().max() > 1e-3  # 4 - 1 < context
        torch.testing.assert_close(changed.dist[:, 5:], base.dist[:, 5:], atol=0, rtol=0)
        iso_base = policy(*inputs, isolate_episodes=True)
        iso_changed = policy(*perturb_step(inputs, 1), isolate_episodes=True)
        torch.testing.assert_close(iso_changed.dist[:, 3:], iso_base.dist[:, 3:], atol=0, rtol=0)


def test_fully_masked_rows_are_finite():
    q = torch.randn(2, 2, 3, 4)
    for impl in ("math", "sdpa"):
        y = attend(q, q, q, torch.zeros(1, 1, 3, 3, dtype=torch.bool), impl)
        assert torch.isfinite(y).all(), impl


def stacked_params(policy: TransformerPolicy, n: int) -> dict[str, torch.Tensor]:
    """n perturbed copies of the parameters, stacked on a leading dim."""
    return {k: torch.stack([v.detach() + 0.1 * i * torch.randn_like(v) for i in range(n)]) for k, v in policy.named_parameters()}


@pytest.mark.parametrize("action", ["box", "discrete"])
def test_vmap_over_task_parameters(action):
    policy = make_policy(action)
    N, B, T = 3, 2, 8
    params = stacked_params(policy, N)
    inputs = [torch.stack(xs) for xs in zip(*(make_inputs(policy, B, T) for _ in range(N)))]  # each [N, B, T, ..]

    kwargs = {"isolate_episodes": True}
    with torch.no_grad():
        refs = [functional_call(policy, {k: v[i] for k, v in params.items()}, tuple(x[i] for x in inputs), kwargs)
                for i in range(N)]
        seq = vmap(lambda p, *x: functional_call(policy, p, x, kwargs))(params, *inputs)
        for i in range(N):
            assert_outputs_close(PolicyOutput(*(f[i] for f in seq)), refs[i])

        step_fn = vmap(lambda p, c, *x: functional_call(policy, p, x, {"cache": c, **kwargs}))
        cache = {k: torch.stack([v] * N) for k, v in policy.initial_cache(B).items()}
        for t in range(T):
            out, cache = step_fn(params, cache, *(x[:, :, t] for x in inputs))
            assert cache["step"].shape == (N, B)
            assert out.log_std.shape[:2] == (N, B)
            for i in range(N):
                assert_outputs_close(PolicyOutput(*(f[i] for f in out)), PolicyOutput(*(f[:, t] for f in refs[i])))


def maml_losses(policy: TransformerPolicy, action: str, alpha: float):
    """A policy-gradient + value inner loss and the MAML meta-loss L(theta - alpha * grad L_support(theta); query)."""
    discrete = action == "discrete"
    support, query = (make_inputs(policy, 2, 7, torch.float64) for _ in range(2))
    act_s, act_q = ((torch.randint(0, 4, (2, 7)) if discrete else torch.randn(2, 7, 2, dtype=torch.float64)) for _ in range(2))
    adv_s, adv_q = torch.randn(2, 7, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)

    def loss(params, inputs, actions, adv):
        out = functional_call(policy, params, inputs, {"isolate_episodes": False})
        return -(log_prob(out, actions, discrete) * adv).mean() + 0.5 * (out.value - adv).square().mean()

    def meta_loss(params):
        g = grad(loss)(params, support, act_s, adv_s)
        return loss({k: params[k] - alpha * g[k] for k in params}, query, act_q, adv_q)

    def meta_grad_autograd(params):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        inner = loss(leaves, support, act_s, adv_s)
        gs = torch.autograd.grad(inner, list(leaves.values()), create_graph=True)
        adapted = {k: leaves[k] - alpha * g for k, g in zip(leaves, gs)}
        outer = loss(adapted, query, act_q, adv_q)
        return dict(zip(leaves, torch.autograd.grad(outer, list(leaves.values()))))

    def first_order_grad(params):
        g = grad(loss)(params, support, act_s, adv_s)
        return grad(loss)({k: params[k] - alpha * g[k] for k in params}, query, act_q, adv_q)

    return meta_loss, meta_grad_autograd, first_order_grad


@pytest.mark.parametrize("action", ["box", "discrete"])
def test_second_order_maml(action):
    policy = make_policy(action, torch.float64, n_layers=1, d_model=8, n_heads=2, context=4, attention="math")
    params = {k: v.detach() for k, v in policy.named_parameters()}
    meta_loss, meta_grad_autograd, first_order_grad = maml_losses(policy, action, alpha=0.5)

    g_func = grad(meta_loss)(params)
    g_auto = meta_grad_autograd(params)
    for k in params:
        torch.testing.assert_close(g_func[k], g_auto[k], atol=1e-5, rtol=0)

    direction = {k: torch.randn_like(v) for k, v in params.items()}
    eps = 1e-5
    plus = meta_loss({k: v + eps * direction[k] for k, v in params.items()})
    minus = meta_loss({k: v - eps * direction[k] for k, v in params.items()})
    finite_diff = (plus - minus) / (2 * eps)
    analytic = sum((g_func[k] * direction[k]).sum() for k in params)
    first_order = sum((g * direction[k]).sum() for k, g in first_order_grad(params).items())
    assert abs(finite_diff - analytic) < 1e-6 * max(1.0, abs(analytic))
    assert abs(first_order - analytic) > 1e-3  # the test would notice a detached second-order term


def test_wrong_obs_shape_is_named():
    policy = make_policy()
    obs, prev_action, prev_reward, episode_start = make_inputs(policy, 2, 5)
    with pytest.raises(ValueError, match=r"obs has shape \(2, 5, 4\), expected \[B, T, 3\]"):
        policy(torch.zeros(2, 5, 4), prev_action, prev_reward, episode_start)
    with pytest.raises(ValueError, match=r"obs has shape \(2, 5, 3\), expected \[B, 3\] \(step mode\)"):
        policy(obs, prev_action, prev_reward, episode_start, cache=policy.initial_cache(2))
    with pytest.raises(ValueError, match=r"prev_action has shape \(2, 5, 3\), expected \(2, 5, 2\)"):
        policy(obs, torch.zeros(2, 5, 3), prev_reward, episode_start)
    with pytest.raises(TypeError, match="episode_start must be torch.bool"):
        policy(obs, prev_action, prev_reward, episode_start.float())


def test_bad_config_and_spaces():
    with pytest.raises(ValueError, match="d_model=30.*n_heads=4"):
        TransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="'flash'"):
        TransformerConfig(attention="flash")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="MultiDiscrete"):
        TransformerPolicy(OBS, spaces.MultiDiscrete([2, 3]))
    with pytest.raises(TypeError, match="observation space.*Box\\(0.0, 1.0, \\(2, 2\\)"):
        TransformerPolicy(spaces.Box(0, 1, (2, 2)), ACTION_SPACES["box"])


@pytest.mark.parametrize("isolate", [False, True])
def test_cache_with_a_capacity_below_the_context_gives_sequence_mode(isolate):
    policy = make_policy(context=12)
    B, T = 3, 8
    inputs = make_inputs(policy, B, T)
    valid = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) > 0.2
    with torch.no_grad():
        cache = policy.initial_cache(B, capacity=T)  # the whole trial fits: 8 slots instead of 12
        assert cache["k0"].shape[2] == T and cache["valid"].shape == (B, T)
        outs = []
        for t in range(T):  # history_bound t + 1: attention reads the first t + 1 slots, or all once that is >= 40%
            out, cache = policy(*(x[:, t] for x in inputs), cache=cache, isolate_episodes=isolate,
                                step_mask=valid[:, t], inplace=True, history_bound=t + 1)
            outs.append(out)
        steps = stack_outputs(outs)
        full = run_steps(policy, inputs, isolate, valid)  # a cache of `context` slots, no bound
    for row, expected in enumerate(compacted(policy, inputs, valid, isolate)):
        assert_outputs_close(PolicyOutput(*(f[row, valid[row]] for f in steps)), PolicyOutput(*(f[0] for f in expected)))
    assert_outputs_close(PolicyOutput(*(f[valid] for f in steps)), PolicyOutput(*(f[valid] for f in full)))
    assert policy.initial_cache(2, capacity=50)["valid"].shape == (2, 12)  # never more than the context


def test_cache_capacity_errors():
    policy = make_policy(context=12)
    inputs = make_inputs(policy, 2, 1)
    step_inputs = tuple(x[:, 0] for x in inputs)
    small = policy.initial_cache(2, capacity=4)
    with pytest.raises(ValueError, match=r"the cache holds 4 steps .*history_bound <= 4, got None"):
        policy(*step_inputs, cache=small)
    with pytest.raises(ValueError, match="history_bound <= 4, got 5"):
        policy(*step_inputs, cache=small, history_bound=5)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        policy.initial_cache(2, capacity=0)
    with pytest.raises(ValueError, match=r"expected \(2, C\) with 1 <= C <= context=12"):
        policy(*step_inputs, cache={**small, "valid": torch.zeros(2, 13, dtype=torch.bool)})

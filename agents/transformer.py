"""A causal Transformer policy over trial histories, with a sliding window and a key/value cache for rollouts.

Each step's token (observation, previous action, previous reward, episode-start flag) is embedded linearly and
passed through pre-LayerNorm blocks; the last hidden state feeds the action and value heads. Positions enter only
through rotary embeddings (RoPE) on queries and keys, at the step's index within the trial counting valid steps
only, so attention depends on relative positions and the ring-buffer cache of step mode gives exactly the sliding
window of sequence mode. Padding (``valid`` False in sequence mode, ``step_mask`` False in step mode) is skipped:
it is never attended to, takes no position and does not count toward the window.

Second-order MAML needs ``attention="math"``: PyTorch's fused ``scaled_dot_product_attention`` kernels have no
double backward (pytorch#116350). ``"sdpa"`` is for first-order training. On CPU, ``"sdpa"`` under
``torch.func.vmap`` falls back to a slow per-sample loop; use ``"math"`` for per-task parameters there. Step mode
(one query) always uses an explicit matrix-vector form over the cached keys, whatever ``attention`` says.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal, overload

import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor, nn

from .policy import HistoryPolicy, PolicyHead, PolicyOutput, check_inputs, check_mask, check_mode_kwargs, make_token

Cache = dict[str, Tensor]
Store = Callable[[Tensor, Tensor], Tensor]
"""Writes one step's keys or values ``(B, nh, hs)`` into a ``(B, nh, C, hs)`` ring buffer; returns the buffer."""


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and attention settings of `TransformerPolicy`."""

    n_layers: int = 2
    """Number of Transformer blocks."""
    d_model: int = 64
    """Width of the hidden state (token embedding, attention, residual stream)."""
    n_heads: int = 4
    """Attention heads; d_model / n_heads must be an even integer (rotary embeddings rotate pairs)."""
    d_ff: int | None = None
    """Hidden width of each block's feed-forward layer; None means 4 * d_model."""
    context: int = 64
    """Sliding attention window in steps: step i attends to steps (i - context, i]."""
    attention: Literal["math", "sdpa"] = "math"
    """"math": explicit softmax(QK^T / sqrt(d) + mask) V, twice differentiable (second-order MAML).
    "sdpa": torch.nn.functional.scaled_dot_product_attention, faster, no double backward."""
    init_log_std: float = 0.0
    """Initial log standard deviation of the Gaussian policy (Box actions)."""
    normalize_actions: bool = True
    """Box actions with finite bounds: act in [-1, 1] and rescale linearly to [low, high] for the environment."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies: pair k of a head rotates by position * rope_base^(-2k / head_dim)."""

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.d_model < 1 or self.n_heads < 1 or self.context < 1:
            raise ValueError(
                f"n_layers, d_model, n_heads, context must be >= 1, got n_layers={self.n_layers}, "
                f"d_model={self.d_model}, n_heads={self.n_heads}, context={self.context}"
            )
        if self.d_model % self.n_heads != 0 or (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} into an even head size "
                "(rotary embeddings rotate pairs)"
            )
        if self.attention not in ("math", "sdpa"):
            raise ValueError(f"attention must be 'math' or 'sdpa', got {self.attention!r}")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff must be >= 1 or None, got {self.d_ff}")

    @property
    def ff_width(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff


def rope_tables(pos: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency: positions ``[..]`` int64 -> ``[.., head_dim / 2]`` each."""
    angle = pos.to(dtype).unsqueeze(-1) * inv_freq.to(dtype)  # (.., hs/2)
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the pairs (x[k], x[k + hs/2]) of ``x [.., hs]`` by the angles behind cos, sin ``[.., hs/2]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, impl: str) -> Tensor:
    """Masked attention: q ``(B, nh, Tq, hs)``, k/v ``(B, nh, Tk, hs)``, allowed bool broadcastable to ``(B, nh, Tq, Tk)``.

    Disallowed scores are set to the dtype's most negative finite value, so a fully masked row gives uniform
    weights, never NaN.
    """
    lowest = torch.finfo(q.dtype).min
    if impl == "sdpa":
        bias = torch.where(allowed, q.new_zeros(()), q.new_full((), lowest))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, Tq, Tk)
    scores = torch.where(allowed, scores, q.new_full((), lowest))
    return torch.softmax(scores, dim=-1) @ v  # (B, nh, Tq, hs)


def step_bias(allowed: Tensor, n_heads: int, dtype: torch.dtype) -> Tensor:
    """Additive attention bias of step mode: allowed ``(B, C)`` bool -> ``(B * nh, 1, C)``, 0 where allowed, else
    half the dtype's lowest value (finite after adding any score)."""
    bias = (~allowed).to(dtype) * (torch.finfo(dtype).min / 2)  # (B, C)
    return bias.unsqueeze(1).expand(-1, n_heads, -1).reshape(-1, 1, allowed.shape[-1])


def attend_one(q: Tensor, k_cache: Tensor, v_cache: Tensor, bias: Tensor) -> Tensor:
    """One query per row over the cache: q ``(B, nh, hs)``, caches ``(B, nh, C, hs)``, bias ``(B * nh, 1, C)`` from
    `step_bias` -> ``(B, nh, hs)``. A fully masked row gives uniform weights, never NaN."""
    B, nh, C, hs = k_cache.shape
    q = q.reshape(B * nh, 1, hs) * (1.0 / math.sqrt(hs))
    scores = torch.baddbmm(bias, q, k_cache.reshape(B * nh, C, hs).transpose(1, 2))  # (B * nh, 1, C)
    y = torch.bmm(torch.softmax(scores, dim=-1), v_cache.reshape(B * nh, C, hs))  # (B * nh, 1, hs)
    return y.view(B, nh, hs)


def ring_slots(slot: Tensor, n_heads: int, context: int) -> Tensor:
    """Flat row indices ``(B * nh,)`` of ring slot ``slot (B,)`` in a ``(B, nh, C, hs)`` buffer viewed as ``(B * nh * C, hs)``."""
    heads = torch.arange(n_heads, device=slot.device)  # (nh,)
    rows = torch.arange(slot.shape[0], device=slot.device).unsqueeze(-1)  # (B, 1)
    return ((rows * n_heads + heads) * context + slot.unsqueeze(-1)).reshape(-1)  # (B * nh,)


def ring_write(buffer: Tensor, value: Tensor, at: Tensor, inplace: bool) -> Tensor:
    """Puts ``value (B, nh, hs)`` at the ring slots `at` (from `ring_slots`) of ``buffer (B, nh, C, hs)``, in place
    (through a view: raises rather than writing into a copy) or on a copy. ``index_put_`` has a batching rule under
    ``torch.func.vmap``."""
    hs = buffer.shape[-1]
    rows = value.reshape(-1, hs)  # (B * nh, hs)
    if inplace:
        buffer.view(-1, hs).index_put_((at,), rows)
        return buffer
    return buffer.reshape(-1, hs).index_put((at,), rows).view(buffer.shape)


def step_positions(episode_start: Tensor, valid: Tensor | None) -> Tensor:
    """Each step's position in the trial counting valid steps only, ``(1 or B, T)`` int64.

    A padding step gets the position of the last valid step before it (-1 before any).
    """
    if valid is None:
        return torch.arange(episode_start.shape[-1], device=episode_start.device).unsqueeze(0)  # (1, T)
    return torch.cumsum(valid.long(), dim=-1) - 1  # (B, T)


def sequence_mask(episode_start: Tensor, context: int, isolate_episodes: bool, valid: Tensor | None = None) -> Tensor:
    """Which steps each step attends to, ``(B or 1, 1, T, T)`` bool.

    Step i attends to the valid steps j with position in (pos_i - context, pos_i], positions counting valid steps
    only (see `step_positions`); with `isolate_episodes`, only to those of its own episode. Episodes begin at the
    valid steps whose ``episode_start`` is True.
    """
    pos = step_positions(episode_start, valid)  # (1 or B, T)
    gap = pos.unsqueeze(2) - pos.unsqueeze(1)  # (1 or B, T, T): query i minus key j
    allowed = (gap >= 0) & (gap < context)
    if valid is not None:
        allowed = allowed & valid.unsqueeze(1)
    if isolate_episodes:
        starts = episode_start if valid is None else episode_start & valid
        segment = torch.cumsum(starts.long(), dim=-1)  # (B, T)
        allowed = allowed & (segment.unsqueeze(2) == segment.unsqueeze(1))  # (B, T, T)
    return allowed.unsqueeze(1)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions; sequence and cached single-step forms."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.impl = config.attention
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def _heads(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x ``(.., d)`` -> rotated q, rotated k, v, each ``(.., nh, hs)``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = x.shape[:-1] + (self.n_heads, -1)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)  # (.., nh, hs)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (.., 1, hs/2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor) -> Tensor:
        """x ``(B, T, d)``, cos/sin ``(T or B, T, hs/2)``, allowed ``(B or 1, 1, T, T)`` -> ``(B, T, d)``."""
        q, k, v = (t.transpose(1, 2) for t in self._heads(x, cos, sin))  # (B, nh, T, hs)
        y = attend(q, k, v, allowed, self.impl)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(x.shape))

    def step(
        self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, store: Store, bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step: x ``(B, d)``, cos/sin ``(B, hs/2)``, caches ``(B, nh, C, hs)``, `store` writes this step's key
        and value into a cache (every row), bias ``(B * nh, 1, S)`` (`step_bias` of the slots to attend to after the
        write; only the first S <= C slots are read). Returns y ``(B, d)`` and the written k, v caches."""
        q, k, v = self._heads(x, cos, sin)  # (B, nh, hs)
        k_cache, v_cache = store(k_cache, k), store(v_cache, v)  # (B, nh, C, hs)
        span = bias.shape[-1]
        y = attend_one(q, k_cache[:, :, :span], v_cache[:, :, :span], bias)  # (B, nh, hs)
        return self.proj(y.reshape(x.shape)), k_cache, v_cache


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.ff_width), nn.GELU(), nn.Linear(config.ff_width, config.d_model)
        )

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor) -> Tensor:
        """Sequence mode: x ``(B, T, d)`` -> ``(B, T, d)``."""
        x = x + self.attn(self.ln_1(x), cos, sin, allowed)
        return x + self.mlp(self.ln_2(x))

    def step(
        self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, store: Store, bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Step mode: x ``(B, d)`` -> ``(B, d)`` and this block's written k, v caches."""
        y, k_cache, v_cache = self.attn.step(self.ln_1(x), cos, sin, k_cache, v_cache, store, bias)
        x = x + y
        return x + self.mlp(self.ln_2(x)), k_cache, v_cache


class TransformerPolicy(HistoryPolicy):
    """Causal Transformer policy; ``forward`` runs sequence mode (``cache=None``) or one cached step.

    Sequence mode: ``obs [B, T, D]``, ``prev_action [B, T, A]``, ``prev_reward [B, T]``, ``episode_start [B, T]``
    -> PolicyOutput with ``dist [B, T, A]``, ``value [B, T]``. The sequence starts at the first step of a trial.
    ``valid [B, T]`` bool (default all True) marks padding: invalid steps are never attended to and take no
    position; the outputs there are finite but meaningless.

    Step mode: the same inputs without T and ``cache`` from `initial_cache` or the previous step -> (PolicyOutput
    with ``dist [B, A]``, ``value [B]``; the new cache). ``step_mask [B]`` bool (default all True): rows with False
    do not record their step (their next step attends to what it would have attended to without it; the ring slot
    it passed through may hold its keys until then), so stepping with ``step_mask=m[:, t]`` gives sequence mode with ``valid=m``;
    their outputs are those the step would have if it were kept (a look-ahead, e.g. a bootstrap value). By
    default the given cache is never modified; with ``inplace=True`` (rollouts under ``torch.no_grad``, also
    under ``torch.func.vmap`` with a batched cache) its tensors are updated in place and the same dict is
    returned, which skips copying the whole cache each step.

    ``history_bound`` (step mode): an upper bound on the steps any row will have written after this one (its
    ``cache["step"] + 1``). Until the ring buffer wraps, only the first ``history_bound`` slots can hold steps, so
    attention reads only those; the outputs are the same. A rollout knows it from the step count of the trial.

    With ``isolate_episodes=True`` a step attends only to steps of its own episode (in step mode, a kept step whose
    ``episode_start`` is True clears its row's cache first).
    """

    inv_freq: Tensor

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, config: TransformerConfig | None = None
    ):
        config = config or TransformerConfig()
        super().__init__(observation_space, action_space, config.normalize_actions)
        self.config = config
        cfg = self.config
        head_dim = cfg.d_model // cfg.n_heads
        self.embed = nn.Linear(self.spec.token_dim, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = PolicyHead(self.spec, cfg.d_model, cfg.d_model, cfg.init_log_std)
        inv_freq = cfg.rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hs/2,)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.startswith("head."):
                continue
            if p.dim() == 2:
                scaled = name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight")
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layers) if scaled else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def initial_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        capacity: int | None = None,
    ) -> Cache:
        """An empty cache for `batch_size` rows (C = min(context, capacity), nh = n_heads, hs = d_model / n_heads).

        ``k{i}``, ``v{i}``: ``(B, nh, C, hs)`` ring buffers of layer i's rotated keys and values (the step at
        position s at slot s % C); ``valid``: ``(B, C)`` bool, slots a step may attend to; ``step``: ``(B,)``
        int64, the number of steps written so far (the next valid step's position within the trial).

        `capacity`: the most steps a row will ever write (e.g. a rollout's trial length). Below the context it
        makes a smaller cache, which every step must then be told about with ``history_bound <= capacity``;
        attention over a cache it fills reads less memory.
        """
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 (or None for the context), got {capacity}")
        ref = self.embed.weight
        device = ref.device if device is None else torch.device(device)
        dtype = ref.dtype if dtype is None else dtype
        cfg = self.config
        slots = cfg.context if capacity is None else min(cfg.context, capacity)
        kv_shape = (batch_size, cfg.n_heads, slots, cfg.d_model // cfg.n_heads)
        cache = {}
        for i in range(cfg.n_layers):
            cache[f"k{i}"] = torch.zeros(kv_shape, device=device, dtype=dtype)
            cache[f"v{i}"] = torch.zeros(kv_shape, device=device, dtype=dtype)
        cache["valid"] = torch.zeros(batch_size, slots, device=device, dtype=torch.bool)
        cache["step"] = torch.zeros(batch_size, device=device, dtype=torch.long)
        return cache

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
        """Sequence mode when `cache` is None, else one step with the cache (see the class docstring)."""
        step = cache is not None
        check_inputs(self.spec, obs, prev_action, prev_reward, episode_start, step=step)
        check_mode_kwargs(step, valid, step_mask, inplace, history_bound)
        check_mask(step_mask if step else valid, tuple(episode_start.shape), "step_mask" if step else "valid")
        x = self.embed(make_token(obs, prev_action, prev_reward, episode_start, self.embed.weight.dtype))
        if cache is None:
            return self._sequence(x, episode_start, isolate_episodes, valid)
        return self._step(x, episode_start, cache, isolate_episodes, step_mask, inplace, history_bound)

    def _sequence(self, x: Tensor, episode_start: Tensor, isolate_episodes: bool, valid: Tensor | None) -> PolicyOutput:
        """x ``(B, T, d)`` -> outputs ``[B, T, ..]``."""
        pos = step_positions(episode_start, valid).clamp_min(0)  # (1 or B, T)
        cos, sin = rope_tables(pos.squeeze(0) if valid is None else pos, self.inv_freq, x.dtype)  # (T or B, T, hs/2)
        allowed = sequence_mask(episode_start, self.config.context, isolate_episodes, valid)  # (B or 1, 1, T, T)
        for block in self.blocks:
            x = block(x, cos, sin, allowed)
        x = self.ln_f(x)
        return self.head(x, x)

    def _step(
        self, x: Tensor, episode_start: Tensor, cache: Cache, isolate_episodes: bool, step_mask: Tensor | None,
        inplace: bool, history_bound: int | None,
    ) -> tuple[PolicyOutput, Cache]:
        """x ``(B, d)`` -> outputs ``[B, ..]`` and the cache after this step (the same dict when `inplace`)."""
        shape = tuple(cache["valid"].shape)
        if len(shape) != 2 or shape[0] != x.shape[0] or not 1 <= shape[1] <= self.config.context:
            raise ValueError(f"cache['valid'] has shape {shape}, expected ({x.shape[0]}, C) with 1 <= C <= context="
                             f"{self.config.context} (batch, cache slots)")
        context = shape[1]  # the ring's slots: the context, or a smaller capacity that the whole history fits in
        if context < self.config.context and (history_bound is None or history_bound > context):
            raise ValueError(f"the cache holds {context} steps (made with capacity {context} < context "
                             f"{self.config.context}): each step needs history_bound <= {context}, got {history_bound}")
        span = context if history_bound is None else min(context, history_bound)  # slots that can hold a step
        if 5 * span >= 2 * context:
            span = context  # reading every slot (unused ones masked) keeps the attention operands contiguous
        step = cache["step"]  # (B,)
        cos, sin = rope_tables(step, self.inv_freq, x.dtype)  # (B, hs/2)
        slot = step % context  # (B,)
        at = ring_slots(slot, self.config.n_heads, context)  # (B * nh,)
        at_slot = torch.arange(context, device=x.device) == slot.unsqueeze(-1)  # (B, C)
        valid = cache["valid"]  # (B, C)
        if isolate_episodes:
            valid = valid & ~episode_start.unsqueeze(-1)
        valid = valid | at_slot  # (B, C): the slots to attend to once this step is written
        bias = step_bias(valid[:, :span], self.config.n_heads, x.dtype)  # (B * nh, 1, S)
        put = partial(ring_write, at=at, inplace=inplace)
        new_cache = cache if inplace else {}
        for i, block in enumerate(self.blocks):
            # every row writes its slot; a masked row does not advance, so its next step overwrites that slot before
            # anything reads it, and the entry it replaced (position step - C) is outside every later window
            x, new_cache[f"k{i}"], new_cache[f"v{i}"] = block.step(x, cos, sin, cache[f"k{i}"], cache[f"v{i}"], put, bias)
        if step_mask is not None:
            valid = torch.where(step_mask.unsqueeze(-1), valid, cache["valid"])
        advanced = step + (1 if step_mask is None else step_mask.long())  # (B,)
        if inplace:
            cache["valid"].copy_(valid)
            cache["step"].copy_(advanced)
        else:
            new_cache["valid"], new_cache["step"] = valid, advanced
        x = self.ln_f(x)
        return self.head(x, x), new_cache

"""A causal Transformer policy over trial histories, with a sliding window and a key/value cache for rollouts.

Each step's token (observation, previous action, previous reward, episode-start flag) is embedded linearly and
passed through pre-LayerNorm blocks; the last hidden state feeds the action and value heads. Positions enter only
through rotary embeddings (RoPE) on queries and keys, at the absolute step index within the trial, so attention
depends on relative positions and the ring-buffer cache of step mode gives exactly the sliding window of
sequence mode.

Second-order MAML needs ``attention="math"``: PyTorch's fused ``scaled_dot_product_attention`` kernels have no
double backward (pytorch#116350). ``"sdpa"`` is for rollouts and first-order training. On CPU, ``"sdpa"`` under
``torch.func.vmap`` falls back to a slow per-sample loop; use ``"math"`` for per-task parameters there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor, nn

from .policy import PolicyHead, PolicyOutput, SpaceSpec, check_inputs, make_token

Cache = dict[str, Tensor]


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


def sequence_mask(episode_start: Tensor, context: int, isolate_episodes: bool) -> Tensor:
    """Which steps each step attends to, ``(B or 1, 1, T, T)`` bool.

    Step i attends to steps (i - context, i]; with `isolate_episodes`, only to those of its own episode.
    """
    T = episode_start.shape[-1]
    i = torch.arange(T, device=episode_start.device)
    gap = i.unsqueeze(1) - i.unsqueeze(0)  # (T, T): query i minus key j
    allowed = ((gap >= 0) & (gap < context)).unsqueeze(0)  # (1, T, T)
    if isolate_episodes:
        segment = torch.cumsum(episode_start.long(), dim=-1)  # (B, T)
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
        """x ``(B, T, d)``, cos/sin ``(T, hs/2)``, allowed ``(B or 1, 1, T, T)`` -> ``(B, T, d)``."""
        q, k, v = (t.transpose(1, 2) for t in self._heads(x, cos, sin))  # (B, nh, T, hs)
        y = attend(q, k, v, allowed, self.impl)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(x.shape))

    def step(
        self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slot: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step: x ``(B, d)``, cos/sin ``(B, hs/2)``, caches ``(B, nh, C, hs)``, slot ``(B,)`` int64 (ring index
        to write), valid ``(B, C)`` bool (after the write). Returns y ``(B, d)`` and the new k, v caches."""
        q, k, v = self._heads(x, cos, sin)  # (B, nh, hs)
        index = slot.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[2])  # (B, nh, 1, hs)
        k_cache = torch.scatter(k_cache, 2, index, k.unsqueeze(2))  # (B, nh, C, hs)
        v_cache = torch.scatter(v_cache, 2, index, v.unsqueeze(2))
        y = attend(q.unsqueeze(2), k_cache, v_cache, valid[:, None, None, :], self.impl)  # (B, nh, 1, hs)
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
        self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slot: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Step mode: x ``(B, d)`` -> ``(B, d)`` and this block's new k, v caches."""
        y, k_cache, v_cache = self.attn.step(self.ln_1(x), cos, sin, k_cache, v_cache, slot, valid)
        x = x + y
        return x + self.mlp(self.ln_2(x)), k_cache, v_cache


class TransformerPolicy(nn.Module):
    """Causal Transformer policy; ``forward`` runs sequence mode (``cache=None``) or one cached step.

    Sequence mode: ``obs [B, T, D]``, ``prev_action [B, T, A]``, ``prev_reward [B, T]``, ``episode_start [B, T]``
    -> PolicyOutput with ``dist [B, T, A]``, ``value [B, T]``. The sequence starts at the first step of a trial.

    Step mode: the same inputs without T and ``cache`` from `initial_cache` or the previous step -> (PolicyOutput
    with ``dist [B, A]``, ``value [B]``; the new cache). The given cache is never modified.

    With ``isolate_episodes=True`` a step attends only to steps of its own episode (in step mode, a row whose
    ``episode_start`` is True forgets its cache first).
    """

    inv_freq: Tensor

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, config: TransformerConfig | None = None
    ):
        super().__init__()
        self.config = config or TransformerConfig()
        self.spec = SpaceSpec.from_spaces(observation_space, action_space)
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

    @property
    def discrete(self) -> bool:
        return self.spec.discrete

    def initial_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Cache:
        """An empty cache for `batch_size` rows (C = context, nh = n_heads, hs = d_model / n_heads).

        ``k{i}``, ``v{i}``: ``(B, nh, C, hs)`` ring buffers of layer i's rotated keys and values (step s at slot
        s % C); ``valid``: ``(B, C)`` bool, slots a step may attend to; ``step``: ``(B,)`` int64, the next step's
        index within the trial.
        """
        ref = self.embed.weight
        device = ref.device if device is None else torch.device(device)
        dtype = ref.dtype if dtype is None else dtype
        cfg = self.config
        kv_shape = (batch_size, cfg.n_heads, cfg.context, cfg.d_model // cfg.n_heads)
        cache = {}
        for i in range(cfg.n_layers):
            cache[f"k{i}"] = torch.zeros(kv_shape, device=device, dtype=dtype)
            cache[f"v{i}"] = torch.zeros(kv_shape, device=device, dtype=dtype)
        cache["valid"] = torch.zeros(batch_size, cfg.context, device=device, dtype=torch.bool)
        cache["step"] = torch.zeros(batch_size, device=device, dtype=torch.long)
        return cache

    @overload
    def forward(
        self, obs: Tensor, prev_action: Tensor, prev_reward: Tensor, episode_start: Tensor,
        cache: None = None, isolate_episodes: bool = False,
    ) -> PolicyOutput: ...

    @overload
    def forward(
        self, obs: Tensor, prev_action: Tensor, prev_reward: Tensor, episode_start: Tensor,
        cache: Cache, isolate_episodes: bool = False,
    ) -> tuple[PolicyOutput, Cache]: ...

    def forward(
        self, obs: Tensor, prev_action: Tensor, prev_reward: Tensor, episode_start: Tensor,
        cache: Cache | None = None, isolate_episodes: bool = False,
    ) -> PolicyOutput | tuple[PolicyOutput, Cache]:
        """Sequence mode when `cache` is None, else one step with the cache (see the class docstring)."""
        check_inputs(self.spec, obs, prev_action, prev_reward, episode_start, step=cache is not None)
        x = self.embed(make_token(obs, prev_action, prev_reward, episode_start, self.embed.weight.dtype))
        if cache is None:
            return self._sequence(x, episode_start, isolate_episodes)
        return self._step(x, episode_start, cache, isolate_episodes)

    def _sequence(self, x: Tensor, episode_start: Tensor, isolate_episodes: bool) -> PolicyOutput:
        """x ``(B, T, d)`` -> outputs ``[B, T, ..]``."""
        pos = torch.arange(x.shape[1], device=x.device)  # (T,)
        cos, sin = rope_tables(pos, self.inv_freq, x.dtype)  # (T, hs/2)
        allowed = sequence_mask(episode_start, self.config.context, isolate_episodes)  # (B or 1, 1, T, T)
        for block in self.blocks:
            x = block(x, cos, sin, allowed)
        x = self.ln_f(x)
        return self.head(x, x)

    def _step(self, x: Tensor, episode_start: Tensor, cache: Cache, isolate_episodes: bool) -> tuple[PolicyOutput, Cache]:
        """x ``(B, d)`` -> outputs ``[B, ..]`` and the new cache."""
        expected = (x.shape[0], self.config.context)
        if tuple(cache["valid"].shape) != expected:
            raise ValueError(f"cache['valid'] has shape {tuple(cache['valid'].shape)}, expected {expected} (batch, context)")
        step = cache["step"]  # (B,)
        cos, sin = rope_tables(step, self.inv_freq, x.dtype)  # (B, hs/2)
        slot = step % self.config.context  # (B,)
        valid = cache["valid"]  # (B, C)
        if isolate_episodes:
            valid = valid & ~episode_start.unsqueeze(-1)
        slots = torch.arange(self.config.context, device=x.device)  # (C,)
        valid = valid | (slots == slot.unsqueeze(-1))  # (B, C)
        new_cache = {"valid": valid, "step": step + 1}
        for i, block in enumerate(self.blocks):
            x, new_cache[f"k{i}"], new_cache[f"v{i}"] = block.step(x, cos, sin, cache[f"k{i}"], cache[f"v{i}"], slot, valid)
        x = self.ln_f(x)
        return self.head(x, x), new_cache

"""Parameter distributions for task families: what a split samples from and which values it admits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Uniform:
    """Uniform on the box [low, high] (per element), optionally minus the box [exclude_low, exclude_high].

    The excluded box lets an out-of-distribution split surround the training range, e.g. goals in
    [-1, 1]^2 outside [-0.5, 0.5]^2.
    """

    low: float
    high: float
    exclude_low: float | None = None
    exclude_high: float | None = None

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"Uniform needs low < high, got low={self.low}, high={self.high}")
        if (self.exclude_low is None) != (self.exclude_high is None):
            raise ValueError("Uniform: give both exclude_low and exclude_high, or neither")

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Draws a float64 tensor of `shape`; the excluded box is rejected row by row (first dim)."""
        out = self.low + (self.high - self.low) * torch.rand(shape, generator=generator, dtype=torch.float64)
        if self.exclude_low is None:
            return out
        for _ in range(1000):
            bad = self._excluded(out)
            if not bad.any():
                return out
            fresh = self.low + (self.high - self.low) * torch.rand(shape, generator=generator, dtype=torch.float64)
            out = torch.where(bad.view(-1, *([1] * (len(shape) - 1))), fresh, out)
        raise RuntimeError(f"{self.describe()}: rejection sampling did not converge")

    def _excluded(self, x: Tensor) -> Tensor:
        """[M] bool: rows whose every element lies inside the excluded box."""
        inside = (x >= self.exclude_low) & (x <= self.exclude_high)
        return inside.reshape(x.shape[0], -1).all(dim=1)

    def contains(self, x: Tensor) -> Tensor:
        """[M] bool: rows of `x` ([M, ...]) inside the support."""
        inside = ((x >= self.low) & (x <= self.high)).reshape(x.shape[0], -1).all(dim=1)
        if self.exclude_low is not None:
            inside &= ~self._excluded(x)
        return inside

    def describe(self) -> str:
        text = f"U[{_fmt(self.low)}, {_fmt(self.high)}]"
        if self.exclude_low is not None:
            text += f" minus [{_fmt(self.exclude_low)}, {_fmt(self.exclude_high)}]"
        return text

    def bounds(self) -> tuple[float, float]:
        return (self.low, self.high)


@dataclass(frozen=True)
class Normal:
    """Independent normal N(mean, std^2) per element (unbounded support)."""

    mean: float
    std: float

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return self.mean + self.std * torch.randn(shape, generator=generator, dtype=torch.float64)

    def contains(self, x: Tensor) -> Tensor:
        return torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)

    def describe(self) -> str:
        return f"N({_fmt(self.mean)}, {_fmt(self.std)}^2)"

    def bounds(self) -> tuple[float, float]:
        return (-math.inf, math.inf)


@dataclass(frozen=True)
class Dirichlet:
    """Symmetric Dirichlet(alpha) over the last dimension (each row a probability vector)."""

    alpha: float = 1.0
    atol: float = 1e-5

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        # Dirichlet = normalised Gamma(alpha, 1); torch's Gamma has no generator argument, so for the
        # flat case (alpha = 1) use Exponential(1) = -log(U), which takes one.
        if self.alpha != 1.0:
            raise NotImplementedError("only the flat Dirichlet (alpha = 1) is supported")
        u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
        g = -torch.log(u)
        return g / g.sum(dim=-1, keepdim=True)

    def contains(self, x: Tensor) -> Tensor:
        ok = (x >= 0).reshape(x.shape[0], -1).all(dim=1)
        sums_ok = (x.sum(dim=-1) - 1).abs() <= self.atol
        return ok & sums_ok.reshape(x.shape[0], -1).all(dim=1)

    def describe(self) -> str:
        return f"Dirichlet({_fmt(self.alpha)}) over the last axis"

    def bounds(self) -> tuple[float, float]:
        return (0.0, 1.0)


@dataclass(frozen=True)
class LogUniform:
    """Log-uniform on [low, high] (0 < low < high): log x is uniform, for scale parameters such as masses."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError(f"LogUniform needs 0 < low < high, got low={self.low}, high={self.high}")

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        lo, hi = math.log(self.low), math.log(self.high)
        return torch.exp(lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64))

    def contains(self, x: Tensor) -> Tensor:
        return ((x >= self.low) & (x <= self.high)).reshape(x.shape[0], -1).all(dim=1)

    def describe(self) -> str:
        return f"LogU[{_fmt(self.low)}, {_fmt(self.high)}]"

    def bounds(self) -> tuple[float, float]:
        return (self.low, self.high)


@dataclass(frozen=True)
class Choice:
    """Each element uniformly one of `values` (e.g. a direction in {-1, +1})."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.values) < 1:
            raise ValueError("Choice needs at least one value")
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        index = torch.randint(len(self.values), shape, generator=generator)
        return torch.tensor(self.values, dtype=torch.float64)[index]

    def contains(self, x: Tensor) -> Tensor:
        allowed = torch.tensor(self.values, dtype=x.dtype, device=x.device)
        return torch.isin(x, allowed).reshape(x.shape[0], -1).all(dim=1)

    def describe(self) -> str:
        return "one of {" + ", ".join(_fmt(v) for v in self.values) + "}"

    def bounds(self) -> tuple[float, float]:
        return (min(self.values), max(self.values))


Distribution = Uniform | Normal | Dirichlet | LogUniform | Choice

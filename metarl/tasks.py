"""Tasks: batched task parameters, their declared specs, and seeded, disjoint train/test/ood sampling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metarl.distributions import Distribution

SPLITS = ("train", "test", "ood")
#: One in `_TEST_BUCKETS` hash buckets of parameter space belongs to `test`, the rest to `train`.
_TEST_BUCKETS = 5


@dataclass(frozen=True)
class ParamSpec:
    """One task parameter: its name, per-task shape and the distribution of each split.

    `ood` is None where the family has no out-of-distribution range (e.g. bandit arm probabilities
    already cover [0, 1]).
    """

    name: str
    shape: tuple[int, ...]
    train: Distribution
    test: Distribution
    ood: Distribution | None = None
    doc: str = ""

    def dist(self, split: str) -> Distribution | None:
        return {"train": self.train, "test": self.test, "ood": self.ood}[split]

    def admits(self, x: Tensor) -> Tensor:
        """[M] bool: rows of `x` inside the support of at least one split."""
        ok = torch.zeros(x.shape[0], dtype=torch.bool)
        for split in SPLITS:
            dist = self.dist(split)
            if dist is not None:
                ok |= dist.contains(x)
        return ok

    def describe(self) -> dict[str, str]:
        shape = "x".join(map(str, self.shape)) or "scalar"
        out = {"shape": shape, "doc": self.doc}
        for split in SPLITS:
            dist = self.dist(split)
            out[split] = "none" if dist is None else dist.describe()
        return out


@dataclass(frozen=True)
class Tasks:
    """N tasks of one family: `params[name]` is a tensor `[N, *spec.shape]` (float64, one device).

    Parameters are kept in double precision so that e.g. default physics constants are exact; envs cast them
    to their own dtype.
    """

    family: str
    params: Mapping[str, Tensor]
    split: str | None = None
    _n: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.params:
            raise ValueError(f"Tasks of {self.family!r} need at least one parameter")
        sizes = {name: int(v.shape[0]) if v.dim() else -1 for name, v in self.params.items()}
        if len(set(sizes.values())) != 1 or -1 in sizes.values():
            raise ValueError(f"Tasks of {self.family!r}: every parameter needs the same leading dim N, got {sizes}")
        devices = {v.device for v in self.params.values()}
        if len(devices) != 1:
            raise ValueError(f"Tasks of {self.family!r}: parameters on several devices {devices}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "_n", next(iter(sizes.values())))

    def __len__(self) -> int:
        return self._n

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Tasks:
        """A subset of the tasks (an int keeps the leading dim: `tasks[3]` has length 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return Tasks(self.family, {k: v[index] for k, v in self.params.items()}, self.split)

    def to(self, device: torch.device | str) -> Tasks:
        return Tasks(self.family, {k: v.to(device) for k, v in self.params.items()}, self.split)

    def to_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per task (floats and nested lists), as single envs' `set_task` takes."""
        cpu = {k: v.detach().cpu().double().numpy() for k, v in self.params.items()}
        return [{k: _plain(v[i]) for k, v in cpu.items()} for i in range(len(self))]

    @staticmethod
    def from_dicts(family: str, tasks: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> Tasks:
        """Stacks plain dicts (one per task, same keys) into a `Tasks` batch."""
        if not tasks:
            raise ValueError(f"from_dicts: no tasks given for {family!r}")
        keys = set(tasks[0])
        for i, t in enumerate(tasks):
            if set(t) != keys:
                raise ValueError(f"task {i} has keys {sorted(t)}, task 0 has {sorted(keys)}")
        params = {k: torch.as_tensor(np.array([t[k] for t in tasks], dtype=np.float64), dtype=torch.float64) for k in keys}
        return Tasks(family, params).to(device)

    @staticmethod
    def cat(batches: Sequence[Tasks]) -> Tasks:
        families = {b.family for b in batches}
        if len(families) != 1:
            raise ValueError(f"cannot concatenate tasks of several families: {sorted(families)}")
        keys = batches[0].params.keys()
        return Tasks(batches[0].family, {k: torch.cat([b.params[k] for b in batches]) for k in keys})


def _plain(x: np.ndarray) -> float | list:
    return float(x) if x.ndim == 0 else x.tolist()


def as_generator(generator: int | torch.Generator | None) -> torch.Generator:
    """A CPU `torch.Generator` from a seed or an existing generator (None: a fresh random seed)."""
    if isinstance(generator, torch.Generator):
        return generator
    gen = torch.Generator()
    if generator is None:
        gen.seed()
    elif isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        gen.manual_seed(int(generator))
    else:
        raise TypeError(f"generator must be an int seed, a torch.Generator or None, got {generator!r}")
    return gen


def split_bucket(values: Tensor) -> Tensor:
    """[M] int: a deterministic hash bucket of each row of `values` ([M, D] float).

    Train and test tasks come from disjoint sets of buckets, so a parameter vector can never be in
    both splits, whatever the seeds.
    """
    raw = values.to(torch.float64).contiguous().view(torch.int64)  # (M, D)
    bits = (raw ^ (raw >> 32)) & 0xFFFFFFFF
    weights = torch.arange(values.shape[1], dtype=torch.int64) * 2654435761 % 1048573 + 1  # (D,)
    mixed = (bits * weights).sum(dim=1)
    mixed = (mixed ^ (mixed >> 17)) * 0x45D9F3B & 0x7FFFFFFFFFFF
    return (mixed ^ (mixed >> 13)) % _TEST_BUCKETS


def flatten_params(params: Mapping[str, Tensor], specs: Sequence[ParamSpec]) -> Tensor:
    """[N, D]: all parameters of each task in spec order, flattened."""
    return torch.cat([params[s.name].reshape(params[s.name].shape[0], -1) for s in specs], dim=1)


def sample_params(specs: Sequence[ParamSpec], n: int, gen: torch.Generator, split: str, family: str,
                  hash_splits: bool = True) -> dict[str, Tensor]:
    """Draws n tasks' parameters for `split`; train/test rejection-sample their hash buckets.

    With `hash_splits=False` (families whose parameters are all discrete) train and test draw from their
    distributions with separate seed streams, so a test task may equal a training task.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    missing = [s.name for s in specs if s.dist(split) is None]
    if missing:
        raise ValueError(f"{family} defines no {split!r} range for parameter(s) {missing}; splits it has: "
                         f"{[sp for sp in SPLITS if all(s.dist(sp) is not None for s in specs)]}")
    if not hash_splits:
        if split == "test":  # a seed stream of its own: same seed, different tasks than train
            gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)) ^ 0x5EED7E57)
        return {s.name: s.dist(split).sample((n, *s.shape), gen) for s in specs}  # type: ignore[union-attr]
    kept: list[dict[str, Tensor]] = []
    count = 0
    for _ in range(10_000):
        if count >= n:
            break
        batch = max(2 * (n - count), 16) if split != "test" else max(2 * _TEST_BUCKETS * (n - count), 16)
        draw = {s.name: s.dist(split).sample((batch, *s.shape), gen) for s in specs}  # type: ignore[union-attr]
        if split == "ood":
            keep = torch.ones(batch, dtype=torch.bool)
        else:
            in_test = split_bucket(flatten_params(draw, specs)) == 0
            keep = in_test if split == "test" else ~in_test
        kept.append({k: v[keep] for k, v in draw.items()})
        count += int(keep.sum())
    else:
        raise ValueError(f"{family}: could not draw {n} {split!r} tasks whose parameter hash falls in the {split} bucket; "
                         f"families with only a few distinct tasks need hash_splits=False")
    return {s.name: torch.cat([b[s.name] for b in kept])[:n] for s in specs}

"""Shared random numbers for comparing a batched env with N single envs draw for draw."""

from __future__ import annotations

import numpy as np
import torch


class Tape:
    """Row i feeds single env i; a batched draw of shape (N, *s) takes the same numbers for every row."""

    def __init__(self, n: int, length: int = 200_000, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.uniform = rng.random((n, length))
        self.normal = rng.standard_normal((n, length))
        # the batched env and the single envs each read the tape from the start, with their own cursors
        self.pos = {(reader, kind): np.zeros(n, dtype=int) for reader in ("single", "batched")
                    for kind in ("uniform", "normal")}

    def take(self, kind: str, row: int, count: int, reader: str = "single") -> np.ndarray:
        pos = self.pos[reader, kind]
        start = pos[row]
        pos[row] += count
        return getattr(self, kind)[row, start:start + count]


class SingleRandom:
    """Stands in for `env.np_random` of single env `row`; supports random() and standard_normal()."""

    def __init__(self, tape: Tape, row: int) -> None:
        self.tape, self.row = tape, row

    def _draw(self, kind: str, size) -> np.ndarray | float:
        if size is None:
            return float(self.tape.take(kind, self.row, 1)[0])
        shape = (size,) if isinstance(size, int) else tuple(size)
        return self.tape.take(kind, self.row, int(np.prod(shape))).reshape(shape)

    def random(self, size=None):
        return self._draw("uniform", size)

    def standard_normal(self, size=None):
        return self._draw("normal", size)

    def uniform(self, low=0.0, high=1.0, size=None):
        return low + (np.asarray(high) - low) * self._draw("uniform", size)


def patch_batched(env, tape: Tape) -> None:
    """Makes `env._rand` / `env._randn` read the tape (rows = sub-envs, in order)."""

    def draw(kind: str, *shape: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        n, rest = shape[0], int(np.prod(shape[1:]))
        active = range(n) if rows is None else rows.nonzero().flatten().tolist()
        out = np.zeros((n, rest))
        for i in active:  # only the sub-envs that draw advance their rows
            out[i] = tape.take(kind, i, rest, "batched")
        return torch.as_tensor(out.reshape(shape), dtype=env.dtype, device=env.device)

    env._rand = lambda *shape, rows=None: draw("uniform", *shape, rows=rows)
    env._randn = lambda *shape, rows=None: draw("normal", *shape, rows=rows)

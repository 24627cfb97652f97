"""Seed streams: every random draw of a training iteration comes from a generator derived from (seed, iteration)."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. run seed, iteration, stream id, rank), via numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def iteration_generator(seed: int, iteration: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one iteration (and stream) of a run: the same on resume, distinct across iterations."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, iteration, stream))
    return gen

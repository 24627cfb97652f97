"""Evaluation of policies on held-out tasks."""

from __future__ import annotations

import gymnasium as gym
import torch

from metarl.family import TaskFamily
from metarl.vec_env import VecTaskEnv


def random_actions(env: VecTaskEnv, generator: torch.Generator) -> torch.Tensor:
    """Uniform random actions [N, ...] for every sub-env, from `generator` (on the env's device)."""
    space = env.single_action_space
    if isinstance(space, gym.spaces.Discrete):
        return torch.randint(0, int(space.n), (env.num_envs,), generator=generator, device=env.device)
    low = torch.as_tensor(space.low, device=env.device)
    high = torch.as_tensor(space.high, device=env.device)
    u = torch.rand((env.num_envs, *space.shape), generator=generator, device=env.device)
    return low + (high - low) * u


def random_policy_returns(family: TaskFamily, num_tasks: int, split: str = "test", seed: int = 0,
                          device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean and std over tasks of a uniform random policy's total reward over one trial."""
    env = family.make_vec(family.sample(num_tasks, seed, split), device=device, autoreset_mode="disabled", seed=seed)
    gen = torch.Generator(device=env.device)
    gen.manual_seed(seed)
    total = torch.zeros(num_tasks, device=env.device)
    for _ in range(family.episodes_per_trial):
        env.reset()
        alive = torch.ones(num_tasks, dtype=torch.bool, device=env.device)
        for _ in range(family.horizon):
            _, reward, terminated, truncated, _ = env.step(random_actions(env, gen))
            total += reward * alive
            alive &= ~(terminated | truncated)
            if not alive.any():
                break
    return {"mean": total.mean().item(), "std": total.std().item() if num_tasks > 1 else 0.0,
            "episodes_per_trial": family.episodes_per_trial, "horizon": family.horizon}

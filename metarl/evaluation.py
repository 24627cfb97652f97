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


def _summary(per_task: list[float]) -> dict[str, float]:
    t = torch.tensor(per_task, dtype=torch.float64)
    std = t.std().item() if len(per_task) > 1 else 0.0
    return {"mean": t.mean().item(), "std": std, "ci95": 1.96 * std / len(per_task) ** 0.5}


def evaluate_adaptation(agent, family: TaskFamily, split: str = "test", num_tasks: int = 40, steps: int = 3,
                        episodes: int | None = None, seed: int = 0) -> dict:
    """Returns on `num_tasks` tasks of `split` before adaptation and after each of `steps` gradient steps, and per
    in-context episode; mean, std and a normal 95% interval across tasks. `agent` has `adaptation_curve`."""
    from metarl.seeding import derive_seed

    tasks = family.sample(num_tasks, derive_seed(seed, 1), split)
    curve = agent.adaptation_curve(tasks, seed=derive_seed(seed, 2), steps=steps, episodes=episodes)
    per_step = [list(map(float, r)) for r in curve["gradient_steps_per_task"]]
    per_episode = [list(map(float, r)) for r in curve["incontext_episodes_per_task"]]
    return {"family": family.name, "split": split, "num_tasks": num_tasks, "seed": seed,
            "gradient_steps": [_summary(r) for r in per_step], "incontext_episodes": [_summary(r) for r in per_episode],
            "per_task": {"gradient_steps": per_step, "incontext_episodes": per_episode}}


def format_curve(result: dict) -> str:
    """A plain-text table of `evaluate_adaptation`'s result."""
    lines = [f"Adaptation on {result['num_tasks']} held-out {result['split']} tasks of {result['family']} "
             f"(mean return +- 95% CI):"]
    for k, s in enumerate(result["gradient_steps"]):
        lines.append(f"  after {k} gradient step(s): {s['mean']:10.2f} +- {s['ci95']:.2f}")
    for e, s in enumerate(result["incontext_episodes"]):
        lines.append(f"  in-context episode {e + 1}:    {s['mean']:10.2f} +- {s['ci95']:.2f}")
    return "\n".join(lines)

"""Evaluation of policies on held-out tasks: adaptation curves with Student-t confidence intervals across tasks.

`evaluate_adaptation(agent, family, split=...)` returns an `AdaptationResult`: for each of `num_tasks` tasks of the
split, the return (and, for families where termination means success, the success rate) before adaptation, after
each inner gradient step and in each in-context episode; summarised across tasks by `CurveStats`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from metarl.family import TaskFamily
from metarl.seeding import derive_seed
from metarl.tasks import Tasks
from metarl.vec_env import VecTaskEnv

#: The per-task series a result holds: return and success, over gradient steps and over in-context episodes.
SERIES = ("gradient_steps", "incontext_episodes", "gradient_steps_success", "incontext_episodes_success")


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


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t distribution with `dof` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


@dataclass(frozen=True)
class CurveStats:
    """Summary across tasks of one point of a curve: mean, sample std (ddof 1) and the two-sided 95% Student-t
    confidence interval of the mean, ``mean -+ t_{0.975, n-1} * std / sqrt(n)`` (the interval is the mean itself
    when n = 1)."""

    mean: float
    std: float
    ci95_low: float
    ci95_high: float
    n: int

    @property
    def ci95(self) -> float:
        """Half-width of the 95% interval."""
        return (self.ci95_high - self.ci95_low) / 2

    @classmethod
    def of(cls, values: Sequence[float]) -> CurveStats:
        """The summary of per-task `values` (at least one)."""
        n = len(values)
        if n == 0:
            raise ValueError("CurveStats.of needs at least one value")
        mean = math.fsum(values) / n
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else 0.0
        return cls(mean, std, mean - half, mean + half, n)


def _rows(values: Any) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in values)


@dataclass(frozen=True)
class AdaptationResult:
    """One method's adaptation curves on the held-out tasks of one split.

    `per_task[s][x][i]` is task i's value at point x of series s (`SERIES`): mean episode return after x gradient
    steps (x = 0: before adaptation), return in in-context episode x + 1, and the success rates over the same
    points (empty where the family defines no success, or the method has no such axis). `gradient_steps` etc. are
    the `CurveStats` of each point. `tasks` holds each evaluated task's flat parameters (`family.flat_params`).
    """

    family: str
    split: str
    method: str
    seed: int
    num_tasks: int
    steps: int
    per_task: Mapping[str, tuple[tuple[float, ...], ...]]
    tasks: tuple[tuple[float, ...], ...] = ()
    notes: str = ""
    stats: Mapping[str, tuple[CurveStats, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        per_task = {s: _rows(self.per_task.get(s, ())) for s in SERIES}
        unknown = set(self.per_task) - set(SERIES)
        if unknown:
            raise ValueError(f"unknown series {sorted(unknown)}; expected a subset of {SERIES}")
        object.__setattr__(self, "per_task", per_task)
        object.__setattr__(self, "tasks", _rows(self.tasks))
        object.__setattr__(self, "stats", {s: tuple(CurveStats.of(r) for r in rows) for s, rows in per_task.items()})

    @property
    def gradient_steps(self) -> tuple[CurveStats, ...]:
        return self.stats["gradient_steps"]

    @property
    def incontext_episodes(self) -> tuple[CurveStats, ...]:
        return self.stats["incontext_episodes"]

    @property
    def gradient_steps_success(self) -> tuple[CurveStats, ...]:
        return self.stats["gradient_steps_success"]

    @property
    def incontext_episodes_success(self) -> tuple[CurveStats, ...]:
        return self.stats["incontext_episodes_success"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: the fields, plus each series' stats (`mean`, `std`, `ci95_low`, `ci95_high`, `n`)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        data["per_task"] = {s: [list(r) for r in rows] for s, rows in self.per_task.items()}
        data["tasks"] = [list(t) for t in self.tasks]
        data.update({s: [vars(c) | {"ci95": c.ci95} for c in stats] for s, stats in self.stats.items()})
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaptationResult:
        """The result `to_dict` wrote (the stats are recomputed from the per-task values)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.init and f.name in data})

    def table(self) -> str:
        """A plain-text table of the return curve (mean +- 95% CI half-width)."""
        lines = [f"{self.method}: adaptation on {self.num_tasks} held-out {self.split} tasks of {self.family} "
                 f"(mean return +- 95% CI):"]
        success = self.gradient_steps_success
        for k, s in enumerate(self.gradient_steps):
            extra = f"   success {success[k].mean:.2f}" if success else ""
            lines.append(f"  after {k} gradient step(s): {s.mean:10.2f} +- {s.ci95:.2f}{extra}")
        for e, s in enumerate(self.incontext_episodes):
            lines.append(f"  in-context episode {e + 1}:    {s.mean:10.2f} +- {s.ci95:.2f}")
        return "\n".join(lines)


def heldout_tasks(family: TaskFamily, split: str, num_tasks: int, seed: int) -> Tasks:
    """The `num_tasks` tasks of `split` an evaluation with `seed` uses (every method gets these same tasks)."""
    if split not in family.splits():
        raise ValueError(f"{family.name} has no {split!r} split; its splits: {list(family.splits())}")
    return family.sample(num_tasks, derive_seed(seed, 1), split)


def result_from_curve(curve: Mapping[str, Any], family: TaskFamily, tasks: Tasks, method: str, seed: int, steps: int,
                      notes: str = "") -> AdaptationResult:
    """An `AdaptationResult` from an `adaptation_curve`-style dict (``*_per_task`` lists over points, then tasks)."""
    per_task = {s: curve.get(f"{s}_per_task", []) for s in SERIES}
    if not family.success_on_termination:
        per_task = {s: v for s, v in per_task.items() if not s.endswith("_success")}
    return AdaptationResult(family=family.name, split=str(tasks.split), method=method, seed=seed, num_tasks=len(tasks),
                            steps=steps, per_task=per_task, tasks=family.flat_params(tasks).tolist(), notes=notes)


def evaluate_adaptation(agent, family: TaskFamily, split: str = "test", num_tasks: int = 40, steps: int = 3,
                        episodes: int | None = None, seed: int = 0, method: str = "agent",
                        trajectories: int | None = None, step_sizes: Sequence[float] = ()) -> AdaptationResult:
    """Adaptation of `agent` (anything with `adaptation_curve`, e.g. a MAMLLearner or an InContextLearner) on
    `num_tasks` tasks of `split`: return before adaptation and after each of `steps` gradient steps, and in each of
    `episodes` in-context episodes (default: the agent's trial length), with Student-t 95% intervals across tasks.
    `trajectories`: trials per task behind each point (a gradient step's support data; default: the agent's
    training value for MAML, 1 trial for in-context agents). `step_sizes`: inner step size of each gradient step
    (the last repeats; default the agent's `inner_lr`).

    The tasks are `heldout_tasks(family, split, num_tasks, seed)`; the same seed gives the same numbers. Compare
    Stable-Baselines3's `evaluate_policy`, which evaluates one fixed policy on one env.
    """
    for name, value in (("episodes", episodes), ("trajectories", trajectories)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (or None for the agent's default), got {value}")
    tasks = heldout_tasks(family, split, num_tasks, seed)
    curve = agent.adaptation_curve(tasks, seed=derive_seed(seed, 2), steps=steps, episodes=episodes,
                                   trajectories=trajectories, step_sizes=tuple(step_sizes))
    return result_from_curve(curve, family, tasks, method, seed, steps)


def format_curve(result: AdaptationResult) -> str:
    """A plain-text table of `evaluate_adaptation`'s result (`result.table()`)."""
    return result.table()


def load_run(run_dir: str | Path, device: str | None = None):
    """(learner, TrainConfig) of a `metarl train` run directory: its config.json, with the latest checkpoint loaded."""
    from metarl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    from metarl.config import build_config
    from metarl.train import TrainConfig, make_learner

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.json: not a `metarl train` run directory")
    config = build_config(TrainConfig, run_dir / "config.json", {"device": device} if device else None)
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {run_dir} (expected ckpt-NNNNNN.pt files)")
    learner = make_learner(config)
    learner.load_state_dict(load_checkpoint(path, map_location=learner.device)["learner"])
    return learner, config


def evaluate_run(run_dir: str | Path, split: str = "test", num_tasks: int = 40, steps: int | None = None,
                 episodes: int | None = None, seed: int | None = None, baselines: str = "", baseline_steps: int = 50_000,
                 out: str | Path | None = None, device: str | None = None, command: str | None = None,
                 trajectories: int | None = None, step_sizes: Sequence[float] = (), verbose: bool = False):
    """`metarl evaluate`: evaluates a run's latest checkpoint on `split` (test, ood or both) and writes the report
    (JSON, CSV, PNG, table, TensorBoard) to `out` (default RUN_DIR/eval-<split>). Returns (results, paths)."""
    from metarl.baselines import BaselineConfig, evaluate_all, parse_baselines
    from metarl.report import write_report

    names = parse_baselines(baselines)
    splits = {"test": ("test",), "ood": ("ood",), "both": ("test", "ood")}.get(split)
    if splits is None:
        raise ValueError(f"unknown split {split!r}: expected test, ood or both")
    learner, config = load_run(run_dir, device)
    missing = [s for s in splits if s not in learner.family.splits()]
    if missing:
        raise ValueError(f"{learner.family.name} has no {missing[0]!r} split; its splits: {list(learner.family.splits())}")
    steps = config.eval_steps if steps is None else steps
    results = evaluate_all(learner, splits, num_tasks, steps, episodes, config.seed if seed is None else seed, names,
                           BaselineConfig(ppo_steps=baseline_steps), trajectories, step_sizes, verbose)
    paths = write_report(results, Path(out) if out is not None else Path(run_dir) / f"eval-{split}", command=command)
    return results, paths

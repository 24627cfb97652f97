"""`metarl train`: typed configuration, learner construction, and the run (train, then evaluate on held-out tasks)."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from metarl import distributed
from metarl.agents.incontext import InContextConfig, InContextLearner
from metarl.agents.maml import MAMLConfig
from metarl.agents.maml_learner import MAMLLearner, MetaBatchConfig, OuterConfig, check_step_sizes
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.agents.transformer import TransformerConfig, TransformerPolicy
from metarl.config import config_to_dict, save_config
from metarl.evaluation import evaluate_adaptation
from metarl.family import TaskFamily, make_family
from metarl.trainer import Trainer

AGENTS = ("maml-mlp", "maml-transformer", "incontext-transformer")


@dataclass(frozen=True)
class TrainConfig:
    """A training run: the task family, the agent, the budget, and every sub-config."""

    env: str = "PointNav"
    """Task family (any spelling `metarl envs` lists, e.g. point-nav or metarl/PointNav-v0)."""
    env_options: str = ""
    """Family options as comma-separated key=value pairs, e.g. "horizon=50" or "k=10,n_pulls=100"."""
    agent: Literal["maml-mlp", "maml-transformer", "incontext-transformer"] = "maml-transformer"
    """maml-mlp: the MAML paper's policy; maml-transformer: MAML on the Transformer (with episodes_per_trial > 1 it
    also adapts in context); incontext-transformer: RL2-style training, no inner gradient."""
    seed: int = 0
    """Seed of everything: tasks, rollouts, initialisation."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""
    iterations: int = 100
    """Meta-iterations to train for."""
    checkpoint_every: int = 10
    """Write a checkpoint every this many iterations (and at the end, on Ctrl-C and on errors)."""
    eval_tasks: int = 40
    """Held-out (test split) tasks evaluated after training."""
    eval_steps: int = 3
    """Inner gradient steps in the final evaluation (MAML agents)."""
    eval_trajectories: int | None = None
    """Support trajectories per task and step in the final evaluation (None: batch.trajectories_per_task)."""
    eval_step_sizes: tuple[float, ...] = ()
    """Inner step size of each evaluation step, the last one repeating (empty: maml.inner_lr)."""
    progress: bool = True
    """Show a progress bar with ETA."""
    batch: MetaBatchConfig = field(default_factory=MetaBatchConfig)
    """Data per MAML meta-iteration."""
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    """MAML inner loop."""
    outer: OuterConfig = field(default_factory=OuterConfig)
    """MAML outer step."""
    incontext: InContextConfig = field(default_factory=InContextConfig)
    """In-context (RL2-style PPO) training."""
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    """Transformer policy."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """MLP policy."""

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.eval_tasks < 1 or self.eval_steps < 0:
            raise ValueError(f"iterations >= 0, eval_tasks >= 1, eval_steps >= 0 expected, got {self.iterations}, "
                             f"{self.eval_tasks}, {self.eval_steps}")
        if self.eval_trajectories is not None and self.eval_trajectories < 1:
            raise ValueError(f"eval_trajectories must be >= 1 (or None), got {self.eval_trajectories}")
        check_step_sizes(self.eval_step_sizes, meta_sgd=False)
        parse_env_options(self.env_options)


def parse_env_options(text: str) -> dict[str, Any]:
    """'k=10,n_pulls=100' -> {'k': 10, 'n_pulls': 100} (values are Python literals: numbers, strings, booleans)."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"env_options item {item!r} is not key=value (in {text!r})")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def make_family_from(config: TrainConfig) -> TaskFamily:
    return make_family(config.env, **parse_env_options(config.env_options))


def make_learner(config: TrainConfig) -> MAMLLearner | InContextLearner:
    """The policy and learner a config describes (parameters initialised from `config.seed`)."""
    family = make_family_from(config)
    torch.manual_seed(config.seed)
    if config.agent == "maml-mlp":
        policy = MLPPolicy(family.observation_space, family.action_space, config.mlp)
    else:
        policy = TransformerPolicy(family.observation_space, family.action_space, config.transformer)
    if config.agent == "incontext-transformer":
        return InContextLearner(policy, family, config.incontext, device=config.device, seed=config.seed)
    if not config.maml.first_order and config.agent == "maml-transformer" and config.transformer.attention != "math":
        raise ValueError("second-order MAML needs transformer.attention='math' (fused attention kernels have no double "
                         "backward); set --transformer.attention math or --maml.first-order")
    return MAMLLearner(policy, family, config.maml, config.outer, config.batch, device=config.device, seed=config.seed)


def default_run_dir(config: TrainConfig) -> Path:
    """runs/<family>-<agent>-seed<seed>, with -2, -3, ... appended if that directory already holds a run."""
    base = Path("runs") / f"{make_family_from(config).name}-{config.agent}-seed{config.seed}"
    path, n = base, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _check_run_dir(config: TrainConfig, run_dir: str | Path | None, resume: bool) -> tuple[Path, str]:
    """(the run directory, an error message or "") as decided on rank 0."""
    path = Path(run_dir) if run_dir is not None else default_run_dir(config)
    if not resume and path.exists() and any(path.iterdir()):
        return path, (f"run directory {path} already holds a run: resume it with --resume {path} or choose another "
                      f"--run-dir")
    return path, ""


def run_training(config: TrainConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Trains (or resumes) a run, then evaluates adaptation on held-out tasks (`evaluation_report`); returns the
    test split's evaluation as a dict (`AdaptationResult.to_dict()`).

    Launched by torchrun, it joins the process group first (see `metarl.distributed`); rank 0 picks the run
    directory, writes the config, logs, checkpoints and evaluates, and the other ranks return an empty dict."""
    device = distributed.init_distributed(config.device)
    run_dir, error = distributed.broadcast_object(_check_run_dir(config, run_dir, resume) if distributed.is_main()
                                                  else None)
    if error:
        raise ValueError(error)
    learner = make_learner(replace(config, device=str(device)))
    trainer = Trainer(learner, run_dir, config.iterations, config_to_dict(config), config.checkpoint_every,
                      progress=config.progress)
    if resume:
        trainer.resume()
        if distributed.is_main():  # the config it continues with (e.g. more iterations) is the run's config now
            save_config(config, run_dir / "config.json")
    elif distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.json")
    if distributed.is_main():
        print(f"run directory: {run_dir}" + (f" ({distributed.world_size()} processes)"
                                             if distributed.is_distributed() else ""))
    trainer.run()
    if not distributed.is_main():
        return {}
    return evaluation_report(learner, config, run_dir)[0].to_dict()


def evaluation_report(learner: MAMLLearner | InContextLearner, config: TrainConfig, run_dir: Path) -> list:
    """Evaluates the trained learner on `eval_tasks` held-out tasks of the test split (and of the ood split where the
    family has one), writes the report (eval.json, eval.csv, eval.png, table.md, TensorBoard `eval/...` scalars)
    into the run directory, prints the table and returns the `AdaptationResult`s (test first)."""
    from metarl.report import table, write_report

    family = make_family_from(config)
    splits = [s for s in ("test", "ood") if s in family.splits()]
    results = [evaluate_adaptation(learner, family, split=s, num_tasks=config.eval_tasks, steps=config.eval_steps,
                                   seed=config.seed, trajectories=config.eval_trajectories,
                                   step_sizes=config.eval_step_sizes) for s in splits]
    write_report(results, run_dir, tb_dir=run_dir / "tb")
    print(table(results))
    return results

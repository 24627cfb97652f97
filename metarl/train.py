"""`metarl train`: typed configuration, learner construction, and the run (train, then evaluate on held-out tasks)."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from metarl.agents.incontext import InContextConfig, InContextLearner
from metarl.agents.maml import MAMLConfig
from metarl.agents.maml_learner import MAMLLearner, MetaBatchConfig, OuterConfig
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.agents.transformer import TransformerConfig, TransformerPolicy
from metarl.config import config_to_dict, save_config
from metarl.evaluation import evaluate_adaptation, format_curve
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


def run_training(config: TrainConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Trains (or resumes) a run, then evaluates adaptation on held-out tasks; returns the evaluation."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"run directory {run_dir} already holds a run: resume it with --resume {run_dir} or choose "
                         f"another --run-dir")
    learner = make_learner(config)
    trainer = Trainer(learner, run_dir, config.iterations, config_to_dict(config), config.checkpoint_every,
                      progress=config.progress)
    if resume:
        trainer.resume()
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.json")
    print(f"run directory: {run_dir}")
    trainer.run()
    family = make_family_from(config)
    result = evaluate_adaptation(learner, family, split="test", num_tasks=config.eval_tasks, steps=config.eval_steps,
                                 seed=config.seed)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    print(format_curve(result))
    return result

"""The `metarl` command line: `metarl envs`, `metarl train`, `metarl evaluate`, `metarl random-baseline`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import metarl
from metarl.checkpoint import CheckpointError


def _print_envs(as_json: bool) -> None:
    rows = [metarl.make_family(name).describe() for name in metarl.family_names()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['name']}  (gymnasium id: {row['gymnasium_id']})")
        print(f"  {row['doc']}")
        if "splits" in row:
            print(f"  splits: {row['splits']}")
        print(f"  observation: {row['observation_space']}")
        print(f"  action:      {row['action_space']}")
        print(f"  horizon: {row['horizon']} steps, {row['episodes_per_trial']} episode(s) per trial, options: {row['options']}")
        for name, spec in row["params"].items():
            print(f"  param {name} [{spec['shape']}] {spec['doc']}")
            print(f"    train: {spec['train']} | test: {spec['test']} | ood: {spec['ood']}")
        print()


def _random_baseline(args: argparse.Namespace) -> None:
    from metarl.evaluation import random_policy_returns

    names = args.env or metarl.family_names()
    print(f"Random-policy return per trial on {args.num_tasks} held-out ({args.split}) tasks, seed {args.seed}:")
    for name in names:
        family = metarl.make_family(name)
        stats = random_policy_returns(family, args.num_tasks, split=args.split, seed=args.seed, device=args.device)
        print(f"  {family.name:12s} {stats['mean']:10.2f} +- {stats['std']:.2f}  "
              f"({stats['episodes_per_trial']} episode(s) x {stats['horizon']} steps)")


def _train(args: argparse.Namespace) -> None:
    from metarl.config import build_config, overrides_from_namespace
    from metarl.distributed import shutdown
    from metarl.train import TrainConfig, run_training

    overrides = overrides_from_namespace(args, TrainConfig)
    try:  # under torchrun, run_training joins the process group; leave it when done
        if args.resume:  # the run's saved config, with any flags given now (e.g. more --iterations) on top
            config = build_config(TrainConfig, Path(args.resume) / "config.json", overrides)
            run_training(config, args.resume, resume=True)
        else:
            run_training(build_config(TrainConfig, args.config, overrides), args.run_dir)
    except BaseException:
        shutdown(wait=False)  # the other ranks may be gone or stuck in a collective
        raise
    shutdown()  # waits for rank 0's evaluation, so that all ranks leave the group together


def _evaluate(args: argparse.Namespace, argv: Sequence[str]) -> None:
    import shlex

    from metarl.evaluation import evaluate_run
    from metarl.report import table

    command = shlex.join(["metarl", *argv])
    results, paths = evaluate_run(args.run_dir, args.split, args.num_tasks, args.steps, args.episodes, args.seed,
                                  args.baselines, args.baseline_steps, args.out, args.device, command=command,
                                  trajectories=args.trajectories, step_sizes=args.step_sizes, verbose=True)
    print(table(results))
    print(f"report: {paths['table'].parent} (eval.json, eval.csv, eval.png, table.md; TensorBoard: {paths['tensorboard']})")


def _float_list(text: str) -> tuple[float, ...]:
    """'0.5,0.25' -> (0.5, 0.25), for argparse."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="adaptation curves of a trained run on held-out tasks, with baselines",
                        description="Return (and success) before adaptation, after each inner gradient step and in "
                                    "each in-context episode on held-out tasks; mean, std and Student-t 95% CI across "
                                    "tasks. Writes JSON, CSV, a PNG, a markdown table and TensorBoard scalars.")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a `metarl train` run directory (config.json + checkpoints)")
    ev.add_argument("--split", default="test", choices=("test", "ood", "both"), help="held-out split(s) (default test)")
    ev.add_argument("--num-tasks", type=int, default=40, help="held-out tasks per split (default 40)")
    ev.add_argument("--steps", type=int, help="inner gradient steps K (default: the run's eval_steps)")
    ev.add_argument("--episodes", type=int, help="in-context episodes per trial (default: the agent's trial length)")
    ev.add_argument("--trajectories", type=int,
                    help="trials per task behind each point, e.g. each gradient step's support trajectories "
                         "(default: the run's trajectories per task for MAML, 1 for in-context agents)")
    ev.add_argument("--step-sizes", type=_float_list, default=(), metavar="LR[,LR...]",
                    help="inner step size of gradient step 1, 2, ...; the last repeats (default: the run's inner_lr), "
                         "e.g. 0.5,0.25 as in the MAML authors' evaluation")
    ev.add_argument("--seed", type=int, help="evaluation seed: tasks, rollouts, baselines (default: the run's seed)")
    ev.add_argument("--baselines", default="", help="comma-separated: random-init,pretrained,oracle,scratch or all "
                                                    "(default none)")
    ev.add_argument("--baseline-steps", type=int, default=50_000,
                    help="PPO timesteps of the pretrained and oracle baselines (default 50000)")
    ev.add_argument("--out", help="report directory (default RUN_DIR/eval-<split>)")
    ev.add_argument("--device", help="torch device (default: the run's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarl", description=metarl.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    envs = sub.add_parser("envs", help="list the registered task families with their parameters, splits and spaces")
    envs.add_argument("--json", action="store_true", help="print JSON instead of text")
    rand = sub.add_parser("random-baseline", help="returns of a uniform random policy on held-out tasks")
    rand.add_argument("--env", action="append", help="family name (repeatable; default: all)")
    rand.add_argument("--num-tasks", type=int, default=40, help="number of held-out tasks")
    rand.add_argument("--split", default="test", choices=metarl.SPLITS, help="task split to evaluate on")
    rand.add_argument("--seed", type=int, default=0, help="seed for tasks, env noise and actions")
    rand.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    train = sub.add_parser("train", help="meta-train an agent on a task family, then evaluate it on held-out tasks",
                           description="Meta-train an agent; options come from typed configs (a file, then flags).")
    train.add_argument("--config", help="JSON or TOML file with config values (flags override it)")
    train.add_argument("--run-dir", help="where checkpoints, TensorBoard logs and config.json go "
                                         "(default runs/<family>-<agent>-seed<seed>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    from metarl.config import add_dataclass_arguments
    from metarl.train import TrainConfig

    add_dataclass_arguments(train, TrainConfig)
    _add_evaluate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "envs":
            _print_envs(args.json)
        elif args.command == "random-baseline":
            _random_baseline(args)
        elif args.command == "train":
            _train(args)
        elif args.command == "evaluate":
            _evaluate(args, sys.argv[1:] if argv is None else argv)
    except (KeyError, ValueError, TypeError, CheckpointError, FileNotFoundError) as err:
        print(f"metarl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metarl {args.command}: interrupted; the last checkpoint is in the run directory", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

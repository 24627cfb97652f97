"""Reproduce the MAML paper's 2D-navigation result, then run the Transformer agents on the same held-out tasks.

    python scripts/reproduce_maml.py --out docs/results/reproduce_maml.json [--quick] [--iterations 500]
        [--agents mlp,mlp-authors-code,maml-transformer,incontext-transformer,both] [--seeds 0,1,2]
        [--set maml.task_chunk=4 ...] [--runs runs/reproduce_maml] [--markdown docs/results/reproduce_maml.md]

Setup (Finn et al. 2017): PointNav, horizon 100, MLP 2x100 ReLU (Glorot-uniform weights, zero biases, as in the
authors' code), inner step = vanilla policy gradient with a linear feature baseline, inner lr 0.1, outer TRPO (max KL
0.01, CG 10 iterations, damping 1e-5, line search 15 x 0.8), meta-batch 20 tasks, 20 trajectories per task, gamma
0.99, GAE lambda 1.0. Evaluation: 40 held-out test-split tasks, return after 0, 1, 2, 3 inner gradient steps (each on
20 fresh trajectories). The paper's text gives inner lr 0.1; the authors' released code trained the evaluated policy
with 0.5 and evaluated it with 40 trajectories per step and half the step size after the first step: agent
"mlp-authors-code" runs that configuration next to "mlp". Each agent trains in its own run directory under --runs
(TensorBoard logs, checkpoints, config.json), exactly as `metarl train` would; rerunning the script resumes an
interrupted run from its last checkpoint (a run directory made with a different configuration is refused: pick
another --runs). `--set KEY=VALUE` overrides a config key for every agent (VALUE read as JSON when it parses, else as
a string). "wall clock" is the training time (without evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path

from metarl.checkpoint import latest_checkpoint
from metarl.config import build_config, config_from_dict, config_to_dict
from metarl.machine import benchmark_parser, machine_info, write_results
from metarl.train import TrainConfig, run_training

PUBLISHED = {"MAML-TRPO (Finn et al. 2017)": [-40.4, -11.7, -3.33, -3.23], "pretrained": [-40.8, -19.7, -11.7, -8.5],
             "random init": [-82.7, -58.0, -53.8, -46.8], "oracle": [-2.29]}

PAPER = {"env": "PointNav", "env_options": "horizon=100", "eval_tasks": 40, "eval_steps": 3, "batch.meta_batch": 20,
         "batch.trajectories_per_task": 20, "maml.inner_lr": 0.1, "maml.gamma": 0.99, "maml.gae_lambda": 1.0,
         "outer.method": "trpo", "outer.max_kl": 0.01, "mlp.hidden": (100, 100), "mlp.activation": "relu",
         "mlp.init": "glorot"}

AGENTS = {
    "mlp": {"agent": "maml-mlp"},
    # the configuration behind the published numbers in the authors' released code: the evaluated checkpoint was
    # trained with inner lr 0.5 (meta-batch 20, 20 trajectories), and their test script adapted with batches of
    # 4000 steps (40 trajectories), step size 0.5 for the first step and 0.25 after it
    "mlp-authors-code": {"agent": "maml-mlp", "maml.inner_lr": 0.5, "eval_trajectories": 40,
                         "eval_step_sizes": (0.5, 0.25)},
    # first-order: a second-order TRPO iteration through the Transformer (CG on Hessian-vector products through the
    # inner step) costs minutes on a 2-core CPU; `metarl train ... --maml.first_order false` runs the full version
    "maml-transformer": {"agent": "maml-transformer", "transformer.context": 100, "maml.first_order": True},
    "incontext-transformer": {"agent": "incontext-transformer", "incontext.episodes_per_trial": 2,
                              "transformer.context": 200, "incontext.meta_batch": 20, "incontext.trials_per_task": 4},
    "both": {"agent": "maml-transformer", "batch.episodes_per_trial": 2, "batch.trajectories_per_task": 10,
             "transformer.context": 200, "maml.first_order": True},
}


RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "progress")
"""Config keys that may differ between a run directory's saved config and the one that resumes it."""


def check_same_run(run_dir: Path, config: TrainConfig) -> None:
    """Raises SystemExit when `run_dir` holds a run made with another configuration (keys other than
    `RESUMABLE_CHANGES` differ), which resuming would silently mix into this one."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    # through the config class, so that keys added since the run was made take their defaults on both sides
    saved = config_to_dict(config_from_dict(TrainConfig, json.loads(saved_path.read_text())))
    now = config_to_dict(config)
    differ = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if differ:
        raise SystemExit(f"{run_dir} holds a run with a different configuration (keys {differ}); choose another "
                         "--runs folder or remove it")


def parse_sets(pairs: list[str]) -> dict[str, object]:
    """`["maml.task_chunk=4", "maml.adapt=heads"]` -> {"maml.task_chunk": 4, "maml.adapt": "heads"}."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    return overrides


def run_agent(name: str, iterations: int, runs: Path, quick: bool, seed: int, extra: dict | None = None) -> dict:
    overrides = {**PAPER, **AGENTS[name], **(extra or {}), "iterations": iterations, "seed": seed, "progress": False,
                 "checkpoint_every": max(1, iterations // 10)}
    if quick:
        overrides.update({"batch.meta_batch": 2, "batch.trajectories_per_task": 2, "eval_tasks": 3,
                          "incontext.meta_batch": 2, "incontext.trials_per_task": 1, "incontext.minibatches": 1})
    config = build_config(TrainConfig, None, overrides)
    run_dir = runs / f"{name}-seed{seed}{'-quick' if quick else ''}"
    check_same_run(run_dir, config)
    # an interrupted reproduction continues from its last checkpoint (same result as one uninterrupted run)
    result = run_training(config, run_dir, resume=latest_checkpoint(run_dir) is not None)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_wall = metrics[-1]["time/wall_s"] if metrics else 0.0
    return {"agent": name, "iterations": iterations, "seed": seed, "run_dir": str(run_dir),
            "wall_clock_s": train_wall, "config": overrides,
            "train_curve_step_1": [m["adapt/return_step_1"] for m in metrics if "adapt/return_step_1" in m],
            "gradient_steps": [s["mean"] for s in result["gradient_steps"]],
            "gradient_steps_ci95": [s["ci95"] for s in result["gradient_steps"]],
            "incontext_episodes": [s["mean"] for s in result["incontext_episodes"]]}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"2D navigation (PointNav, horizon 100), 40 held-out tasks; machine: {m['cpu']}, {m['cpu_count']} cores, "
             f"torch {m['torch']}. Return after 0 / 1 / 2 / 3 inner gradient steps"
             + (" (quick run: tiny budget, not a result)" if result["quick"] else "") + ".", "",
             "| agent | iterations | after 0 | after 1 | after 2 | after 3 | in-context episodes | wall clock |",
             "|---|---|---|---|---|---|---|---|"]
    for name, values in PUBLISHED.items():
        cells = [f"{v:g}" for v in values] + [""] * (4 - len(values))
        lines.append(f"| {name} (published) | up to 500 | " + " | ".join(cells) + " | | |")
    for r in result["runs"]:
        steps = " | ".join(f"{v:.2f}" for v in r["gradient_steps"]) if r["gradient_steps"] else " | ".join(["n/a"] * 4)
        episodes = ", ".join(f"{v:.2f}" for v in r["incontext_episodes"])
        label = r["agent"] + (" (first-order)" if r["config"].get("maml.first_order") else "")
        seed = f" (seed {r['seed']})" if len(result.get("seeds", [0])) > 1 else ""
        lines.append(f"| metarl {label}{seed} | {r['iterations']} | {steps} | {episodes} | "
                     f"{r['wall_clock_s'] / 60:.1f} min |")
    for name, mean in seed_means(result["runs"]).items():
        lines.append(f"| metarl {name}, mean of {mean['seeds']} seeds | | "
                     + " | ".join(f"{v:.2f}" for v in mean["gradient_steps"]) + " | | |")
    return "\n".join(lines) + "\n"


def seed_means(runs: list[dict]) -> dict[str, dict]:
    """Per agent run with several seeds: the mean over seeds of each point of its gradient-step curve."""
    by_agent: dict[str, list[dict]] = {}
    for r in runs:
        by_agent.setdefault(r["agent"], []).append(r)
    return {name: {"seeds": len(rs), "gradient_steps": [sum(v) / len(v) for v in zip(*(r["gradient_steps"] for r in rs))]}
            for name, rs in by_agent.items() if len(rs) > 1 and rs[0]["gradient_steps"]}


def main() -> None:
    parser = benchmark_parser(__doc__, "tiny budget (a smoke test, not a result)")
    parser.add_argument("--iterations", type=int, default=500, help="meta-iterations per agent (the paper: up to 500)")
    parser.add_argument("--agents", default="mlp", help=f"comma-separated, from {sorted(AGENTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each agent trains once per seed")
    parser.add_argument("--runs", default="runs/reproduce_maml", help="parent folder of the run directories")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every agent, e.g. maml.task_chunk=4 (repeatable)")
    args = parser.parse_args()
    names = [a.strip() for a in args.agents.split(",") if a.strip()]
    unknown = sorted(set(names) - set(AGENTS))
    if unknown:
        parser.error(f"unknown agent(s) {unknown}; choose from {sorted(AGENTS)}")
    iterations = 2 if args.quick else args.iterations
    seeds = [int(v) for v in args.seeds.split(",")]
    extra = parse_sets(args.set)
    runs = [run_agent(name, iterations, Path(args.runs), args.quick, seed, extra) for name in names for seed in seeds]
    result = {"benchmark": "reproduce_maml", "quick": args.quick, "machine": machine_info(), "published": PUBLISHED,
              "target": "after 1 step >= -11.7", "seeds": seeds, "overrides": extra, "runs": runs}
    result["seed_means"] = seed_means(runs)
    write_results(result, args.out, markdown(result), args.markdown)


if __name__ == "__main__":
    main()

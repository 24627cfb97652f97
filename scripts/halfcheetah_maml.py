"""MAML on HalfCheetahVel / HalfCheetahDir at a budget sized to a small CPU machine, next to the published numbers.

    python scripts/halfcheetah_maml.py --family vel --out docs/results/halfcheetah_vel.json \
        --markdown docs/results/halfcheetah_vel.md [--iterations 100] [--quick]

Runs `metarl train` with explicit flags (printed and stored in the JSON), so the run can be repeated by hand; a rerun
resumes an interrupted run from its last checkpoint. The published numbers (Finn et al. 2017: horizon 200, meta-batch
40, 20 trajectories per task, MLP 2x100, up to 500 meta-iterations) come from `../shared/ANCHORS.md`. The budget here
is far smaller (horizon, meta-batch, trajectories, iterations), so the numbers are not directly comparable: the
point is the pre- to post-adaptation change on held-out tasks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from metarl.checkpoint import latest_checkpoint
from metarl.machine import benchmark_parser, machine_info, write_results

PUBLISHED = {  # return after 0 / 1 / 2 / 3 gradient steps, horizon 200
    "vel": {"MAML-TRPO (Finn et al. 2017)": [-129.5, -78.6, -66.6, -60.8], "pretrained": [-158.0, -135.4, -128.5, -133.6],
            "oracle": [-54.5]},
    "dir": {"MAML-TRPO (Finn et al. 2017)": [-50.7, 293.2, 313.5, 315.7], "pretrained": [-43.0, None, None, 19.6],
            "oracle": [442.7]},
}
FAMILY = {"vel": "half-cheetah-vel", "dir": "half-cheetah-dir"}


def flags(family: str, iterations: int, horizon: int, quick: bool) -> list[str]:
    budget = {"meta-batch": 2, "trajectories": 2, "eval-tasks": 2} if quick else \
        {"meta-batch": 10, "trajectories": 10, "eval-tasks": 20}
    return ["--env", FAMILY[family], "--env-options", f"horizon={horizon}", "--agent", "maml-mlp",
            "--iterations", str(iterations), "--seed", "0", "--checkpoint-every", "5", "--no-progress",
            "--batch.meta-batch", str(budget["meta-batch"]), "--batch.trajectories-per-task", str(budget["trajectories"]),
            "--maml.inner-lr", "0.1", "--maml.gamma", "0.99", "--maml.gae-lambda", "1.0", "--outer.method", "trpo",
            "--outer.max-kl", "0.01", "--mlp.hidden", "64,64", "--mlp.activation", "tanh",
            "--eval-tasks", str(budget["eval-tasks"]), "--eval-steps", "3"]


def markdown(result: dict) -> str:
    steps = " / ".join(f"{x:.1f}" for x in result["gradient_steps"])
    wall = f"training {result['train_wall_s'] / 60:.1f} min"
    if not result.get("resumed"):  # a resumed run's own wall clock covers only its last part
        wall += f", {result['wall_clock_s'] / 60:.1f} min with evaluation"
    lines = [f"# MAML on {result['family']} ({'quick run' if result['quick'] else 'this machine'})", "",
             f"Return on {result['eval_tasks']} held-out (test split) tasks after 0 / 1 / 2 / 3 gradient steps.", "",
             "| run | horizon | budget | wall clock | return 0 / 1 / 2 / 3 steps |", "|---|---|---|---|---|",
             f"| metarl (this run) | {result['horizon']} | {result['budget']} | {wall} | {steps} |"]
    for name, values in result["published"].items():
        shown = " / ".join("..." if v is None else f"{v:g}" for v in values)
        lines.append(f"| {name} | 200 | meta-batch 40 x 20 trajectories, up to 500 iterations | - | {shown} |")
    curve0 = [x for x in result["train_curve_step_0"] if x is not None]
    if len(curve0) >= 10:
        first, last = sum(curve0[:5]) / 5, sum(curve0[-5:]) / 5
        lines += ["", f"Training tasks, return before adaptation: {first:.1f} (mean of the first 5 iterations) -> "
                      f"{last:.1f} (last 5); {result['env_steps']:,} env steps in all."]
    lines += ["", f"Command: `{result['command']}`", "",
              f"Returns are sums over the horizon, so at horizon {result['horizon']} they are not on the published "
              "numbers' scale (horizon 200). Observations are Gymnasium v5's HalfCheetah (17-d), not the 2017 code's "
              "20-d; the budget is far below the paper's, so compare the change from 0 to 1 step rather than the "
              "absolute numbers."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__, "two tiny iterations (smoke test)")
    parser.add_argument("--family", choices=sorted(FAMILY), default="vel")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    iterations = 2 if args.quick else args.iterations
    horizon = 10 if args.quick else args.horizon
    run_dir = Path(args.run_dir or f"runs/halfcheetah-{args.family}{'-quick' if args.quick else ''}")
    cmd = [sys.executable, "-m", "metarl", "train", *flags(args.family, iterations, horizon, args.quick)]
    resumed = latest_checkpoint(run_dir) is not None
    cmd += ["--resume", str(run_dir)] if resumed else ["--run-dir", str(run_dir)]
    shown = "metarl train " + " ".join(cmd[4:])
    print(shown, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    evaluation = json.loads((run_dir / "eval.json").read_text())["results"][0]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    meta_batch, trajectories = (2, 2) if args.quick else (10, 10)
    env_steps = metrics[-1].get("env_steps", None) if metrics else None
    result = {"benchmark": "halfcheetah_maml", "family": "HalfCheetah" + args.family.capitalize(), "quick": args.quick,
              "horizon": horizon, "iterations": iterations, "meta_batch": meta_batch, "trajectories_per_task": trajectories,
              "budget": f"{iterations} iterations x meta-batch {meta_batch} x {trajectories} trajectories, MLP 2x64 tanh",
              "env_steps": env_steps, "eval_tasks": evaluation["num_tasks"], "command": shown,
              "wall_clock_s": wall, "resumed": resumed, "train_wall_s": metrics[-1]["time/wall_s"] if metrics else 0.0,
              "gradient_steps": [s["mean"] for s in evaluation["gradient_steps"]],
              "gradient_steps_ci95": [s["ci95"] for s in evaluation["gradient_steps"]],
              "train_curve_step_0": [m.get("adapt/return_step_0") for m in metrics],
              "train_curve_step_1": [m.get("adapt/return_step_1") for m in metrics],
              "published": PUBLISHED[args.family], "machine": machine_info()}
    write_results(result, args.out, markdown(result), args.markdown)


if __name__ == "__main__":
    main()

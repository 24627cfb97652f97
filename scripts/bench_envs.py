"""Env-steps/s of every batched task family vs its single env under Gymnasium's SyncVectorEnv.

    python scripts/bench_envs.py --out bench-envs.json [--quick] [--markdown docs/benchmarks/envs.md] [--device cuda]

Random actions (a pre-drawn pool, cycled); default env settings (action validation on, next-step autoreset).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch

import metarl
from metarl.evaluation import random_actions
from metarl.machine import benchmark_parser, machine_info, write_results

BATCHED_N = (1, 64, 1024, 16384)
SYNC_N = (64, 1024)


def _rate(step: Callable[[int], None], n: int, min_time: float) -> float:
    """Env-steps/s of `step(k)` (one step of n envs), timed for at least `min_time` seconds after a warm-up."""
    for k in range(3):
        step(k)
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_time:
        for _ in range(10):
            step(steps)
            steps += 1
    return n * steps / elapsed


def bench_batched(family: metarl.TaskFamily, n: int, device: str, min_time: float) -> float:
    env = family.make_vec(family.sample(n, 0), device=device)
    env.reset(seed=0)
    gen = torch.Generator(device=env.device)
    gen.manual_seed(0)
    pool = [random_actions(env, gen) for _ in range(16)]
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)

    def step(k: int) -> None:
        env.step(pool[k % 16])

    rate = _rate(step, n, min_time)
    sync()
    return rate


def bench_sync(make_env: Callable[[], gym.Env], n: int, min_time: float) -> float:
    env = gym.vector.SyncVectorEnv([make_env for _ in range(n)])
    env.reset(seed=0)
    env.action_space.seed(0)
    pool = [env.action_space.sample() for _ in range(16)]
    return _rate(lambda k: env.step(pool[k % 16]), n, min_time)


def run(quick: bool, device: str) -> dict:
    min_time = 0.3 if quick else 2.0
    rows = []
    for name in metarl.family_names():
        family = metarl.make_family(name)
        if getattr(family.vec_env_cls, "host_envs", False):  # Gymnasium-backed (adapter) families: scripts/bench_adapter.py
            continue
        task = family.default()
        row: dict = {"family": name, "batched": {}, "sync_vector_env": {}}
        for n in BATCHED_N:
            row["batched"][str(n)] = bench_batched(family, n, device, min_time)
        for n in SYNC_N:
            row["sync_vector_env"][str(n)] = bench_sync(lambda family=family, task=task: family.make(task), n, min_time)
        row["speedup_vs_sync"] = {str(n): row["batched"][str(n)] / row["sync_vector_env"][str(n)] for n in SYNC_N}
        rows.append(row)
        print(json.dumps(row))
    reference = {}
    for env_id in ("CartPole-v1", "Pendulum-v1"):
        reference[env_id] = {str(n): bench_sync(lambda env_id=env_id: gym.make(env_id), n, min_time) for n in SYNC_N}
        print(env_id, json.dumps(reference[env_id]))
    return {"benchmark": "envs", "quick": quick, "device": device, "machine": machine_info(),
            "unit": "env-steps/s", "families": rows, "gymnasium_sync_vector_env": reference,
            "targets": {"PointNav batched N=16384": ">= 1e7", "PointNav speedup vs SyncVectorEnv at N=1024": ">= 100"}}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} ({result['device']}). "
             f"Env-steps/s, random actions{' (quick run)' if result['quick'] else ''}.", "",
             "| family | batched N=1 | N=64 | N=1024 | N=16384 | SyncVectorEnv N=64 | SyncVectorEnv N=1024 | "
             "speedup N=64 | speedup N=1024 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["families"]:
        b, s, x = r["batched"], r["sync_vector_env"], r["speedup_vs_sync"]
        lines.append(f"| {r['family']} | " + " | ".join(f"{b[str(n)]:,.0f}" for n in BATCHED_N) + " | "
                     + " | ".join(f"{s[str(n)]:,.0f}" for n in SYNC_N) + " | "
                     + " | ".join(f"{x[str(n)]:,.0f}x" for n in SYNC_N) + " |")
    for env_id, s in result["gymnasium_sync_vector_env"].items():
        lines.append(f"| Gymnasium {env_id} | | | | | {s['64']:,.0f} | {s['1024']:,.0f} | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__, "short timings (a smoke test)")
    parser.add_argument("--device", default="cpu", help="torch device of the batched envs")
    args = parser.parse_args()
    result = run(args.quick, args.device)
    write_results(result, args.out, markdown(result), args.markdown)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

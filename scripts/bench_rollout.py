"""Rollout speed with the Transformer policy: cached step mode vs re-encoding the history, shared vs per-task.

    python scripts/bench_rollout.py --out bench-rollout.json [--quick] [--markdown FILE] [--device cuda]

1. Collection: env-steps/s of `metarl.rollout.collect` on PointNav (horizon 100, one episode per trial) at
   N = 1024 tasks with the Transformer (2 layers, d_model 64, context 200) and the MLP (2x100), shared or
   per-task (vmapped) parameters; and the Transformer with per-task parameters in MAML's layout (64 tasks x 16
   rollouts, also 1024 sub-envs).
2. Per-step cost at a history of h = 50, 100, 200 steps, batch 1024: one cached step (cache holding h steps)
   vs one sequence-mode pass re-encoding all h steps (what a policy without a cache does every step).
"""

from __future__ import annotations

import json
import time

import torch
from torch.func import stack_module_state

import metarl
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.agents.transformer import TransformerConfig, TransformerPolicy
from metarl.machine import benchmark_parser, machine_info, write_results
from metarl.rollout import collect, make_rollout_env

N = 1024
HISTORIES = (50, 100, 200)


def _timed(fn, repeat: int, device: torch.device) -> float:
    """Seconds per call of fn (after one warm-up call)."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def make_policy(kind: str, family, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "transformer":
        policy = TransformerPolicy(family.observation_space, family.action_space,
                                   TransformerConfig(n_layers=2, d_model=64, n_heads=4, context=200))
    else:
        policy = MLPPolicy(family.observation_space, family.action_space, MLPConfig(hidden=(100, 100)))
    return policy.to(device)


def bench_collect(kind: str, per_task: bool, n: int, device: torch.device, repeat: int, rollouts: int = 1) -> float:
    """env-steps/s of collecting one episode on each of n * rollouts sub-envs: n tasks, `rollouts` per task."""
    family = metarl.make_family("PointNav", horizon=100)
    policy = make_policy(kind, family, device)
    params = None
    if per_task:
        params, _ = stack_module_state([make_policy(kind, family, device, seed) for seed in range(n)])
    env = make_rollout_env(family, family.sample(n, 0), rollouts, device=device)
    seconds = _timed(lambda: collect(policy, env, num_tasks=n, params=params, per_task=per_task, seed=0), repeat, device)
    return n * rollouts * family.horizon / seconds


@torch.no_grad()
def bench_step_vs_reencode(h: int, n: int, device: torch.device, repeat: int) -> dict[str, float]:
    family = metarl.make_family("PointNav", horizon=h)
    policy = make_policy("transformer", family, device)
    obs = torch.randn(n, h, 2, device=device) * 0.3
    prev_action = torch.randn(n, h, 2, device=device) * 0.05
    prev_reward = -torch.rand(n, h, device=device)
    start = torch.zeros(n, h, dtype=torch.bool, device=device)
    start[:, 0] = True
    cache = policy.initial_cache(n, device, torch.float32)
    for t in range(h - 1):  # fill the cache with h - 1 steps; the timed step is step h
        policy(obs[:, t], prev_action[:, t], prev_reward[:, t], start[:, t], cache=cache, inplace=True)

    def cached_step() -> None:  # as in a rollout: the cache is updated in place
        policy(obs[:, -1], prev_action[:, -1], prev_reward[:, -1], start[:, -1], cache=cache, inplace=True)

    def reencode() -> None:
        policy(obs, prev_action, prev_reward, start)

    step_s = _timed(cached_step, repeat, device)
    seq_s = _timed(reencode, max(1, repeat // 10), device)
    return {"history": h, "cached_step_ms": 1e3 * step_s, "reencode_step_ms": 1e3 * seq_s, "speedup": seq_s / step_s}


def run(quick: bool, device: torch.device) -> dict:
    repeat = 1 if quick else 3
    collect_rows = []
    for kind in ("transformer", "mlp"):
        for per_task in (False, True):
            rate = bench_collect(kind, per_task, N, device, repeat)
            collect_rows.append({"policy": kind, "params": "per-task" if per_task else "shared", "env_steps_per_s": rate})
            print(json.dumps(collect_rows[-1]))
    # MAML's layout: fewer tasks, several rollouts each (the same 1024 sub-envs); each task's weights serve 16 rows
    rate = bench_collect("transformer", True, N // 16, device, repeat, rollouts=16)
    collect_rows.append({"policy": "transformer", "params": f"per-task, {N // 16} tasks x 16 rollouts",
                         "env_steps_per_s": rate})
    print(json.dumps(collect_rows[-1]))
    step_rows = []
    for h in HISTORIES:
        step_rows.append(bench_step_vs_reencode(h, N, device, 5 if quick else 20))
        print(json.dumps(step_rows[-1]))
    return {"benchmark": "rollout", "quick": quick, "device": str(device), "machine": machine_info(), "num_tasks": N,
            "collect": collect_rows, "step_vs_reencode": step_rows,
            "targets": {"transformer shared": ">= 100k env-steps/s", "cached vs re-encode at 200": ">= 10x",
                        "per-task vs shared": "<= 2x slower"}}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} ({result['device']}); "
             f"{result['num_tasks']} tasks{' (quick run)' if result['quick'] else ''}.", "",
             "| policy | parameters | env-steps/s (PointNav, collect) |", "|---|---|---|"]
    lines += [f"| {r['policy']} | {r['params']} | {r['env_steps_per_s']:,.0f} |" for r in result["collect"]]
    lines += ["", "| history (steps) | cached step (ms) | re-encode history (ms) | speedup |", "|---|---|---|---|"]
    lines += [f"| {r['history']} | {r['cached_step_ms']:.2f} | {r['reencode_step_ms']:.1f} | {r['speedup']:.0f}x |"
              for r in result["step_vs_reencode"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__, "fewer repetitions (a smoke test)")
    parser.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args()
    result = run(args.quick, torch.device(args.device))
    write_results(result, args.out, markdown(result), args.markdown)


if __name__ == "__main__":
    main()

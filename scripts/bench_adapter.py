"""Overhead of the Gymnasium adapter against a raw `gymnasium.vector.SyncVectorEnv` on HalfCheetah-v5.

    python scripts/bench_adapter.py --out docs/results/bench_adapter.json --markdown docs/results/bench_adapter.md [--quick]

Both sides run the same `gym.make("HalfCheetah-v5")` envs in Gymnasium's `SyncVectorEnv` (next-step autoreset):
the raw side steps it with numpy actions; the adapter (a family with one task parameter, the forward reward weight,
set as an attribute) takes torch actions, checks them, and returns torch tensors. Each repeat times `reset` + `steps`
steps with pre-drawn random actions; repeats alternate raw / adapter so that machine load hits both alike, and the
overhead is the median over repeats of (adapter time / raw time) - 1 (target <= 15%). On a loaded machine single
repeats vary by tens of percent, so the script also times the adapter's own work in isolation: the numpy <-> torch
conversion and action check per vector step, and the single-env wrapper per sub-env step (around an inner env that
replays one transition), against the raw env step (best of several repeats, close to the unloaded speed).
"""

from __future__ import annotations

import statistics
import time
import timeit

import gymnasium as gym
import numpy as np
import torch

from metarl.distributions import Uniform
from metarl.envs.gym_adapter import GymParam, gym_family
from metarl.envs.mujoco import quiet_mujoco_warnings
from metarl.machine import benchmark_parser, machine_info, write_results

ENV_ID = "HalfCheetah-v5"
SIZES = (8, 32)
TARGET = 0.15


def adapter_family():
    weight = GymParam("forward_reward_weight", Uniform(0.5, 1.5), apply="attribute", target="_forward_reward_weight")
    return gym_family("HalfCheetahWeight", ENV_ID, [weight])


def time_run(env, actions: list, seed: int) -> float:
    start = time.perf_counter()
    env.reset(seed=seed)
    for a in actions:
        env.step(a)
    return time.perf_counter() - start


def bench_size(n: int, steps: int, repeats: int) -> dict:
    family = adapter_family()
    raw = gym.vector.SyncVectorEnv([lambda: gym.make(ENV_ID) for _ in range(n)])
    adapted = family.make_vec(family.sample(n, 0), vectorization="sync")
    rng = np.random.default_rng(0)
    np_actions = [rng.uniform(-1, 1, size=(n, 6)).astype(np.float32) for _ in range(steps)]
    torch_actions = [torch.from_numpy(a.copy()) for a in np_actions]
    raw_s, adapter_s = [], []
    time_run(raw, np_actions[:10], 0), time_run(adapted, torch_actions[:10], 0)  # warm up
    for r in range(repeats):
        raw_s.append(time_run(raw, np_actions, r))
        adapter_s.append(time_run(adapted, torch_actions, r))
    parts = component_us(adapted, torch_actions[0], np_actions[0][0])
    raw.close(), adapted.close()
    raw_med, adapter_med = statistics.median(raw_s), statistics.median(adapter_s)
    return {"num_envs": n, "steps": steps, "repeats": repeats, "raw_s": raw_s, "adapter_s": adapter_s,
            "raw_env_steps_per_s": n * steps / raw_med, "adapter_env_steps_per_s": n * steps / adapter_med,
            "overhead": statistics.median(a / r for a, r in zip(adapter_s, raw_s)) - 1.0, **parts,
            "component_overhead": (parts["conversion_us_per_step"] + n * parts["wrapper_us_per_sub_env_step"])
            / (n * parts["raw_us_per_sub_env_step"])}


def component_us(adapted, action: torch.Tensor, single_action: np.ndarray) -> dict:
    """Microseconds of the adapter's own work: conversions + action check per vector step, wrapper per sub-env step."""
    n = adapted.num_envs
    obs, reward, done = np.zeros((n, 17)), np.zeros(n), np.zeros(n, dtype=bool)

    def convert() -> None:
        adapted._host_action(action)
        adapted._tensor(obs, np.float32), adapted._tensor(reward, np.float32)
        adapted._tensor(done, np.bool_), adapted._tensor(done, np.bool_)

    def best(fn, number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6

    env = adapted.envs.envs[0]
    env.reset(seed=0)
    inner = env.env
    raw_step = best(lambda: inner.step(single_action), 200)
    env.env = _Replay(inner.step(single_action))  # the wrapper alone, around an env that costs nothing
    wrapper = best(lambda: env.step(single_action), 2000)
    env.env = inner
    return {"conversion_us_per_step": best(convert, 2000), "wrapper_us_per_sub_env_step": wrapper,
            "raw_us_per_sub_env_step": raw_step}


class _Replay:
    """Stands in for the inner env: `step` returns one recorded transition."""

    def __init__(self, transition: tuple) -> None:
        self.transition = transition

    def step(self, action) -> tuple:
        return self.transition


def run(quick: bool) -> dict:
    quiet_mujoco_warnings()
    torch.set_num_threads(1)
    steps, repeats = (50, 2) if quick else (300, 15)
    rows = [bench_size(n, steps, repeats) for n in SIZES]
    return {"benchmark": "adapter_overhead", "env": ENV_ID, "quick": quick, "target_overhead": TARGET, "sizes": rows,
            "gymnasium": gym.__version__, "machine": machine_info()}


def markdown(result: dict) -> str:
    lines = [f"# Gymnasium adapter overhead on {result['env']}{' (quick run)' if result['quick'] else ''}", "",
             "Env-steps/s (median of interleaved repeats of reset + steps with random actions), raw "
             "`gymnasium.vector.SyncVectorEnv` vs the adapter in Sync mode (torch in/out, action checks on); "
             f"target overhead <= {result['target_overhead']:.0%}.", "",
             "| envs | steps x repeats | raw SyncVectorEnv | adapter | overhead (median of paired repeats) | "
             "conversion + check per step | wrapper per sub-env step | raw env step | overhead from components |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["sizes"]:
        lines.append(f"| {row['num_envs']} | {row['steps']} x {row['repeats']} | {row['raw_env_steps_per_s']:,.0f} | "
                     f"{row['adapter_env_steps_per_s']:,.0f} | {row['overhead']:+.1%} | "
                     f"{row['conversion_us_per_step']:.1f} us | {row['wrapper_us_per_sub_env_step']:.1f} us | "
                     f"{row['raw_us_per_sub_env_step']:.1f} us | {row['component_overhead']:+.1%} |")
    lines += ["", f"Machine: {result['machine']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = benchmark_parser(__doc__, "a few short repeats (smoke test)").parse_args()
    result = run(args.quick)
    write_results(result, args.out, markdown(result), args.markdown)


if __name__ == "__main__":
    main()

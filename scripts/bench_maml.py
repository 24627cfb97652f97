"""Speed of one second-order MAML meta-gradient: batched torch.func vs a per-task loop, `higher` and `torchopt`.

    python scripts/bench_maml.py --out bench-maml.json [--quick] [--markdown FILE] [--threads K] [--profile]
        [--trajectories 20] [--task-chunk 4]

One meta-iteration's adaptation and outer gradient: one inner vanilla policy-gradient step (lr 0.1, linear
baseline advantages) on each task's support trajectories, then the gradient of the outer TRPO surrogate on the
query trajectories w.r.t. the shared parameters, through the inner step (second order). PointNav data
(horizon 100, 20 trajectories per task) is collected once with `metarl.rollout.collect`: support with the shared
parameters, query with each task's adapted parameters. Meta-batches of 20 and 40 tasks, float32, for the MLP
(2x100 ReLU) and the Transformer (2 layers, d_model 64, context 100, attention "math").

Variants:
- batched: `adapt` (one vmap(grad) over tasks) + `outer_surrogate` + torch.autograd.grad;
- batched_chunked: the same with `MAMLConfig.task_chunk` tasks per vectorised call (default 4), which keeps each
  chunk's activations in cache on a CPU;
- per_task_loop: a Python loop over tasks with torch.autograd.grad(create_graph=True);
- higher: `higher.innerloop_ctx` with a differentiable SGD per task;
- torchopt: `torchopt.MetaSGD` per task with extract/recover of the module state, as in its MAML-RL example.
Each variant's meta-gradient is checked against the batched one; its time is the median over repeats after a
warm-up call. `higher` and `torchopt` are optional (the `bench` extra); when one is missing or fails, the JSON
records why.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor
from torch.func import functional_call

import metarl
from metarl.agents.maml import MAMLConfig, adapt, outer_surrogate, support_advantages
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.agents.policy import HistoryPolicy, PolicyOutput
from metarl.agents.transformer import TransformerConfig, TransformerPolicy
from metarl.machine import benchmark_parser, machine_info, write_results
from metarl.rollout import collect, make_rollout_env
from metarl.trajectories import Trajectories

Params = dict[str, Tensor]
POLICIES = ("mlp", "transformer")
VARIANTS = ("batched", "batched_chunked", "per_task_loop", "higher", "torchopt")
BATCHED = ("batched", "batched_chunked")
HORIZON = 100
TARGET_SPEEDUP = 3.0
TASK_CHUNK = 4
"""Tasks per vectorised call of the batched_chunked variant (default of --task-chunk)."""
RTOL = 1e-3
"""A variant's meta-gradient matches when max |g - g_batched| <= RTOL * max |g_batched| (float32)."""


@dataclass(frozen=True)
class Problem:
    """One meta-iteration's inputs: the policy (its parameters are the shared ones), support and query data."""

    policy: HistoryPolicy
    support: Trajectories  # [N, E, T, ...]
    query: Trajectories  # [N, E, T, ...]
    advantages: Tensor  # (N, E, T) query advantages, constants
    config: MAMLConfig

    def select(self, n: int) -> Problem:
        """The first `n` tasks."""
        return Problem(self.policy, self.support.select_tasks(slice(0, n)), self.query.select_tasks(slice(0, n)),
                       self.advantages[:n], self.config)


@dataclass(frozen=True)
class TaskBatch:
    """One task's data for the per-task loops: trial sequences with zeros at padding, and per-valid-step targets."""

    inputs: tuple[Tensor, ...]  # obs, prev_action, prev_reward, episode_start, each (trials, L, ...)
    valid: Tensor  # (trials, L)
    actions: Tensor  # (V, A) at the valid steps
    weights: Tensor  # (V,) advantages at the valid steps
    old_log_probs: Tensor  # (V,)


def make_policy(kind: str, family: metarl.TaskFamily, seed: int = 0) -> HistoryPolicy:
    torch.manual_seed(seed)
    if kind == "transformer":
        config = TransformerConfig(n_layers=2, d_model=64, n_heads=4, context=HORIZON, attention="math")
        return TransformerPolicy(family.observation_space, family.action_space, config)
    return MLPPolicy(family.observation_space, family.action_space, MLPConfig(hidden=(100, 100), activation="relu"))


def make_problem(kind: str, num_tasks: int, trajectories: int, config: MAMLConfig) -> Problem:
    """Support rollouts with the shared parameters, query rollouts with each task's adapted parameters."""
    family = metarl.make_family("PointNav", horizon=HORIZON)
    policy = make_policy(kind, family)
    env = make_rollout_env(family, family.sample(num_tasks, 0), trajectories)
    support = collect(policy, env, num_tasks=num_tasks, seed=1)
    with torch.no_grad():
        adapted = adapt(policy, {k: v.detach() for k, v in policy.named_parameters()}, support, config)
    query = collect(policy, env, num_tasks=num_tasks, params=adapted, per_task=True, seed=2)
    return Problem(policy, support, query, support_advantages(query, config), config)


def shared_leaves(policy: HistoryPolicy) -> Params:
    return {k: v.detach().clone().requires_grad_(True) for k, v in policy.named_parameters()}


# --- (a) batched ---------------------------------------------------------------------------------------------------------


def batched_meta_gradient(prob: Problem, chunked: bool = False) -> Params:
    """`adapt` + `outer_surrogate` + one torch.autograd.grad to the shared parameters; all tasks in one vmap call, or
    with `chunked` `prob.config.task_chunk` tasks per call."""
    config = prob.config if chunked else replace(prob.config, task_chunk=None)
    leaves = shared_leaves(prob.policy)
    adapted = adapt(prob.policy, leaves, prob.support, config)
    loss = outer_surrogate(prob.policy, adapted, prob.query, prob.query.log_probs, prob.advantages,
                           task_chunk=config.task_chunk)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads))


# --- per-task loops ------------------------------------------------------------------------------------------------------


def task_batch(traj: Trajectories, weights: Tensor, old_log_probs: Tensor) -> TaskBatch:
    """One task's trajectories (fields ``[E, T, ...]``) regrouped into its trials, padding zeroed."""
    e, t = traj.valid.shape
    k = traj.episodes_per_trial
    valid = traj.valid.reshape(e // k, k * t)  # (trials, L)
    inputs = []
    for x in (traj.obs, traj.prev_action, traj.prev_reward, traj.episode_start):
        x = x.reshape(e // k, k * t, *x.shape[2:]).clone()  # (trials, L, ...)
        x[~valid] = 0
        inputs.append(x)
    return TaskBatch(tuple(inputs), valid, traj.actions[traj.valid], weights[traj.valid], old_log_probs[traj.valid])


def task_batches(prob: Problem) -> list[tuple[TaskBatch, TaskBatch]]:
    """(support, query) of every task; the support weights are the inner advantages."""
    support_adv = support_advantages(prob.support, prob.config)  # (N, E, T)
    zeros = torch.zeros_like(support_adv)
    return [(task_batch(prob.support.select_tasks(i), support_adv[i], zeros[i]),
             task_batch(prob.query.select_tasks(i), prob.advantages[i], prob.query.log_probs[i]))
            for i in range(prob.support.num_tasks)]


def valid_log_probs(policy: HistoryPolicy, out: PolicyOutput, batch: TaskBatch) -> Tensor:
    """log pi(a) at the valid steps, (V,)."""
    return policy.log_prob(PolicyOutput(*(x[batch.valid] for x in out)), batch.actions)


def inner_objective(logp: Tensor, batch: TaskBatch) -> Tensor:
    return -(logp * batch.weights).mean()


def outer_objective(logp: Tensor, batch: TaskBatch) -> Tensor:
    return -(torch.exp(logp - batch.old_log_probs) * batch.weights).mean()


def call(policy: HistoryPolicy, batch: TaskBatch, params: Params | None = None) -> PolicyOutput:
    """Sequence-mode outputs ``[trials, L, ...]`` with `params` (default: the module's own)."""
    kwargs = {"valid": batch.valid}
    return policy(*batch.inputs, **kwargs) if params is None else functional_call(policy, params, batch.inputs, kwargs)


def loop_meta_gradient(prob: Problem) -> Params:
    """(b) A Python loop over tasks: inner step by torch.autograd.grad(create_graph=True), one outer grad."""
    policy, lr = prob.policy, prob.config.inner_lr
    leaves = shared_leaves(policy)
    batches = task_batches(prob)
    total = torch.zeros(())
    for support, query in batches:
        inner = inner_objective(valid_log_probs(policy, call(policy, support, leaves), support), support)
        grads = torch.autograd.grad(inner, list(leaves.values()), create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        fast = {k: v - lr * g for (k, v), g in zip(leaves.items(), grads)}
        total = total + outer_objective(valid_log_probs(policy, call(policy, query, fast), query), query)
    grads = torch.autograd.grad(total / len(batches), list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads))


def module_meta_gradient(prob: Problem, total: Tensor) -> Params:
    names, params = zip(*prob.policy.named_parameters())
    return dict(zip(names, torch.autograd.grad(total, list(params), allow_unused=True, materialize_grads=True)))


def higher_meta_gradient(prob: Problem) -> Params:
    """(c) `higher`: a differentiable SGD step on a monkeypatched copy of the module, per task."""
    higher = importlib.import_module("higher")
    policy = prob.policy
    opt = torch.optim.SGD(policy.parameters(), lr=prob.config.inner_lr)
    batches = task_batches(prob)
    total = torch.zeros(())
    for support, query in batches:
        with higher.innerloop_ctx(policy, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(inner_objective(valid_log_probs(policy, fmodel(*support.inputs, valid=support.valid), support),
                                         support))
            out = fmodel(*query.inputs, valid=query.valid)
            total = total + outer_objective(valid_log_probs(policy, out, query), query)
    return module_meta_gradient(prob, total / len(batches))


def torchopt_meta_gradient(prob: Problem) -> Params:
    """(d) `torchopt.MetaSGD` on the module, its state extracted before and recovered after each task."""
    torchopt = importlib.import_module("torchopt")
    policy = prob.policy
    inner_opt = torchopt.MetaSGD(policy, lr=prob.config.inner_lr)
    policy_state, opt_state = torchopt.extract_state_dict(policy), torchopt.extract_state_dict(inner_opt)
    batches = task_batches(prob)
    total = torch.zeros(())
    try:
        for support, query in batches:
            inner_opt.step(inner_objective(valid_log_probs(policy, call(policy, support), support), support))
            total = total + outer_objective(valid_log_probs(policy, call(policy, query), query), query)
            torchopt.recover_state_dict(policy, policy_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
    finally:  # the shared parameters stay the module's, whatever happened
        torchopt.recover_state_dict(policy, policy_state)
    return module_meta_gradient(prob, total / len(batches))


META_GRADIENTS: dict[str, Callable[[Problem], Params]] = {
    "batched": batched_meta_gradient, "batched_chunked": partial(batched_meta_gradient, chunked=True),
    "per_task_loop": loop_meta_gradient,
    "higher": higher_meta_gradient, "torchopt": torchopt_meta_gradient,
}
LIBRARIES = {"higher": "higher", "torchopt": "torchopt"}


# --- timing and checks ---------------------------------------------------------------------------------------------------


def library_status() -> dict[str, dict[str, str]]:
    """Version of each optional library, or why it cannot be imported."""
    status = {}
    for name in LIBRARIES.values():
        try:
            importlib.import_module(name)
            status[name] = {"version": importlib.metadata.version(name)}
        except Exception as exc:  # recorded in the JSON instead of a number
            status[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return status


def timed(fn: Callable[[], Params], repeats: int) -> tuple[Params, list[float]]:
    """The result of a warm-up call, and the seconds of `repeats` further calls."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return result, seconds


def max_abs_diff(a: Params, b: Params) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def bench_variant(variant: str, prob: Problem, reference: Params | None, repeats: int) -> tuple[dict, Params | None]:
    """One row of the results (seconds, gradient check) and the variant's meta-gradient (None if it failed)."""
    row: dict = {"variant": variant}
    try:
        grads, seconds = timed(lambda: META_GRADIENTS[variant](prob), repeats)
    except Exception as exc:
        if variant not in LIBRARIES:
            raise
        row.update(seconds=None, error=f"{type(exc).__name__}: {str(exc)[:500]}")
        return row, None
    ref = grads if reference is None else reference
    scale = max(float(g.abs().max()) for g in ref.values())
    diff = max_abs_diff(grads, ref)
    row.update(seconds=statistics.median(seconds), repeats_s=seconds, max_abs_diff=diff, max_abs_grad=scale,
               grad_matches=diff <= RTOL * scale)
    return row, grads


def profile_ops(fn: Callable[[], Params], rows: int = 8) -> dict:
    """Where one call of `fn` spends its CPU time (torch.profiler): the top ops by self time, overall and per input
    shape, and the number of profiled events (ops and autograd nodes: a measure of dispatch overhead)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()

    def top(events: list) -> list[dict]:
        events = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
        return [{"op": e.key, "input_shapes": str(e.input_shapes) if e.input_shapes else "", "calls": e.count,
                 "self_ms": e.self_cpu_time_total / 1e3} for e in events]

    by_op = list(prof.key_averages())
    return {"self_cpu_s": sum(e.self_cpu_time_total for e in by_op) / 1e6, "profiler_events": sum(e.count for e in by_op),
            "top_ops": top(by_op), "top_ops_by_shape": top(list(prof.key_averages(group_by_input_shape=True)))}


def bench_case(kind: str, prob: Problem, repeats: int, libraries: dict[str, dict[str, str]]) -> list[dict]:
    """All variants on one (policy, meta-batch); speedups of batched over each."""
    rows, reference = [], None
    for variant in VARIANTS:
        if variant in LIBRARIES and "error" in libraries[variant]:
            rows.append({"variant": variant, "seconds": None, "error": libraries[variant]["error"]})
            continue
        row, grads = bench_variant(variant, prob, reference, repeats)
        reference = grads if variant == "batched" else reference
        rows.append(row)
    batched_s = rows[0]["seconds"]
    for row in rows:
        row.update(policy=kind, meta_batch=prob.support.num_tasks)
        row["speedup_of_batched"] = None if row["seconds"] is None else row["seconds"] / batched_s
        print(json.dumps({k: v for k, v in row.items() if k != "repeats_s"}), flush=True)
    return rows


def run(quick: bool, profile: bool = False, trajectories: int = 20, task_chunk: int = TASK_CHUNK) -> dict:
    meta_batches = (2, 4) if quick else (20, 40)
    trajectories = 2 if quick else trajectories
    repeats = 1 if quick else 3
    config = MAMLConfig(inner_lr=0.1, inner_steps=1, first_order=False, task_chunk=task_chunk)
    libraries = library_status()
    rows, profiles = [], {}
    for kind in POLICIES:
        problem = make_problem(kind, max(meta_batches), trajectories, config)
        for n in meta_batches:
            rows += bench_case(kind, problem.select(n), repeats, libraries)
        if profile:
            profiles[f"{kind} N={max(meta_batches)}"] = {
                v: profile_ops(partial(META_GRADIENTS[v], problem)) for v in ("batched", "batched_chunked", "per_task_loop")}
    met = {}
    for r in rows:
        if r["variant"] == "per_task_loop":  # the faster of the two batched variants against the loop
            best = min(b["seconds"] for b in rows if b["variant"] in BATCHED
                       and (b["policy"], b["meta_batch"]) == (r["policy"], r["meta_batch"]))
            met[f"{r['policy']} N={r['meta_batch']}"] = r["seconds"] / best >= TARGET_SPEEDUP
    return {
        "benchmark": "maml_meta_gradient", "quick": quick, "machine": machine_info(),
        "setup": {"family": "PointNav", "horizon": HORIZON, "trajectories_per_task": trajectories,
                  "meta_batches": list(meta_batches), "inner_steps": 1, "inner_lr": config.inner_lr,
                  "task_chunk": task_chunk,
                  "second_order": True, "dtype": "float32", "warmup_calls": 1, "repeats": repeats,
                  "timing": "median seconds per meta-iteration (adapt + outer loss + meta-gradient)",
                  "policies": {"mlp": "MLP 2x100 ReLU", "transformer": "Transformer 2 layers, d_model 64, 4 heads, "
                               "context 100, attention math"},
                  "gradient_check": f"max |g - g_batched| <= {RTOL} * max |g_batched|",
                  "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}},
        "libraries": libraries, "results": rows,
        "target": {"statement": f"batched >= {TARGET_SPEEDUP:g}x faster than the per-task loop on this CPU "
                                "(the faster of batched and batched_chunked)",
                   "met": met, "all_met": all(met.values())},
        "note": "wall-clock times on a shared, noisy machine",
    } | ({"profile": profiles} if profile else {})


def _cell(row: dict) -> str:
    if row["seconds"] is None:
        return "n/a"
    check = "" if row.get("grad_matches", True) else " (grad mismatch)"
    return f"{row['seconds']:.3f} s ({row['speedup_of_batched']:.1f}x){check}"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["setup"]
    lines = [f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
             f"PointNav, horizon {s['horizon']}, {s['trajectories_per_task']} trajectories per task, 1 inner step, "
             f"second order, float32; batched_chunked: {s['task_chunk']} tasks per vectorised call; median of "
             f"{s['repeats']}{' (quick run)' if result['quick'] else ''}. "
             "Seconds per meta-iteration (batched's speedup over it).", "",
             "| policy | tasks | " + " | ".join(VARIANTS) + " | max abs grad diff vs batched |",
             "|---|---|" + "---|" * (len(VARIANTS) + 1)]
    for kind in POLICIES:
        for n in s["meta_batches"]:
            rows = {r["variant"]: r for r in result["results"] if r["policy"] == kind and r["meta_batch"] == n}
            diffs = ", ".join(f"{v}: {rows[v]['max_abs_diff']:.1e}" for v in VARIANTS[1:] if rows[v]["seconds"] is not None)
            lines.append(f"| {kind} | {n} | " + " | ".join(_cell(rows[v]) for v in VARIANTS) + f" | {diffs} |")
    errors = {r["variant"]: r["error"] for r in result["results"] if r.get("error")}
    lines += [f"\n{name}: not run ({error})" for name, error in errors.items()]
    lines.append(f"\nTarget: {result['target']['statement']}: {'met' if result['target']['all_met'] else 'NOT met'}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__, "small meta-batches, 1 repeat (a smoke test)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--trajectories", type=int, default=20,
                        help="trajectories per task (the paper: 20; fewer shows the regime where per-task dispatch dominates)")
    parser.add_argument("--task-chunk", type=int, default=TASK_CHUNK,
                        help="tasks per vectorised call of the batched_chunked variant (MAMLConfig.task_chunk)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile batched and the per-task loop at the largest meta-batch (torch.profiler)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.quick, args.profile, args.trajectories, args.task_chunk)
    write_results(result, args.out, markdown(result), args.markdown)


if __name__ == "__main__":
    main()

"""MAML learner: per-task adaptation of a policy by gradient, outer TRPO or PPO steps on the meta-parameters."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from metarl.distributed import Shard, allreduce_grads_, allreduce_sum, is_distributed, shard_of, weighted_metrics
from metarl.family import TaskFamily
from metarl.rollout import collect, make_rollout_env
from metarl.seeding import derive_seed, iteration_generator
from metarl.tasks import Tasks
from metarl.trajectories import Trajectories
from metarl.trpo import trpo_step

from .maml import MAMLConfig, adapt, batched_policy_outputs, init_step_sizes, outer_kl, outer_surrogate, ppo_outer_loss
from .maml import support_advantages as linear_baseline_advantages
from .policy import HistoryPolicy
from .surface import SB3Surface

Params = dict[str, Tensor]
_STEP_PREFIX = "step_size/"


@dataclass(frozen=True)
class OuterConfig:
    """Outer-loop (meta-update) settings of MAML."""

    method: Literal["trpo", "ppo"] = "trpo"
    """Outer step: TRPO (natural gradient with a KL trust region, as published) or PPO-style clipped epochs."""
    max_kl: float = 0.01
    """TRPO: largest mean KL(old || new) of the adapted policies on the query data."""
    cg_iters: int = 10
    """TRPO: conjugate-gradient iterations for the natural-gradient direction."""
    cg_damping: float = 1e-5
    """TRPO: damping added to the Fisher-vector products."""
    ls_steps: int = 15
    """TRPO: backtracking line-search steps."""
    ls_ratio: float = 0.8
    """TRPO: step shrink factor per line-search step."""
    ppo_epochs: int = 5
    """PPO: epochs per iteration (each re-adapts from the support data)."""
    ppo_clip: float = 0.2
    """PPO: probability-ratio clip range."""
    lr: float = 3e-4
    """PPO: Adam learning rate."""
    max_grad_norm: float = 1.0
    """PPO: gradient-norm clip."""

    def __post_init__(self) -> None:
        if self.method not in ("trpo", "ppo"):
            raise ValueError(f"outer method must be 'trpo' or 'ppo', got {self.method!r}")
        if self.max_kl <= 0 or self.ppo_clip <= 0 or self.lr <= 0:
            raise ValueError(f"max_kl, ppo_clip and lr must be > 0, got {self.max_kl}, {self.ppo_clip}, {self.lr}")


@dataclass(frozen=True)
class MetaBatchConfig:
    """How much data one meta-iteration collects."""

    meta_batch: int = 20
    """Tasks per meta-iteration."""
    trajectories_per_task: int = 20
    """Parallel trials (trajectories) per task, for the support and again for the query data."""
    episodes_per_trial: int = 1
    """Consecutive episodes per trial; the Transformer's history runs through them (in-context adaptation)."""

    def __post_init__(self) -> None:
        if min(self.meta_batch, self.trajectories_per_task, self.episodes_per_trial) < 1:
            raise ValueError(f"meta_batch, trajectories_per_task, episodes_per_trial must be >= 1, got {self}")


def check_step_sizes(step_sizes: Sequence[float], meta_sgd: bool) -> list[float]:
    """`step_sizes` as a list of finite floats; raises for a bad value or when the step sizes are learned."""
    lrs = [float(v) for v in step_sizes]
    if lrs and meta_sgd:
        raise ValueError(f"step_sizes={lrs} cannot override the learned Meta-SGD step sizes (maml.meta_sgd is True)")
    if any(not math.isfinite(v) or v < 0 for v in lrs):
        raise ValueError(f"step sizes must be finite and >= 0, got {lrs}")
    return lrs


class MAMLLearner(SB3Surface):
    """MAML over task batches: support rollouts with the meta-parameters, one batched `adapt` for all tasks,
    query rollouts with the adapted parameters, then an outer TRPO or PPO step through the adaptation."""

    def __init__(self, policy: HistoryPolicy, family: TaskFamily, maml: MAMLConfig | None = None,
                 outer: OuterConfig | None = None, batch: MetaBatchConfig | None = None,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.policy = policy.to(device)
        self.family = family
        self.maml = maml or MAMLConfig()
        self.outer = outer or OuterConfig()
        self.batch = batch or MetaBatchConfig()
        self.device = torch.device(device)
        self.seed = seed
        self.env_steps = 0
        self.step_sizes = init_step_sizes(self._params(), self.maml) if self.maml.meta_sgd else None
        trainable = list(self.policy.parameters()) + list((self.step_sizes or {}).values())
        self.optimizer = torch.optim.Adam(trainable, lr=self.outer.lr) if self.outer.method == "ppo" else None
        self._env = None

    # ------------------------------------------------------------------ helpers
    def _params(self) -> Params:
        return dict(self.policy.named_parameters())

    def _rollout_env(self, tasks: Tasks, trials: int):
        """A persistent batched env for `len(tasks) * trials` sub-envs, given these tasks (task-major)."""
        repeated = tasks[torch.arange(len(tasks)).repeat_interleave(trials)]
        if self._env is None or self._env.num_envs != len(repeated):
            self._env = make_rollout_env(self.family, tasks, trials, device=self.device)
        else:
            self._env.set_tasks(repeated)
        return self._env

    def _collect(self, tasks: Tasks, seed: int, params: Params | None = None, episodes: int | None = None,
                 trials: int | None = None, deterministic: bool = False, shard: Shard | None = None) -> Trajectories:
        env = self._rollout_env(tasks, trials or self.batch.trajectories_per_task)
        return collect(self.policy, env, num_tasks=len(tasks), episodes_per_trial=episodes or self.batch.episodes_per_trial,
                       params=params, per_task=params is not None, seed=seed, deterministic=deterministic,
                       isolate_episodes=self.maml.isolate_episodes, shard=shard)

    def _adapt(self, params: Params, support: Trajectories, stacked: bool = False, inner_lr: float | None = None,
               steps: int | None = None) -> Params:
        """`adapt` with this learner's settings; `inner_lr` / `steps` override the step size / number of steps."""
        config = replace(self.maml, inner_lr=self.maml.inner_lr if inner_lr is None else inner_lr,
                         inner_steps=steps or self.maml.inner_steps)
        return adapt(self.policy, params, support, config, self.step_sizes if self.maml.meta_sgd else None, stacked)

    def _adapt_chain(self, params: Params, supports: Sequence[Trajectories], step_sizes: Params | None) -> Params:
        """Inner step k on `supports[k]`, from the shared `params`: the per-task parameters after len(supports) steps
        (differentiable w.r.t. `params` and the Meta-SGD `step_sizes`)."""
        one_step = replace(self.maml, inner_steps=1)
        for k, support in enumerate(supports):
            params = adapt(self.policy, params, support, one_step, step_sizes, stacked=k > 0)
        return params

    def adapt(self, support: Trajectories) -> Params:
        """Per-task adapted parameters ``[N, ...]`` (detached) from support trajectories of N tasks: all
        `maml.inner_steps` steps on these trajectories."""
        return {k: v.detach() for k, v in self._adapt(self._params(), support).items()}

    # ------------------------------------------------------------------ training
    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One meta-iteration; all its randomness derives from (seed, iteration).

        Under torch.distributed every rank samples the same global meta-batch and collects, adapts and
        differentiates only its shard of it (`metarl.distributed.shard_of`); losses, gradients and metrics are
        weighted by the shard's share and summed over ranks, so they equal those of one process."""
        start = time.perf_counter()
        gen = iteration_generator(self.seed, iteration)
        seeds = torch.randint(0, 2**62, (3,), generator=gen).tolist()
        tasks = self.family.sample(self.batch.meta_batch, seeds[0], "train")
        shard = shard_of(len(tasks)) if is_distributed() else None
        weight = 1.0 if shard is None else shard.weight
        tasks = tasks if shard is None else tasks[shard.start:shard.stop]
        supports: list[Trajectories] = []  # inner step k adapts on fresh trajectories of the parameters after k steps
        adapted: Params | None = None
        for k in range(self.maml.inner_steps):
            supports.append(self._collect(tasks, seeds[1] if k == 0 else derive_seed(seeds[1], k), params=adapted,
                                          shard=shard))
            current = self._params() if adapted is None else adapted
            adapted = {n: v.detach() for n, v in self._adapt(current, supports[-1], adapted is not None, steps=1).items()}
        query = self._collect(tasks, seeds[2], params=adapted, shard=shard)
        advantages = linear_baseline_advantages(query, self.maml)
        if self.outer.method == "trpo":
            metrics = self._trpo_update(supports, query, adapted, advantages, weight)
        else:
            metrics = self._ppo_update(supports, query, advantages, weight)
        returns = {f"adapt/return_step_{k}": t.episode_returns().mean().item() for k, t in enumerate([*supports, query])}
        steps = sum(t.num_steps for t in supports) + query.num_steps
        metrics.update(weighted_metrics({**returns, "env_steps": steps / weight}, weight, self.device))
        self.env_steps += round(metrics.pop("env_steps"))
        metrics["time/iteration_s"] = time.perf_counter() - start
        return metrics

    def _split(self, full: Params) -> tuple[Params, Params | None]:
        params = {k: v for k, v in full.items() if not k.startswith(_STEP_PREFIX)}
        steps = {k[len(_STEP_PREFIX):]: v for k, v in full.items() if k.startswith(_STEP_PREFIX)}
        return params, (steps or None)

    def _trpo_update(self, supports: Sequence[Trajectories], query: Trajectories, adapted: Params, adv: Tensor,
                     weight: float = 1.0) -> dict[str, float]:
        with torch.no_grad():
            old = batched_policy_outputs(self.policy, adapted, query, self.maml.isolate_episodes, self.maml.task_chunk)
        full = {k: v.detach().requires_grad_() for k, v in self._params().items()}
        full |= {_STEP_PREFIX + k: v.detach().requires_grad_() for k, v in (self.step_sizes or {}).items()}

        def adapted_of(p: Params) -> Params:
            params, steps = self._split(p)
            return self._adapt_chain(params, supports, steps)

        def loss_fn(p: Params) -> Tensor:  # this shard's term of the global mean over tasks
            return weight * outer_surrogate(self.policy, adapted_of(p), query, query.log_probs, adv,
                                            self.maml.isolate_episodes, self.maml.task_chunk)

        def kl_fn(p: Params) -> Tensor:
            return weight * outer_kl(self.policy, adapted_of(p), query, old, self.maml.isolate_episodes, self.maml.task_chunk)

        o = self.outer
        new, info = trpo_step(full, loss_fn, kl_fn, max_kl=o.max_kl, cg_iters=o.cg_iters, cg_damping=o.cg_damping,
                              ls_steps=o.ls_steps, ls_ratio=o.ls_ratio,
                              allreduce=allreduce_sum if is_distributed() else None)
        self._assign(new)
        entropy = weighted_metrics({"e": self.policy.entropy(old)[query.valid].mean().item()}, weight, self.device)["e"]
        return {"loss/outer": info["loss_after"], "loss/outer_before": info["loss_before"], "policy/kl": info["kl"],
                "policy/entropy": entropy, "trpo/step_fraction": info["step_fraction"],
                "trpo/accepted": float(info["accepted"]), "trpo/grad_norm": info["grad_norm"]}

    def _assign(self, full: Params) -> None:
        params, steps = self._split(full)
        with torch.no_grad():
            for name, p in self.policy.named_parameters():
                p.copy_(params[name])
            for name, s in (self.step_sizes or {}).items():
                s.copy_(steps[name])  # type: ignore[index]

    def _ppo_update(self, supports: Sequence[Trajectories], query: Trajectories, adv: Tensor,
                    weight: float = 1.0) -> dict[str, float]:
        assert self.optimizer is not None
        losses = []
        for _ in range(self.outer.ppo_epochs):
            adapted = self._adapt_chain(self._params(), supports, self.step_sizes)  # re-adapt from the support data each epoch
            loss = ppo_outer_loss(self.policy, adapted, query, query.log_probs, adv, self.maml.isolate_episodes,
                                  self.outer.ppo_clip, self.maml.task_chunk)
            self.optimizer.zero_grad()
            (weight * loss).backward()  # this shard's term of the global mean over tasks
            trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
            allreduce_grads_(trainable)
            torch.nn.utils.clip_grad_norm_(trainable, self.outer.max_grad_norm)
            self.optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            adapted = self._adapt_chain(self._params(), supports, self.step_sizes)
            new_out = batched_policy_outputs(self.policy, {k: v.detach() for k, v in adapted.items()}, query,
                                             self.maml.isolate_episodes, self.maml.task_chunk)
            approx_kl = (query.log_probs - self.policy.log_prob(new_out, query.actions))[query.valid].mean().item()
            entropy = self.policy.entropy(new_out)[query.valid].mean().item()
        return weighted_metrics({"loss/outer": losses[-1], "loss/outer_before": losses[0], "policy/kl": approx_kl,
                                 "policy/entropy": entropy}, weight, self.device)

    # ------------------------------------------------------------------ evaluation
    def adaptation_curve(self, tasks: Tasks, seed: int, steps: int = 3, episodes: int | None = None,
                         trajectories: int | None = None, step_sizes: Sequence[float] = ()) -> dict[str, Any]:
        """Mean return on `tasks` before adaptation and after each of `steps` gradient steps (each step adapts on
        fresh trajectories of the current per-task parameters, as in the MAML paper's evaluation); with several
        episodes per trial and a policy that reads its history, also the return of each episode of a trial under
        the final parameters. `trajectories`: trials per task and step (default `batch.trajectories_per_task`);
        `episodes`: episodes per trial (default `batch.episodes_per_trial`). `step_sizes`: the inner step size of
        step 1, 2, ... (the last one repeats; default `maml.inner_lr` for every step), e.g. (0.5, 0.25) as in the
        MAML authors' evaluation; not with Meta-SGD, whose step sizes are learned."""
        lrs = check_step_sizes(step_sizes, self.maml.meta_sgd)
        per_task: list[list[float]] = []
        success: list[list[float]] = []  # per step, per task: fraction of episodes that ended by termination
        params: Params | None = None
        for k in range(steps + 1):
            traj = self._collect(tasks, derive_seed(seed, k), params=params, episodes=episodes, trials=trajectories)
            per_task.append(traj.episode_returns().mean(dim=1).tolist())
            success.append(traj.terminated.any(dim=2).float().mean(dim=1).tolist())
            by_episode = traj.episode_returns().reshape(len(tasks), -1, traj.episodes_per_trial).mean(dim=1)  # (N, E)
            if k < steps:
                start = self._params() if params is None else params
                lr = lrs[min(k, len(lrs) - 1)] if lrs else None
                params = {n: v.detach() for n, v in self._adapt(start, traj, params is not None, lr, steps=1).items()}
        means = [sum(r) / len(r) for r in per_task]
        # with several episodes per trial, the in-context curve is that of the last (most adapted) parameters
        incontext = traj.episodes_per_trial > 1 and self.policy.reads_history
        episodes_per_task = by_episode.T.tolist() if incontext else []
        ended = traj.terminated.any(dim=2).float().reshape(len(tasks), -1, traj.episodes_per_trial).mean(dim=1)  # (N, E)
        return {"gradient_steps": means, "gradient_steps_per_task": per_task,
                "incontext_episodes": [sum(r) / len(r) for r in episodes_per_task],
                "incontext_episodes_per_task": episodes_per_task, "gradient_steps_success_per_task": success,
                "incontext_episodes_success_per_task": ended.T.tolist() if incontext else []}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"policy": self.policy.state_dict(), "env_steps": self.env_steps}
        if self.step_sizes is not None:
            state["step_sizes"] = {k: v.detach().clone() for k, v in self.step_sizes.items()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.env_steps = int(state["env_steps"])
        if self.step_sizes is not None:
            with torch.no_grad():
                for k, v in self.step_sizes.items():
                    v.copy_(state["step_sizes"][k])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

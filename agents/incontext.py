"""RL2-style in-context meta-RL: PPO on trials of several episodes, the policy's history running through them.

The policy is never adapted by gradient at test time: whatever it learns about a task it must infer from the
history of the trial (observations, actions, rewards, episode starts). Training maximises the return of the whole
trial, so episode boundaries inside a trial are not terminal for the advantages (`trial_advantages`): reward in
a later episode is credited to exploratory actions in an earlier one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metarl.distributed import allreduce_grads_, allreduce_sum, is_distributed, shard_of
from metarl.family import TaskFamily
from metarl.returns import gae, normalize_advantages
from metarl.rollout import collect, make_rollout_env
from metarl.seeding import iteration_generator
from metarl.tasks import Tasks
from metarl.trajectories import Trajectories

from .maml import policy_outputs
from .policy import HistoryPolicy, PolicyOutput
from .surface import SB3Surface

Params = dict[str, Tensor]
_COLLECT_STREAM = 1


@dataclass(frozen=True)
class InContextConfig:
    """Settings of in-context (RL2-style) training with PPO."""

    meta_batch: int = 32
    """Tasks sampled from the train split per iteration."""
    trials_per_task: int = 2
    """Parallel trials collected per task per iteration."""
    episodes_per_trial: int | None = None
    """Consecutive episodes per trial (the policy's history spans them); None: the family's own value."""
    gamma: float = 0.99
    """Discount factor, applied across episode boundaries within a trial."""
    gae_lambda: float = 0.95
    """GAE lambda of the trial-level advantages."""
    lr: float = 1e-3
    """Adam learning rate."""
    epochs: int = 4
    """PPO epochs over the iteration's trials."""
    minibatches: int = 4
    """Minibatches per epoch; trials (whole histories) are split among them, never single steps."""
    clip: float = 0.2
    """PPO probability-ratio clip range."""
    vf_coef: float = 0.05
    """Weight of the value loss 0.5 * (V - R)^2 in the total loss. Returns are not normalised, so with returns of
    tens to hundreds (PointNav: about -80 per episode) a weight like 0.5 lets the value gradient fill the
    `max_grad_norm` budget and starves the policy; 0.05 learns PointNav trials (docs/results/reproduce_maml_incontext.md)."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus (subtracted from the loss)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip before each Adam step."""
    normalize_advantages: bool = True
    """Standardise advantages over the valid steps of each minibatch."""

    def __post_init__(self) -> None:
        if min(self.meta_batch, self.trials_per_task, self.epochs, self.minibatches) < 1:
            raise ValueError(f"meta_batch, trials_per_task, epochs, minibatches must be >= 1, got {self}")
        if self.episodes_per_trial is not None and self.episodes_per_trial < 1:
            raise ValueError(f"episodes_per_trial must be >= 1 or None, got {self.episodes_per_trial}")
        if self.minibatches > self.meta_batch * self.trials_per_task:
            raise ValueError(f"minibatches={self.minibatches} exceeds the number of trials per iteration "
                             f"({self.meta_batch} * {self.trials_per_task})")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"gamma and gae_lambda must lie in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if self.clip <= 0 or self.lr <= 0 or self.max_grad_norm <= 0:
            raise ValueError(f"clip, lr and max_grad_norm must be > 0, got {self.clip}, {self.lr}, {self.max_grad_norm}")


@torch.no_grad()
def trial_advantages(traj: Trajectories, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over whole trials: (advantages, returns), each ``[N, E, T]``, 0 at padding.

    Within a trial, the first step of an episode follows the last valid step of the episode before it, whatever
    ended that episode (padding in between is skipped). Only the trial's last episode ends the trial: nothing
    follows it if it terminated, else it bootstraps from its `last_value`. Values are `traj.values`.
    """
    k, (n, e, t) = traj.episodes_per_trial, traj.valid.shape
    if e % k:
        raise ValueError(f"trajectories hold {e} episodes, not a multiple of episodes_per_trial={k}")
    rows, length = n * (e // k), k * t

    def seq(x: Tensor) -> Tensor:  # (N, E, T) -> (rows, L)
        return x.reshape(rows, length)

    valid = seq(traj.valid)
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # (rows, L): valid steps first
    valid_c = valid.gather(1, order)  # (rows, L): a prefix of True
    in_last_episode = order >= (k - 1) * t  # (rows, L)
    terminated_c = seq(traj.terminated).gather(1, order) & in_last_episode & valid_c
    last_value = traj.last_value.reshape(rows, k)[:, -1:]  # (rows, 1)
    rewards_c, values_c = seq(traj.rewards).gather(1, order), seq(traj.values).gather(1, order)  # (rows, L)
    adv_c, _ = gae(rewards_c[:, None], values_c[:, None], valid_c[:, None], gamma, lam, terminated_c[:, None],
                   last_value)  # (rows, 1, L)
    adv = torch.zeros_like(adv_c[:, 0]).scatter(1, order, adv_c[:, 0]).reshape(n, e, t)  # (N, E, T)
    values = torch.where(traj.valid, traj.values, 0.0)
    return adv, torch.where(traj.valid, adv + values, 0.0)


def trial_batch(traj: Trajectories) -> Trajectories:
    """Regroups ``[N, E, T, ...]`` into one row per trial: ``[N * trials, episodes_per_trial, T, ...]``."""
    k = traj.episodes_per_trial
    return traj.map(lambda v: v.reshape(-1, k, *v.shape[2:]))


def shared_policy_outputs(policy: HistoryPolicy, params: Params, traj: Trajectories) -> PolicyOutput:
    """Sequence-mode outputs of every trial of `traj` ``[N, E, T, ...]`` with one parameter set -> ``[N, E, T, ...]``."""
    n, e = traj.valid.shape[:2]
    flat = traj.map(lambda v: v.reshape(n * e, *v.shape[2:]))  # one "task" holding every trial
    out = policy_outputs(policy, params, flat)
    return PolicyOutput(*(x.reshape(n, e, *x.shape[1:]) for x in out))


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of `x` over the True entries of `valid`; other entries are never read."""
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp_min(1)


def _zero_padding(x: Tensor, valid: Tensor) -> Tensor:
    """`x` ``[*valid.shape, ...]`` with 0 at padding steps."""
    mask = valid.reshape(*valid.shape, *([1] * (x.dim() - valid.dim())))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


class InContextLearner(SB3Surface):
    """RL2 with PPO: collect trials with shared parameters, trial-level GAE, clipped PPO epochs over trials.

    The loss is the clipped policy loss + `vf_coef` * 0.5 * (V - R)^2 - `ent_coef` * entropy, each a mean over
    the minibatch's valid steps. The value loss is not clipped: value clipping (CleanRL's default) ties V to the
    collecting values with the policy's clip range, which has no meaning on the scale of trial returns. Adam uses
    eps = 1e-5, as common PPO implementations do.
    """

    def __init__(self, policy: HistoryPolicy, family: TaskFamily, config: InContextConfig | None = None,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        self.policy = policy.to(self.device)
        self.family = family
        self.config = config or InContextConfig()
        self.seed = seed
        self.episodes_per_trial = self.config.episodes_per_trial or family.episodes_per_trial
        self.env_steps = 0
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.config.lr, eps=1e-5)
        placeholder = family.sample(self.config.meta_batch, generator=seed, split="train")
        self._env = make_rollout_env(family, placeholder, self.config.trials_per_task, device=self.device, seed=seed)

    def _params(self) -> Params:
        return dict(self.policy.named_parameters())

    # ------------------------------------------------------------------ training
    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One iteration: sample tasks, collect trials, PPO epochs; all randomness derives from (seed, iteration)."""
        start = time.perf_counter()
        cfg = self.config
        gen = iteration_generator(self.seed, iteration)
        collect_gen = iteration_generator(self.seed, iteration, _COLLECT_STREAM, self.device)
        tasks = self.family.sample(cfg.meta_batch, generator=gen, split="train")
        shard = shard_of(cfg.meta_batch) if is_distributed() else None  # this rank's tasks of the meta-batch
        if shard is not None:
            tasks = tasks[shard.start:shard.stop]
            if self._env.num_envs != len(tasks) * cfg.trials_per_task:
                self._env = make_rollout_env(self.family, tasks, cfg.trials_per_task, device=self.device, seed=self.seed)
        self._env.set_tasks(tasks[torch.arange(len(tasks)).repeat_interleave(cfg.trials_per_task)])
        traj = collect(self.policy, self._env, num_tasks=len(tasks), episodes_per_trial=self.episodes_per_trial,
                       generator=collect_gen, shard=shard)
        self.env_steps += int(allreduce_sum(torch.tensor(traj.num_steps, device=self.device)))
        adv, returns = trial_advantages(traj, cfg.gamma, cfg.gae_lambda)
        trial_offset = 0 if shard is None else shard.start * cfg.trials_per_task
        metrics = self._ppo(traj, adv, returns, gen, trial_offset, cfg.meta_batch * cfg.trials_per_task)
        metrics.update(self._return_metrics(traj, 1.0 if shard is None else shard.weight))
        metrics["time/iteration_s"] = time.perf_counter() - start
        return metrics

    def _return_metrics(self, traj: Trajectories, weight: float = 1.0) -> dict[str, float]:
        """Mean return of each episode position in the trial and of the whole trial (over all ranks' tasks)."""
        k = self.episodes_per_trial
        per_episode = traj.episode_returns().reshape(traj.num_tasks, -1, k)  # (N, trials, k)
        means = torch.cat([per_episode.mean(dim=(0, 1)), per_episode.sum(-1).mean().reshape(1)])  # (k + 1,)
        if is_distributed():
            means = allreduce_sum(weight * means.double())
        values = means.tolist()
        metrics = {f"incontext/return_episode_{i}": values[i] for i in range(k)}
        metrics["incontext/return_trial"] = values[k]
        return metrics

    def _ppo(self, traj: Trajectories, adv: Tensor, returns: Tensor, gen: torch.Generator, offset: int = 0,
             total: int | None = None) -> dict[str, float]:
        """PPO epochs over shuffled minibatches of whole trials; returns the metrics averaged over all updates.

        Under torch.distributed `traj` holds trials ``[offset, offset + B)`` of `total`; minibatches are drawn over
        all `total` trials and each rank updates with its part of them (see `_update`)."""
        cfg = self.config
        trials = trial_batch(traj)  # (B, k, T, ...)
        adv, returns = (x.reshape(trials.valid.shape) for x in (adv, returns))  # (B, k, T)
        num = trials.num_tasks
        total = num if total is None else total
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(total, generator=gen).to(self.device)
            for idx in perm.tensor_split(cfg.minibatches):
                if total != num:  # keep this rank's trials of the global minibatch
                    idx = idx[(idx >= offset) & (idx < offset + num)] - offset
                stats = self._update(trials.select_tasks(idx), adv[idx], returns[idx])
                sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
                updates += 1
        return {k: v / updates for k, v in sums.items()}

    def _update(self, mb: Trajectories, adv: Tensor, returns: Tensor) -> dict[str, float]:
        """One Adam step on the PPO loss of a minibatch of trials ``[B, k, T]``.

        Under torch.distributed each rank holds part of the minibatch (possibly none of it): means over valid
        steps divide local sums by the global count, advantages are normalised with global statistics, and the
        gradients and metrics are summed over ranks, so every rank takes the same step as one process would."""
        if is_distributed():
            return self._update_shard(mb, adv, returns)
        cfg, valid = self.config, mb.valid
        if cfg.normalize_advantages:
            adv = normalize_advantages(adv, valid, per_task=False)
        out = shared_policy_outputs(self.policy, self._params(), mb)
        log_ratio = _zero_padding(self.policy.log_prob(out, _zero_padding(mb.actions, valid)) - mb.log_probs, valid)
        ratio = log_ratio.exp()  # (B, k, T)
        clipped = torch.minimum(ratio * adv, ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip) * adv)
        policy_loss = -_masked_mean(clipped, valid)
        value_loss = 0.5 * _masked_mean((out.value - returns).square(), valid)
        entropy = _masked_mean(self.policy.entropy(out), valid)
        loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            approx_kl = _masked_mean((ratio - 1.0) - log_ratio, valid)
            clip_fraction = _masked_mean(((ratio - 1.0).abs() > cfg.clip).float(), valid)
        return {"loss/policy": policy_loss.item(), "loss/value": value_loss.item(), "policy/entropy": entropy.item(),
                "policy/approx_kl": approx_kl.item(), "policy/clip_fraction": clip_fraction.item()}

    def _update_shard(self, mb: Trajectories, adv: Tensor, returns: Tensor) -> dict[str, float]:
        """`_update` for this rank's part ``[b, k, T]`` (b >= 0) of a minibatch spread over all ranks."""
        cfg, valid = self.config, mb.valid
        count = allreduce_sum(valid.sum()).clamp_min(1).to(adv.dtype)  # valid steps of the whole minibatch

        def mean(x: Tensor) -> Tensor:  # this rank's term of the global masked mean
            return torch.where(valid, x, 0.0).sum() / count

        if cfg.normalize_advantages:
            centred = torch.where(valid, adv - allreduce_sum(mean(adv)), 0.0)  # (b, k, T)
            adv = centred / (allreduce_sum(mean(centred.square())).sqrt() + 1e-8)
        self.optimizer.zero_grad()
        terms = torch.zeros(5, device=self.device)
        if valid.shape[0]:
            out = shared_policy_outputs(self.policy, self._params(), mb)
            log_ratio = _zero_padding(self.policy.log_prob(out, _zero_padding(mb.actions, valid)) - mb.log_probs, valid)
            ratio = log_ratio.exp()  # (b, k, T)
            clipped = torch.minimum(ratio * adv, ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip) * adv)
            policy_loss, value_loss = -mean(clipped), 0.5 * mean((out.value - returns).square())
            entropy = mean(self.policy.entropy(out))
            (policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy).backward()
            with torch.no_grad():
                terms = torch.stack([policy_loss, value_loss, entropy, mean((ratio - 1.0) - log_ratio),
                                     mean(((ratio - 1.0).abs() > cfg.clip).float())]).detach()
        allreduce_grads_(list(self.policy.parameters()), zero_missing=True)
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        keys = ("loss/policy", "loss/value", "policy/entropy", "policy/approx_kl", "policy/clip_fraction")
        return dict(zip(keys, allreduce_sum(terms).tolist()))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def adaptation_curve(self, tasks: Tasks, seed: int, steps: int = 0, episodes: int | None = None,
                         trajectories: int | None = None, step_sizes: Sequence[float] = ()) -> dict[str, Any]:
        """Mean return of each episode of a trial of `episodes` episodes (default: the training trial length) on
        `tasks`, averaged over `trajectories` independent trials per task (default 1), sampling actions (seeded).
        `steps` and `step_sizes` are unused: there is no gradient adaptation.

        ``incontext_episodes_per_task[e][i]`` is task i's return in episode e.
        """
        episodes, trials = episodes or self.episodes_per_trial, trajectories or 1
        env = make_rollout_env(self.family, tasks, trials, device=self.device, seed=seed)
        traj = collect(self.policy, env, num_tasks=len(tasks), episodes_per_trial=episodes, seed=seed)
        n = len(tasks)
        per_task = traj.episode_returns().reshape(n, trials, episodes).mean(dim=1).T.tolist()  # (E, N)
        means = [sum(r) / len(r) for r in per_task]
        ended = traj.terminated.any(dim=2).float().reshape(n, trials, episodes).mean(dim=1)
        success = ended.T.tolist()  # (E, N): fraction of the trials whose episode e ended by termination
        return {"gradient_steps": [], "gradient_steps_per_task": [], "incontext_episodes": means,
                "incontext_episodes_per_task": per_task, "gradient_steps_success_per_task": [],
                "incontext_episodes_success_per_task": success}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Policy, Adam state and env step count: everything a resumed run needs."""
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(), "env_steps": self.env_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.env_steps = int(state["env_steps"])

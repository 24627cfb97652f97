"""The Stable-Baselines3-style surface of the learners: `learn`, `save` / `load`, `predict`.

A saved learner is one checkpoint file holding how to rebuild it (family name and options, policy class and
config, learner configs, seed) and its state; `load` rebuilds it without executing any stored code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import trange

from metarl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metarl.config import config_from_dict, config_to_dict
from metarl.family import TaskFamily, make_family
from metarl.rollout import policy_step_fn

from .incontext import InContextConfig, InContextLearner
from .maml import MAMLConfig
from .maml_learner import MAMLLearner, MetaBatchConfig, OuterConfig
from .mlp import MLPConfig, MLPPolicy
from .transformer import TransformerConfig, TransformerPolicy

FORMAT = "metarl-learner-v1"
_POLICIES = {"TransformerPolicy": (TransformerPolicy, TransformerConfig), "MLPPolicy": (MLPPolicy, MLPConfig)}
_LEARNER_CONFIGS = {"MAMLLearner": {"maml": MAMLConfig, "outer": OuterConfig, "batch": MetaBatchConfig},
                    "InContextLearner": {"config": InContextConfig}}


def learn(learner, iterations: int, callback: Callable[[dict[str, float]], bool | None] | None = None,
          progress_bar: bool = False):
    """Runs `iterations` more meta-iterations (continuing the learner's count); `callback(metrics)` returning
    False stops early. Returns the learner."""
    start = getattr(learner, "iterations_done", 0)
    for it in trange(start, start + iterations, disable=not progress_bar, desc="meta-iterations"):
        metrics = learner.train_iteration(it)
        learner.iterations_done = it + 1
        if callback is not None and callback(metrics) is False:
            break
    return learner


def save(learner, path: str | Path) -> None:
    """Writes the learner (how to rebuild it + its state) to `path` atomically."""
    kind = type(learner).__name__
    spec = {"learner": kind, "family": learner.family.name, "family_options": dict(learner.family.options),
            "policy": type(learner.policy).__name__, "policy_config": config_to_dict(learner.policy.config),
            "configs": {name: config_to_dict(getattr(learner, name)) for name in _LEARNER_CONFIGS[kind]},
            "seed": learner.seed}
    save_checkpoint(path, {"format": FORMAT, "spec": spec, "state": learner.state_dict(),
                           "iterations_done": getattr(learner, "iterations_done", 0)})


def load(path: str | Path, device: torch.device | str = "cpu", family: TaskFamily | None = None):
    """Rebuilds a learner saved with `save` (a MAMLLearner or an InContextLearner) on `device`.

    Its task family is made again by its saved name and options, or is `family` when given: a family built in
    code (e.g. `gym_family(...)`) and never registered must be passed this way. It must carry the saved name and
    the policy's spaces."""
    data = load_checkpoint(path)
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a saved metarl learner (format {data.get('format')!r}, expected {FORMAT!r}); "
                              f"training checkpoints are resumed with `metarl train --resume RUN_DIR`")
    spec = data["spec"]
    family = _saved_family(path, spec, family)
    policy_cls, policy_config_cls = _POLICIES[spec["policy"]]
    policy = policy_cls(family.observation_space, family.action_space, config_from_dict(policy_config_cls, spec["policy_config"]))
    configs = {name: config_from_dict(cls, spec["configs"][name]) for name, cls in _LEARNER_CONFIGS[spec["learner"]].items()}
    cls = MAMLLearner if spec["learner"] == "MAMLLearner" else InContextLearner
    learner = cls(policy, family, **configs, device=device, seed=spec["seed"])
    try:
        learner.load_state_dict(data["state"])
    except RuntimeError as exc:  # parameter shapes differ: the family's spaces are not the ones it trained on
        raise ValueError(f"{path}: the saved policy does not fit task family {family.name!r} (observation space "
                         f"{family.observation_space}, action space {family.action_space}): {exc}") from exc
    learner.iterations_done = int(data["iterations_done"])
    return learner


def _saved_family(path: str | Path, spec: dict[str, Any], family: TaskFamily | None) -> TaskFamily:
    """The family a saved learner trained on: `family` if given (checked against the saved name), else made by name."""
    if family is not None:
        if family.name != spec["family"]:
            raise ValueError(f"{path} was trained on task family {spec['family']!r}, but family={family.name!r} was given")
        return family
    try:
        return make_family(spec["family"], **spec["family_options"])
    except KeyError as exc:
        raise KeyError(f"{path}: its task family {spec['family']!r} is not known in this process ({exc.args[0]}); "
                       f"register it, or pass the family itself: load(path, family=...)") from exc


def predict(learner, observation: np.ndarray | Tensor, state: dict[str, Tensor] | None = None,
            episode_start: np.ndarray | Tensor | None = None, deterministic: bool = False,
            reward: np.ndarray | Tensor | None = None, params: dict[str, Tensor] | None = None,
            generator: torch.Generator | None = None) -> tuple[np.ndarray | Tensor, dict[str, Tensor]]:
    """One action per row of `observation` ``[B, D]`` (or ``[D]``), carrying the policy's history in `state`.

    As in Stable-Baselines3, pass back the returned `state` at the next call and `episode_start` True where a new
    episode began. History policies also read the previous `reward` (default 0). `params`: per-row adapted
    parameters ``[B, ...]`` (e.g. from `learner.adapt`); default the learner's own. Returns numpy for numpy input.
    """
    policy, device = learner.policy, learner.device
    as_numpy = isinstance(observation, np.ndarray)
    obs = torch.as_tensor(observation, dtype=torch.float32, device=device)
    single = obs.dim() == 1
    obs = obs.unsqueeze(0) if single else obs
    b = obs.shape[0]
    if state is None:
        zero = policy.encode_prev_action(torch.zeros((b, *learner.family.action_space.shape), device=device,
                                                     dtype=torch.long if policy.discrete else torch.float32))
        state = {"cache": policy.initial_cache(b, device, torch.float32), "prev_action": torch.zeros_like(zero)}
    if episode_start is None:  # a fresh state starts an episode; a carried one continues it
        start = torch.full((b,), "action" not in state, dtype=torch.bool, device=device)
    else:
        start = torch.as_tensor(episode_start, dtype=torch.bool, device=device).reshape(b)
    prev_reward = torch.zeros(b, device=device) if reward is None else torch.as_tensor(reward, dtype=torch.float32,
                                                                                       device=device).reshape(b)
    shared = params is None
    step = policy_step_fn(policy, params if not shared else {k: v.detach() for k, v in policy.named_parameters()},
                          not shared, b, 1, False)
    with torch.no_grad():
        out, cache = step(obs, state["prev_action"], prev_reward, start, state["cache"], torch.ones_like(start), None)
        if deterministic:
            action = policy.mode_action(out)
        else:
            noise_gen = generator or torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,))))
            action = policy.sample_action(out, policy.action_noise(b, noise_gen, device))
    new_state = {"cache": cache, "prev_action": policy.encode_prev_action(action), "action": action}
    action = policy.env_action(action)  # what the environment takes (rescaled to the Box bounds)
    action = action[0] if single else action
    return (action.cpu().numpy() if as_numpy else action), new_state

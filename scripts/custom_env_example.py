"""Bring your own environment: Gymnasium's CartPole-v1 with a varying pole length, meta-trained with MAML."""

import sys

from metarl.agents import MLPConfig, MLPPolicy
from metarl.agents.maml_learner import MAMLLearner, MetaBatchConfig
from metarl.envs.gym_adapter import GymParam, gym_family
from metarl.evaluation import evaluate_adaptation

quick = "--quick" in sys.argv  # a smoke test: tiny budget
# Declare the task parameter: CartPole's half pole length, an attribute of the unwrapped env.
family = gym_family(
    "CartPoleLength", "CartPole-v1",
    [GymParam("length", train=(0.25, 1.0), ood=(1.0, 2.0), apply="attribute", doc="half pole length (m)")],
    horizon=20 if quick else 200,
)

# Meta-train MAML on it as on any built-in family: one sub-env per task, each with its own pole length.
mlp = MLPConfig(hidden=(16,) if quick else (64, 64), activation="tanh")
batch = MetaBatchConfig(meta_batch=4 if quick else 20, trajectories_per_task=2 if quick else 10)
learner = MAMLLearner(MLPPolicy(family.observation_space, family.action_space, mlp), family, batch=batch, seed=0)
learner.learn(1 if quick else 20, progress_bar=not quick)

# Return on held-out pole lengths before and after one gradient step of adaptation.
result = evaluate_adaptation(learner, family, split="test", num_tasks=4 if quick else 20, steps=1, seed=0)
before, after = (s.mean for s in result.gradient_steps)
print(f"held-out return: before adaptation {before:.1f}, after 1 step {after:.1f}")

"""Policies and learners: the Transformer and MLP policies (MAML and in-context learners build on them)."""

from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.agents.policy import PolicyOutput
from metarl.agents.transformer import TransformerConfig, TransformerPolicy

__all__ = ["MLPConfig", "MLPPolicy", "PolicyOutput", "TransformerConfig", "TransformerPolicy"]

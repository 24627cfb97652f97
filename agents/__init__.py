"""Policies and learners (Transformer and MLP policies, MAML, in-context training)."""

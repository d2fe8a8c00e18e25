"""Optimizers as functional update rules that are traced into the `opt` section."""

from sambaflow.optim.adamw import AdamW
from sambaflow.optim.base import SambaOptimizer
from sambaflow.optim.sgd import SGD

__all__ = ["SGD", "AdamW", "SambaOptimizer"]

"""`sambaflow.samba.optim`: optimizers whose update is compiled into the graph."""

from sambaflow.optim import SGD, AdamW, SambaOptimizer

__all__ = ["SGD", "AdamW", "SambaOptimizer"]

"""Normalise a forward-only graph: drop arguments that only shape a gradient.

`aten.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)` computes the same
forward whatever `padding_idx`, `scale_grad_by_freq` and `sparse` are: they only change its
backward. SambaNova's generation app builds the model without a pad token at compile and with one
at run, so the two traces would differ in this argument alone and the PEF would be refused as
"a different computation". A forward-only graph is traced with the defaults instead.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def drop_gradient_only_arguments(module: fx.GraphModule) -> int:
    """Reset gradient-only arguments of forward ops in `module` to their defaults, in place;
    returns how many nodes changed (the caller recompiles when any did)."""
    changed = 0
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default and len(node.args) > 2:
            node.args = node.args[:2]
            node.kwargs = {}
            changed += 1
    if changed:
        module.recompile()
    return changed


__all__ = ["drop_gradient_only_arguments"]

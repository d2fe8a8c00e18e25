"""An estimate of a program's peak memory for the values it computes, from the graph alone.

Walks the nodes in program order, counting each computed tensor from the node that makes it until
its last use (views are counted as if they were copies, so it is an upper bound for them). The
compile log reports it for the training step, so a user can see what `-mb` saves.
"""

from __future__ import annotations

import torch
from torch import fx


def peak_computed_bytes(module: fx.GraphModule) -> int:
    """The most bytes of computed (non-input) tensors alive at once, in program order."""
    nodes = list(module.graph.nodes)
    last_use = {}
    for index, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last_use[used] = index
    alive: dict[fx.Node, int] = {}
    live = peak = 0
    for index, node in enumerate(nodes):
        value = node.meta.get("val")
        if node.op != "placeholder" and isinstance(value, torch.Tensor):
            alive[node] = value.numel() * value.element_size()
            live += alive[node]
        peak = max(peak, live)
        for used in node.all_input_nodes:
            if last_use.get(used) == index and used in alive:
                live -= alive.pop(used)
    return peak

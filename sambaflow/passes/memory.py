"""An estimate of a program's peak memory for the values it computes, from the graph alone.

Walks the nodes in program order, counting each computed tensor from the node that makes it until
its last use. A view allocates nothing but keeps its base alive; an in-place write into an input
(`aten.copy_`, passes/inplace.py) allocates nothing.

Two estimates, for two kinds of backend:
- op by op (`fused=False`, the reference backend): every other node's result is a new tensor.
- fused (`fused=True`, Inductor): an elementwise node whose every user is elementwise, a reduction
  or an in-place write is computed inside its users' kernels and never stored; its inputs stay
  alive until those users run instead. This is how an optimizer's update costs no memory beyond the
  gradients: Inductor writes the new weights and moments straight into the stored ones.

The compile log reports the estimate for the training step, so a user can see what `-mb` saves,
and `trace_graph` refuses a step whose estimate cannot fit (app/tracing.py).
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
_CASTS = (aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def peak_computed_bytes(module: fx.GraphModule, fused: bool = False) -> int:
    """The most bytes of computed (non-input) tensors alive at once, in program order."""
    nodes = list(module.graph.nodes)
    owners: dict[fx.Node, set[fx.Node]] = {}  # the allocations a node's value needs alive
    sizes: dict[fx.Node, int] = {}
    for node in nodes:
        value = node.meta.get("val")
        inputs = set().union(*(owners.get(n, set()) for n in node.all_input_nodes))
        if node.op == "placeholder" or not isinstance(value, torch.Tensor):
            owners[node] = set()
        elif _is_view(node) or node.target is aten.copy_.default or (fused and _fused_away(node)):
            owners[node] = inputs
        else:
            owners[node] = {node}
            sizes[node] = value.numel() * value.element_size()
    last_use = {}
    for index, node in enumerate(nodes):
        for owner in set().union(owners[node], *(owners[n] for n in node.all_input_nodes)):
            last_use[owner] = index
    live = peak = 0
    for index, node in enumerate(nodes):
        live += sizes.get(node, 0)
        peak = max(peak, live)
        for owner in set().union(owners[node], *(owners[n] for n in node.all_input_nodes)):
            if last_use[owner] == index:
                live -= sizes.get(owner, 0)
    return peak


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and bool(getattr(node.target, "is_view", False))


def _elementwise(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _CASTS:
        return True
    return torch.Tag.pointwise in getattr(node.target, "tags", ())


def _fused_away(node: fx.Node) -> bool:
    """An elementwise node that Inductor computes inside each user's kernel (through views)."""
    if not _elementwise(node):
        return False
    users = _users_through_views(node)
    return bool(users) and all(
        _elementwise(user)
        or user.target is aten.copy_.default
        or torch.Tag.reduction in getattr(user.target, "tags", ())
        for user in users
    )


def _users_through_views(node: fx.Node) -> list[fx.Node]:
    users = []
    for user in node.users:
        users.extend(_users_through_views(user) if _is_view(user) else [user])
    return users

"""How an output that has no batch dimension (a loss) combines over parts of the batch.

Micro-batching and gradient accumulation run a step on parts of a batch and must combine the
parts' losses (and their gradients) so the result equals the whole batch's. That depends on how
the loss reduces the batch: an average over the batch is the average of the parts' averages; a
sum is the sum of the parts' sums. This reads it off the traced graph: the reduction of the op
that made the output, through scaling by constants and sums of losses.
"""

from __future__ import annotations

import operator
from typing import Literal

import torch
from torch import fx

aten = torch.ops.aten
Reduction = Literal["mean", "sum"]

#: loss ops and the position of their `reduction` argument (0 none, 1 mean, 2 sum)
_LOSS_OPS = {
    aten.nll_loss_forward.default: 3,
    aten.nll_loss2d_forward.default: 3,
    aten.mse_loss.default: 2,
    aten.l1_loss.default: 2,
    aten.smooth_l1_loss.default: 2,
    aten.huber_loss.default: 2,
    aten.binary_cross_entropy.default: 3,
    aten.binary_cross_entropy_with_logits.default: 4,
    aten.kl_div.default: 2,
    aten.soft_margin_loss.default: 2,
    aten.multilabel_margin_loss_forward.default: 2,
    aten.multi_margin_loss.default: 5,
}
_MEANS = (aten.mean.default, aten.mean.dim)
_SUMS = (aten.sum.default, aten.sum.dim_IntList)
_SCALES = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default)
_PASS_THROUGH = (aten.clone.default, aten._to_copy.default, aten.view.default, aten.squeeze.default)


def batch_reduction(node: fx.Node) -> Reduction | None:
    """'mean' or 'sum' for the batch reduction that produced `node`; None when it cannot tell."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    target = node.target
    if target is operator.getitem:
        return batch_reduction(node.args[0])
    if target in _LOSS_OPS:
        return _from_reduction_arg(node, _LOSS_OPS[target])
    if target in _MEANS:
        return "mean"
    if target in _SUMS:
        return "sum"
    if target in _PASS_THROUGH:
        return batch_reduction(node.args[0])
    if target in _SCALES:
        return _scaled(node)
    if target in (aten.add.Tensor, aten.sub.Tensor):
        found = {batch_reduction(a) for a in node.args[:2] if isinstance(a, fx.Node)}
        return found.pop() if len(found) == 1 else None
    return None


def _from_reduction_arg(node: fx.Node, index: int) -> Reduction | None:
    schema_name = node.target._schema.arguments[index].name
    value = node.args[index] if len(node.args) > index else node.kwargs.get(schema_name, 1)
    return {1: "mean", 2: "sum"}.get(value)


def _scaled(node: fx.Node) -> Reduction | None:
    """A loss times or over a constant (a number, or a tensor that does not depend on the batch)."""
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if node.target in (aten.div.Tensor, aten.div.Scalar):
        tensors = tensors[:1] if node.args and node.args[0] in tensors else []
    found = [batch_reduction(a) for a in tensors]
    known = [r for r in found if r is not None]
    return known[0] if len(known) == 1 and len(found) >= 1 else None

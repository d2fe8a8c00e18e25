"""`-mb/--microbatch-size`: trace the step on the batch and on one micro-batch, and let the
micro-batching pass (`passes/microbatch.py`) build the batch's step from micro-batch steps."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from sambaflow.errors import SambaTraceError
from sambaflow.optim.base import SambaOptimizer
from sambaflow.passes.microbatch import check_microbatch_size, microbatched
from sambaflow.tensors.sambatensor import SambaTensor
from sambaflow.trace.graph import INPUT, TracedGraph
from sambaflow.trace.tracer import trace_step


def trace_microbatched(
    model: nn.Module,
    inputs: Sequence[torch.Tensor | None],
    optimizers: Sequence[SambaOptimizer],
    microbatch_size: int | None,
    note: Callable[[str], None],
    loss_indices: Sequence[int] | None = None,
    graphamp: str | None = None,
) -> TracedGraph:
    """The traced step; with a micro-batch size smaller than the batch, the micro-batched step.

    Forward-only graphs are not micro-batched: they keep no activations for a backward.
    `graphamp` is the GraphAMP preset (trace/precision.py).
    """
    training = bool(optimizers)
    full = trace_step(
        model, inputs, optimizers, loss_indices=loss_indices, backward=training, graphamp=graphamp
    )
    if not microbatch_size or not optimizers:
        return full
    if isinstance(inputs, Mapping):
        raise SambaTraceError(
            "micro-batching (-mb) a step traced as forward(**inputs) is not supported: compile "
            "without -mb, or trace with a tuple of inputs"
        )
    batch = _batch_size(full)
    check_microbatch_size(full.inputs, batch, microbatch_size)
    if microbatch_size == batch:
        note(f"micro-batch size {microbatch_size} is the whole batch: the step is not split")
        return full
    parts = [_first_part(value, microbatch_size) for value in inputs]
    micro = trace_step(model, parts, optimizers, loss_indices=loss_indices, backward=True, graphamp=graphamp)
    graph, notes = microbatched(full, micro, batch // microbatch_size)
    for line in notes:
        note(line)
    return graph


def _batch_size(graph: TracedGraph) -> int:
    sizes = {s.shape[s.batch_dim] for s in graph.inputs if s.role == INPUT and s.batch_dim is not None}
    if len(sizes) > 1:
        raise SambaTraceError(
            f"micro-batching: the batch inputs have different batch sizes {sorted(sizes)}; "
            "give every input with batch_dim the same batch size"
        )
    return sizes.pop() if sizes else 0


def _first_part(value: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """The first micro-batch of an input (same name); inputs without a batch dimension as they are."""
    dim = getattr(value, "batch_dim", None)
    if value is None or dim is None:
        return value
    part = value.as_subclass(torch.Tensor).detach().narrow(dim, 0, size).clone()
    return SambaTensor(part, name=value.sn_name, batch_dim=dim, requires_grad=value.requires_grad)

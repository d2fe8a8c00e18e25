"""`trace_graph`: trace (or load) a model's step and make it the session's current graph."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from sambaflow.errors import SambaTraceError
from sambaflow.optim.base import SambaOptimizer
from sambaflow.runtime.executable import Executable
from sambaflow.runtime.session import session
from sambaflow.tensors.sambatensor import SambaTensor
from sambaflow.trace.tracer import trace_step


def optimizer_list(optim: SambaOptimizer | Sequence[SambaOptimizer] | None) -> list[SambaOptimizer]:
    if optim is None:
        return []
    if isinstance(optim, (list, tuple)):
        return list(optim)
    return [optim]


def trace_graph(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    optim: Any = None,
    init_output_grads: bool = True,
    loss_indices: Sequence[int] | None = None,
    pef: str | None = "",
    mapping: str = "section",
    data_parallel_mode: str = "normal",
    transfer_device: bool = True,
    backend: str = "reference",
    **_: Any,
) -> list[SambaTensor]:
    """Trace `model` (forward, backward and `optim`'s update) and load it into the session.

    With no optimizer the graph is forward-only (inference). Returns the graph's outputs, also
    stored as `model.output_tensors`.
    """
    optimizers = optimizer_list(optim)
    if pef:
        raise SambaTraceError(f"trace_graph(pef={pef!r}): loading PEF files is not available yet")
    graph = trace_step(model, inputs, optimizers, loss_indices=loss_indices, backward=bool(optimizers))
    session.trace_count += 1
    outputs = session.load(Executable.build(graph, backend), model, optimizers, init_output_grads)
    model.output_tensors = outputs
    return outputs

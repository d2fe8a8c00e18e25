"""Micro-batching: the step on a batch of B runs B/m micro-batches through forward and backward in
turn, adding up their gradients, then updates the weights once.

The step is traced twice: on the whole batch (the graph the app sees, with its inputs and outputs)
and on one micro-batch of m. This pass builds the whole-batch step from the micro-batch trace:
each micro-batch's forward and backward are copied into one graph, reading slices of the batch
inputs; gradients are summed; `gradnorm` and `opt` run once on the sum. Everything happens inside
one program (one host call per step), and a micro-batch's activations are dead once its backward
ran, so peak activation memory follows m, not B.

Outputs come back for the whole batch: per-sample outputs are concatenated; a loss that averages
over the batch is the average of the micro-batch losses (and each micro-batch's backward is
seeded with 1/(B/m) of the loss's seed), a loss that sums is their sum. Buffers that forward
updates in place (BatchNorm's running statistics) are updated once per micro-batch, as eager
PyTorch's gradient accumulation does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from sambaflow.errors import SambaTraceError
from sambaflow.passes.batch_reduction import batch_reduction
from sambaflow.trace.graph import GRAD, INPUT, INPUT_GRAD, OUTPUT, OUTPUT_GRAD, TensorSpec, TracedGraph

aten = torch.ops.aten
_PER_MICROBATCH = ("fwd", "bckwd")


@dataclass(frozen=True)
class Combine:
    """How one output is made whole from its micro-batch parts: concatenated along `dim`, or
    reduced ('mean' or 'sum')."""

    dim: int | None = None
    reduction: str = "sum"


def check_microbatch_size(inputs: list[TensorSpec], batch: int, size: int) -> None:
    """Raise a clear error unless `size` divides the batch; name both numbers."""
    if size <= 0 or batch % size:
        raise SambaTraceError(
            f"micro-batch size {size} does not divide the batch size {batch}: pass a "
            f"-mb/--microbatch-size that divides -b/--batch-size {batch} (for example "
            f"{', '.join(str(d) for d in _divisors(batch)[:6])})"
        )
    if not any(s.role == INPUT and s.batch_dim is not None for s in inputs):
        raise SambaTraceError(
            "micro-batching needs inputs with a batch dimension: create them with batch_dim=0 "
            "(samba.randn(..., batch_dim=0) or samba.from_torch_tensor(t, name=..., batch_dim=0))"
        )


def microbatched(full: TracedGraph, micro: TracedGraph, count: int) -> tuple[TracedGraph, list[str]]:
    """The whole-batch step made of `count` micro-batch steps; and notes for the compile log."""
    _check_same_names(full, micro)
    combines, notes = _combines(full, micro, count)
    builder = _Builder(full, micro, count, combines)
    module = builder.build()
    graph = TracedGraph(
        module,
        full.inputs,
        full.outputs,
        full.sections,
        full.loss_names,
        full.hyper_defaults,
        full.baked,
        full.precision,
        origin=full,
    )
    size = next(s.shape[s.batch_dim] for s in micro.inputs if s.role == INPUT and s.batch_dim is not None)
    notes.insert(0, f"micro-batching: {count} micro-batches of {size} per step, unrolled in one program")
    return graph, notes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_same_names(full: TracedGraph, micro: TracedGraph) -> None:
    pairs = (("inputs", full.inputs, micro.inputs), ("outputs", full.outputs, micro.outputs))
    for what, a, b in pairs:
        if [(s.name, s.role) for s in a] != [(s.name, s.role) for s in b]:
            raise SambaTraceError(
                f"micro-batching: the step traced on one micro-batch has other {what} than on the "
                "whole batch (does forward() branch on the batch size?)"
            )


def _combines(full: TracedGraph, micro: TracedGraph, count: int) -> tuple[dict[str, Combine], list[str]]:
    """How each model output and input gradient is made whole, from the two traces' shapes."""
    returned = dict(zip((s.name for s in micro.outputs), micro.returned_nodes()))
    combines, notes = {}, []
    for whole, part in zip(full.outputs, micro.outputs):
        if whole.role not in (OUTPUT, INPUT_GRAD):
            continue
        if whole.shape == part.shape:
            reduction = batch_reduction(returned[whole.name])
            if reduction is None:
                notes.append(
                    f"micro-batching: output '{whole.name}' has no batch dimension and its reduction "
                    "over the batch is not recognised: micro-batch values are averaged"
                )
            combines[whole.name] = Combine(None, reduction or "mean")
            continue
        dim = _batch_dim(whole, part, count)
        combines[whole.name] = Combine(dim)
    losses = [f"'{n}' ({combines[n].reduction})" for n in full.loss_names if n in combines]
    if losses:
        notes.append(f"micro-batching: losses combined over micro-batches as {', '.join(losses)}")
    return combines, notes


def _batch_dim(whole: TensorSpec, part: TensorSpec, count: int) -> int:
    differ = [i for i, (a, b) in enumerate(zip(whole.shape, part.shape)) if a != b]
    if (
        len(whole.shape) == len(part.shape)
        and len(differ) == 1
        and whole.shape[differ[0]] == count * part.shape[differ[0]]
    ):
        return differ[0]
    raise SambaTraceError(
        f"micro-batching: output '{whole.name}' has shape {list(whole.shape)} for the batch and "
        f"{list(part.shape)} for a micro-batch; only outputs with one batch dimension (or none) "
        "can be put together from micro-batches"
    )


class _Builder:
    """Copies the micro-batch step `count` times into a graph over the whole-batch inputs."""

    def __init__(
        self, full: TracedGraph, micro: TracedGraph, count: int, combines: dict[str, Combine]
    ) -> None:
        self.full, self.micro, self.count, self.combines = full, micro, count, combines
        self.graph = fx.Graph()
        self.seed_of = {f"{name}__grad": name for name in combines}

    def build(self) -> fx.GraphModule:
        whole = self._placeholders()
        placeholders = [n for n in self.micro.module.graph.nodes if n.op == "placeholder"]
        nodes = [n for n in self.micro.module.graph.nodes if n.op not in ("placeholder", "output")]
        per_part = [n for n in nodes if n.meta.get("section") in _PER_MICROBATCH]
        returned = self.micro.returned_nodes()
        running: list[Any] = [None] * len(returned)
        for index in range(self.count):
            part = self._copy_part(index, whole, placeholders, per_part, returned)
            running = self._add_part(running, part)  # sums as they come: one partial sum lives
        whole_outputs = self._finish(running)
        # gradnorm and opt, once, on the whole batch's (summed) gradients
        env = dict(zip(placeholders, (whole[s.name] for s in self.micro.inputs)))
        env |= {node: value for node, value in zip(returned, whole_outputs) if value is not None}
        once = set(per_part)
        for node in nodes:
            if node not in once:
                env[node] = self.graph.node_copy(node, lambda n: self._once(n, env))
        outputs = [env[node] if value is None else value for node, value in zip(returned, whole_outputs)]
        self.graph.output(tuple(outputs))
        return fx.GraphModule(self.micro.module, self.graph)

    def _copy_part(
        self,
        index: int,
        whole: dict[str, fx.Node],
        placeholders: list[fx.Node],
        per_part: list[fx.Node],
        returned: list[fx.Node],
    ) -> list[fx.Node | None]:
        """Micro-batch `index`'s forward and backward; its values of the step's outputs."""
        env = {
            p: self._part_input(spec, whole[spec.name], p, index)
            for p, spec in zip(placeholders, self.micro.inputs)
        }
        for node in per_part:
            env[node] = self.graph.node_copy(node, env.__getitem__)
            env[node].meta["microbatch"] = index  # backends keep the parts in order (peak memory)
        return [env.get(node) for node in returned]

    def _placeholders(self) -> dict[str, fx.Node]:
        made = {}
        for node, spec in zip(
            (n for n in self.full.module.graph.nodes if n.op == "placeholder"), self.full.inputs
        ):
            made[spec.name] = self.graph.placeholder(node.name)
            made[spec.name].meta = dict(node.meta)
        return made

    def _once(self, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        if node in env:
            return env[node]
        raise SambaTraceError(
            f"micro-batching: the optimizer step reads '{node.name}' from forward or backward, which "
            "is not a gradient; this step cannot be micro-batched (compile without -mb)"
        )

    def _part_input(self, spec: TensorSpec, whole: fx.Node, traced: fx.Node, index: int) -> fx.Node:
        """Micro-batch `index`'s view of a whole-batch input: a slice of a batch input or of an
        output's gradient seed, a loss seed scaled for an average; other inputs as they are."""
        if spec.role == INPUT and spec.batch_dim is not None:
            return self._slice(whole, traced, spec.batch_dim, index, "fwd")
        combine = self.combines.get(self.seed_of.get(spec.name, ""))
        if spec.role != OUTPUT_GRAD or combine is None:
            return whole
        if combine.dim is not None:
            return self._slice(whole, traced, combine.dim, index, "bckwd")
        if combine.reduction == "mean":
            return self._call(aten.div.Tensor, (whole, self.count), traced, "bckwd")
        return whole

    def _slice(self, whole: fx.Node, traced: fx.Node, dim: int, index: int, section: str) -> fx.Node:
        size = traced.meta["val"].shape[dim]
        return self._call(aten.slice.Tensor, (whole, dim, index * size, (index + 1) * size), traced, section)

    def _call(self, target, args, like: fx.Node, section: str) -> fx.Node:
        node = self.graph.call_function(target, args)
        node.meta = {"val": like.meta.get("val"), "section": section}
        return node

    def _add_part(self, running: list[Any], part: list[fx.Node | None]) -> list[Any]:
        """Fold one micro-batch's outputs in: concatenated outputs are collected, reduced ones and
        gradients added to the running sum right away (earlier parts' gradients then die)."""
        folded: list[Any] = []
        for spec, total, value, whole_node in zip(
            self.full.outputs, running, part, self.full.returned_nodes()
        ):
            combine = self._combine_of(spec)
            if value is None or combine is None:
                folded.append(value)  # made by gradnorm/opt (None), or kept from the last part
            elif combine.dim is not None:
                folded.append([*(total or []), value])
            elif total is None:
                folded.append(value)
            else:
                folded.append(self._call(aten.add.Tensor, (total, value), whole_node, _section(spec)))
        return folded

    def _finish(self, running: list[Any]) -> list[fx.Node | None]:
        """Whole-batch values of the per-micro-batch outputs (None where opt makes the output)."""
        finished: list[fx.Node | None] = []
        for spec, total, whole_node in zip(self.full.outputs, running, self.full.returned_nodes()):
            combine = self._combine_of(spec)
            if isinstance(total, list):
                total = self._call(aten.cat.default, (total, combine.dim), whole_node, _section(spec))
            elif total is not None and combine is not None and combine.reduction == "mean":
                total = self._call(aten.div.Tensor, (total, self.count), whole_node, _section(spec))
            finished.append(total)
        return finished

    def _combine_of(self, spec: TensorSpec) -> Combine | None:
        return self.combines.get(spec.name, Combine(None, "sum") if spec.role == GRAD else None)


def _section(spec: TensorSpec) -> str:
    return "bckwd" if spec.role in (GRAD, INPUT_GRAD) else "fwd"

"""The traced whole-step graph: an fx graph of ATen ops with named inputs, outputs and sections."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from sambaflow.trace.printing import section_lines

#: roles of graph inputs
INPUT, PARAM, BUFFER, STATE, HYPER, OUTPUT_GRAD = "input", "param", "buffer", "state", "hyper", "output_grad"
#: roles of graph outputs
OUTPUT, GRAD, INPUT_GRAD, PARAM_UPDATE, STATE_UPDATE = (
    "output",
    "grad",
    "input_grad",
    "param_update",
    "state_update",
)

SECTION_ORDER = ("fwd", "bckwd", "gradnorm", "opt")


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor the graph reads or writes."""

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    batch_dim: int | None = None

    @staticmethod
    def of(name: str, role: str, tensor: torch.Tensor, batch_dim: int | None = None) -> TensorSpec:
        return TensorSpec(name, role, tuple(tensor.shape), tensor.dtype, batch_dim)

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        return f"{self.name} [{shape} {str(self.dtype).replace('torch.', '')}]"


@dataclass
class TracedGraph:
    """The whole training (or inference) step.

    `module`'s placeholders are `inputs` in order; its outputs are `outputs` in order. Every
    call node carries `meta['section']`. Outputs named like an input (updated parameters and
    optimizer state) overwrite that input in the device tensor store.
    """

    module: fx.GraphModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sections: list[str]
    loss_names: list[str] = field(default_factory=list)
    hyper_defaults: dict[str, float] = field(default_factory=dict)
    baked: list[str] = field(default_factory=list)
    #: what a PEF records: fp32, bf16, bf16-mixed (GraphAMP mp1), ... (trace/precision.py)
    precision: str = "fp32"
    #: the app's trace this graph was made from by a pass (micro-batching): PEFs record and match
    #: the app's trace, which the app makes anew at run time
    origin: TracedGraph | None = None

    _by_role: dict[tuple[str, ...], list[TensorSpec]] = field(default_factory=dict, repr=False)

    @property
    def model_outputs(self) -> list[TensorSpec]:
        if ("__outputs__",) not in self._by_role:
            self._by_role[("__outputs__",)] = [spec for spec in self.outputs if spec.role == OUTPUT]
        return self._by_role[("__outputs__",)]

    def returned_nodes(self) -> list[fx.Node]:
        """The nodes `module` returns, in `outputs` order."""
        return list(next(n for n in self.module.graph.nodes if n.op == "output").args[0])

    def inputs_with_role(self, *roles: str) -> list[TensorSpec]:
        # The run loop asks for these every step; the graph never changes once traced.
        if roles not in self._by_role:
            self._by_role[roles] = [spec for spec in self.inputs if spec.role in roles]
        return self._by_role[roles]

    def as_text(self) -> str:
        """The graph, readable: named inputs, ops grouped by section, named outputs."""
        placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        names = {node: spec.name for node, spec in zip(placeholders, self.inputs)}
        lines = [
            f"graph: {len(self.inputs)} inputs, {len(self.outputs)} outputs, sections {', '.join(self.sections)}",
            "inputs:",
        ]
        lines += [f"  {spec.describe():60s} {spec.role}" for spec in self.inputs]
        lines += section_lines(self.module.graph, names)
        lines.append("outputs:")
        for spec, value in zip(self.outputs, self.returned_nodes()):
            lines.append(f"  {spec.describe():60s} {spec.role} <- {names.get(value, value.name)}")
        if self.baked:
            lines.append("baked in at trace time: " + "; ".join(self.baked))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.as_text()

"""Regions: named device tensors that several graphs of one PEF share (SambaFlow's multigraph).

Every graph input and output has a region, its `sn_region_name` (by default its own name). Two
tensors of the same region are one device tensor: a graph reads an input from its region, and
writes an output into its region, so an output whose region is one of the graph's inputs updates
that input in place (a KV cache), and one graph's output is the next graph's input without a trip
to the host. `bind_regions` renames a traced graph's inputs and outputs to their regions; the
runtime's store is then keyed by region.

Rules, checked across all graphs before anything compiles (errors name both tensors): one graph
reads a region through at most one input and writes it through at most one output; all tensors
of a region have one shape; and one dtype, except integers: an integer output written into a
region of another integer dtype is cast to it (as SambaFlow computes indices in int32: an index
the model computes in int64 lands in an int32 region).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx

from sambaflow.errors import SambaTraceError
from sambaflow.trace.graph import INPUT, OUTPUT, TensorSpec, TracedGraph


def region_of(tensor: torch.Tensor) -> str:
    """A tensor's region: its `sn_region_name`, else its name."""
    region = getattr(tensor, "sn_region_name", None)
    return region if region is not None else tensor.sn_name


@dataclass
class GraphRegions:
    """One graph and the region of each of its inputs (by input name) and outputs (in order)."""

    name: str
    traced: TracedGraph
    inputs: dict[str, str]
    outputs: list[str]

    def uses(self) -> list[tuple[str, str, TensorSpec]]:
        """(region, 'input'/'output', spec) for every input and output."""
        found = [(self.inputs.get(s.name, s.name), "input", s) for s in self.traced.inputs_with_role(INPUT)]
        found += [(r, "output", s) for r, s in zip(self.outputs, self.traced.model_outputs)]
        return found


def plan_regions(graphs: list[GraphRegions]) -> dict[str, TensorSpec]:
    """Each region's shape and dtype (its first input's, else its first output's), after checking
    the rules above; raises `SambaTraceError` naming the tensors that break one."""
    first: dict[str, tuple[str, TensorSpec]] = {}
    for graph in graphs:
        _check_once_per_graph(graph)
        uses = sorted(graph.uses(), key=lambda use: use[1] != "input")  # inputs fix a region's dtype
        for region, role, spec in uses:
            where = f"graph '{graph.name}' {role} '{spec.name}'"
            if region not in first:
                first[region] = (where, spec)
            else:
                _check_same(region, first[region], (where, spec))
    return {region: TensorSpec(region, INPUT, spec.shape, spec.dtype) for region, (_, spec) in first.items()}


def _check_once_per_graph(graph: GraphRegions) -> None:
    for role, regions in (("inputs", list(graph.inputs.values())), ("outputs", graph.outputs)):
        twice = sorted({r for r in regions if regions.count(r) > 1})
        if twice:
            raise SambaTraceError(
                f"graph '{graph.name}': several {role} share region(s) {twice}; a graph may read a "
                f"region through one input and write it through one output: give them distinct sn_region_name"
            )


def _check_same(region: str, seen: tuple[str, TensorSpec], new: tuple[str, TensorSpec]) -> None:
    (where_a, a), (where_b, b) = seen, new
    integers = (
        not a.dtype.is_floating_point
        and not b.dtype.is_floating_point
        and torch.bool not in (a.dtype, b.dtype)
    )
    if a.shape != b.shape or (a.dtype != b.dtype and not integers):
        raise SambaTraceError(
            f"region '{region}': {where_a} is {a.describe()} but {where_b} is {b.describe()}; tensors "
            f"of one region are one device tensor and must agree in shape and dtype (set a distinct "
            f"sn_region_name, or cast the tensor in the model)"
        )


def bind_regions(graph: GraphRegions, regions: dict[str, TensorSpec]) -> TracedGraph:
    """A copy of `graph.traced` whose inputs and outputs are named by region, with integer outputs
    cast to their region's dtype."""
    traced = graph.traced
    module = fx.GraphModule(traced.module, copy.deepcopy(traced.module.graph))
    inputs = [_renamed(s, graph.inputs.get(s.name, s.name)) if s.role == INPUT else s for s in traced.inputs]
    outputs, index = [], 0
    for spec in traced.outputs:
        if spec.role != OUTPUT:
            outputs.append(spec)
            continue
        region = graph.outputs[index]
        dtype = regions[region].dtype
        if dtype != spec.dtype:
            _cast_output(module, index, dtype)
        outputs.append(TensorSpec(region, OUTPUT, spec.shape, dtype, spec.batch_dim))
        index += 1
    module.recompile()
    bound = copy.copy(traced)
    bound.module, bound.inputs, bound.outputs, bound._by_role = module, inputs, outputs, {}
    return bound


def _renamed(spec: TensorSpec, name: str) -> TensorSpec:
    return TensorSpec(name, spec.role, spec.shape, spec.dtype, spec.batch_dim)


def _cast_output(module: fx.GraphModule, index: int, dtype: torch.dtype) -> None:
    output = next(n for n in module.graph.nodes if n.op == "output")
    values = list(output.args[0])
    with module.graph.inserting_before(output):
        cast = module.graph.call_function(torch.ops.aten._to_copy.default, (values[index],), {"dtype": dtype})
    cast.meta = {"section": values[index].meta.get("section", "fwd")}
    value = values[index].meta.get("val")
    if isinstance(value, torch.Tensor):
        cast.meta["val"] = value.to(dtype)
    values[index] = cast
    output.args = (tuple(values) if isinstance(output.args[0], tuple) else values,)


__all__ = ["GraphRegions", "bind_regions", "plan_regions", "region_of"]

"""Probe programs: the part of the traced step that computes chosen nodes, with them as outputs.

`test` compiles these to find the first node where a compiled program and the reference backend
part ways (`app/bisect.py`). A probe reads the graph's own named inputs and returns each chosen
node's value under the node's name.
"""

from __future__ import annotations

from torch import fx

from sambaflow.passes.sections import SectionProgram
from sambaflow.trace.graph import TracedGraph


def probe_program(graph: TracedGraph, wanted: list[fx.Node], name: str = "probe") -> SectionProgram:
    """A program computing `wanted` (in that order) from the graph inputs they depend on."""
    needed = _ancestors(wanted)
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    input_names = dict(zip(placeholders, (s.name for s in graph.inputs)))
    new_graph, env, inputs = fx.Graph(), {}, []
    for node in graph.module.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            inputs.append(input_names[node])
            env[node] = new_graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
        else:
            env[node] = new_graph.node_copy(node, lambda n: env[n])
    new_graph.output(tuple(env[node] for node in wanted))
    return SectionProgram(name, fx.GraphModule(graph.module, new_graph), inputs, [n.name for n in wanted])


def _ancestors(wanted: list[fx.Node]) -> set[fx.Node]:
    """`wanted` and every node they read, directly or not."""
    found, stack = set(), list(wanted)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack += node.all_input_nodes
    return found

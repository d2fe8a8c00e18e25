"""Cut the traced step into one program per section, plus the fused whole-step program.

A section program reads named tensors from the device tensor store and writes named tensors back.
Values that one section computes and a later one uses (activations that `bckwd` needs, gradients
that `opt` needs) travel through the store under the name `__saved__<node>`, so running
`['fwd']` then `['bckwd', 'opt']` computes exactly what one full run computes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from sambaflow.trace.graph import TracedGraph
from sambaflow.trace.printing import node_text

SAVED_PREFIX = "__saved__"
FULL_STEP = "step"


@dataclass
class SectionProgram:
    """A graph over named store tensors: `module(*store[inputs]) -> store[outputs]`."""

    name: str
    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]

    def as_text(self) -> str:
        placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        names = dict(zip(placeholders, self.inputs))
        body = [node_text(n, names) for n in self.module.graph.nodes if n.op not in ("placeholder", "output")]
        return "\n".join(
            [f"program {self.name}({', '.join(self.inputs)})"]
            + ["  " + b for b in body]
            + [f"  -> {', '.join(self.outputs)}"]
        )


def full_step_program(graph: TracedGraph) -> SectionProgram:
    """The whole step as one program (the fast path for a run of every section)."""
    return SectionProgram(
        FULL_STEP, graph.module, [s.name for s in graph.inputs], [s.name for s in graph.outputs]
    )


def section_programs(graph: TracedGraph) -> dict[str, SectionProgram]:
    """One program per section, in section order."""
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    input_names = {node: spec.name for node, spec in zip(placeholders, graph.inputs)}
    output_node = next(n for n in graph.module.graph.nodes if n.op == "output")
    graph_outputs = list(zip(output_node.args[0], (s.name for s in graph.outputs)))
    return {section: _cut(graph, section, input_names, graph_outputs) for section in graph.sections}


def _value_name(node: fx.Node, input_names: dict[fx.Node, str]) -> str:
    return input_names.get(node, SAVED_PREFIX + node.name)


def _cut(
    graph: TracedGraph,
    section: str,
    input_names: dict[fx.Node, str],
    graph_outputs: list[tuple[fx.Node, str]],
) -> SectionProgram:
    members = [n for n in graph.module.graph.nodes if n.meta.get("section") == section]
    member_set = set(members)
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            inputs.append(_value_name(node, input_names))
            env[node] = new_graph.placeholder(_identifier(inputs[-1]))
            env[node].meta = dict(node.meta)
        return env[node]

    for node in members:
        env[node] = new_graph.node_copy(node, lookup)
    outputs = [(node, name) for node, name in graph_outputs if node in member_set]
    later = _used_later(members, member_set)
    outputs += [(node, SAVED_PREFIX + node.name) for node in later]
    new_graph.output(tuple(env[node] for node, _ in outputs))
    module = fx.GraphModule(graph.module, new_graph)
    return SectionProgram(section, module, inputs, [name for _, name in outputs])


def _used_later(members: list[fx.Node], member_set: set[fx.Node]) -> list[fx.Node]:
    """Members whose values a node outside this section (a later section) reads."""
    return [n for n in members if any(u not in member_set and u.op != "output" for u in n.users)]


def _identifier(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else "t_" + cleaned

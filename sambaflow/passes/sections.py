"""Cut the traced step into one program per section, plus the fused whole-step program.

A section program reads named tensors from the device tensor store and writes named tensors back.
Values that one section computes and a later one uses travel through the store: a graph output
(a gradient that `opt` reads) under its own name, other values (activations that `bckwd` needs)
under the name `__saved__<node>`, so running `['fwd']` then `['bckwd', 'opt']` computes exactly
what one full run computes.

Gradient accumulation and data parallel need the gradients between backward and the update: for
them `grads` (fwd and bckwd as one program) and `update` (gradnorm and opt) are cut the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from sambaflow.trace.graph import TracedGraph
from sambaflow.trace.printing import node_text

SAVED_PREFIX = "__saved__"
FULL_STEP = "step"
#: programs that split the step where the gradients are complete: (name, sections)
SPLIT_AT_GRADIENTS = (("grads", ("fwd", "bckwd")), ("update", ("gradnorm", "opt")))


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
    return _cuts(graph, [(section, (section,)) for section in graph.sections])


def split_programs(graph: TracedGraph) -> dict[str, SectionProgram]:
    """`grads` (forward and backward) and `update` (gradnorm and opt) of a training graph."""
    return _cuts(graph, list(SPLIT_AT_GRADIENTS))


def _cuts(graph: TracedGraph, cuts: list[tuple[str, tuple[str, ...]]]) -> dict[str, SectionProgram]:
    """A program per (name, sections): the nodes of those sections, over named store values."""
    graph_outputs = list(zip(graph.returned_nodes(), (s.name for s in graph.outputs)))
    value_names = _value_names(graph, graph_outputs)
    return {name: _cut(graph, name, sections, value_names, graph_outputs) for name, sections in cuts}


def _value_names(graph: TracedGraph, graph_outputs: list[tuple[fx.Node, str]]) -> dict[fx.Node, str]:
    """Store names of the values programs pass on: the graph's inputs and outputs by name."""
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    names = dict(zip(placeholders, (s.name for s in graph.inputs)))
    for node, name in graph_outputs:
        names.setdefault(node, name)
    return names


def _cut(
    graph: TracedGraph,
    name: str,
    sections: tuple[str, ...],
    value_names: dict[fx.Node, str],
    graph_outputs: list[tuple[fx.Node, str]],
) -> SectionProgram:
    members = [n for n in graph.module.graph.nodes if n.meta.get("section") in sections]
    member_set = set(members)
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            inputs.append(value_names.get(node, SAVED_PREFIX + node.name))
            env[node] = new_graph.placeholder(_identifier(inputs[-1]))
            env[node].meta = dict(node.meta)
        return env[node]

    for node in members:
        env[node] = new_graph.node_copy(node, lookup)
    outputs = [(node, out) for node, out in graph_outputs if node in member_set]
    later = [node for node in _used_later(members, member_set) if node not in value_names]
    outputs += [(node, SAVED_PREFIX + node.name) for node in later]
    new_graph.output(tuple(env[node] for node, _ in outputs))
    module = fx.GraphModule(graph.module, new_graph)
    return SectionProgram(name, module, inputs, [out for _, out in outputs])


def _used_later(members: list[fx.Node], member_set: set[fx.Node]) -> list[fx.Node]:
    """Members whose values a node outside this section (a later section) reads."""
    return [n for n in members if any(u not in member_set and u.op != "output" for u in n.users)]


def _identifier(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else "t_" + cleaned

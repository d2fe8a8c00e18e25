"""Readable text for traced graphs and section programs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

if TYPE_CHECKING:
    from sambaflow.trace.graph import TracedGraph


def node_text(node: fx.Node, names: dict[fx.Node, str]) -> str:
    args = fx.node.map_arg(node.args, lambda n: names.get(n, n.name))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: names.get(n, n.name))
    target = getattr(node.target, "__name__", str(node.target))
    if hasattr(node.target, "_overloadpacket"):
        target = str(node.target).replace("aten.", "", 1).removesuffix(".default")
    parts = [", ".join(map(str, args))] + [f"{k}={v}" for k, v in kwargs.items()]
    meta = node.meta.get("val")
    shape = (
        f"  # {list(meta.shape)} {str(meta.dtype).replace('torch.', '')}" if hasattr(meta, "shape") else ""
    )
    return f"{names.get(node, node.name)} = {target}({', '.join(p for p in parts if p)}){shape}"


def graph_text(graph: TracedGraph) -> str:
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    names = {node: spec.name for node, spec in zip(placeholders, graph.inputs)}
    lines = [
        f"graph: {len(graph.inputs)} inputs, {len(graph.outputs)} outputs, "
        f"sections {', '.join(graph.sections)}",
        "inputs:",
    ]
    lines += [f"  {spec.describe():60s} {spec.role}" for spec in graph.inputs]
    current = None
    for node in graph.module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        section = node.meta.get("section")
        if section != current:
            lines.append(f"section {section}:")
            current = section
        lines.append("  " + node_text(node, names))
    lines.append("outputs:")
    for spec, value in zip(graph.outputs, graph.returned_nodes()):
        lines.append(f"  {spec.describe():60s} {spec.role} <- {names.get(value, value.name)}")
    if graph.baked:
        lines.append("baked in at trace time: " + "; ".join(graph.baked))
    return "\n".join(lines)

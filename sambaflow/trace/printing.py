"""Readable text for graph nodes, shared by the traced graph and the section programs.

It knows fx graphs only, no TracedGraph: `graph.py` imports it, not the other way round.
"""

from __future__ import annotations

from torch import fx


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


def section_lines(graph: fx.Graph, names: dict[fx.Node, str]) -> list[str]:
    """The ops in order, under a `section <name>:` line wherever the section changes."""
    lines, current = [], None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.meta.get("section") != current:
            current = node.meta.get("section")
            lines.append(f"section {current}:")
        lines.append("  " + node_text(node, names))
    return lines

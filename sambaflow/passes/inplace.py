"""Turn a program's functional state updates into in-place writes of its inputs.

A traced step returns new parameters and optimizer state under the input's name; the runtime then
replaces the stored tensor, so every step allocates a second copy of the weights. This pass writes
each such output back into its input instead (`aten.copy_(input, new_value)` at the end of the
graph) and stops returning it. Compilers that honour input mutation (Inductor through
`compile_fx`, AOTInductor through `torch.export`) then update the stored tensor in place.

The caller must then pass the stored tensors themselves (not copies), each in its own memory,
and must not store the dropped outputs: `result.updated` names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from sambaflow.passes.sections import SectionProgram

aten = torch.ops.aten


@dataclass
class InPlaceResult:
    """The rewritten program, the inputs it now updates in place, and inputs left functional (why)."""

    program: SectionProgram
    updated: list[str]
    kept_functional: dict[str, str]


def update_inputs_in_place(program: SectionProgram) -> InPlaceResult:
    """A copy of `program` whose outputs named like one of its inputs are written into that input."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    returned = graph.graph_copy(program.module.graph, env)
    placeholders = [env[n] for n in program.module.graph.nodes if n.op == "placeholder"]
    by_name = dict(zip(program.inputs, placeholders))
    pairs = list(zip(_as_list(returned), program.outputs))
    blocked = _blocked_inputs(pairs, by_name)
    kept: list[tuple[fx.Node, str]] = []
    updated: list[str] = []
    for value, name in pairs:
        target = by_name.get(name)
        if target is None or name in blocked:
            kept.append((value, name))
        elif value is not target:  # an output that is its input unchanged needs no write
            _write_back(graph, target, value)
            updated.append(name)
    graph.output(tuple(v for v, _ in kept))
    module = fx.GraphModule(program.module, graph)
    rewritten = SectionProgram(program.name, module, list(program.inputs), [n for _, n in kept])
    return InPlaceResult(rewritten, updated, blocked)


def _as_list(returned: object) -> list[fx.Node]:
    if isinstance(returned, (list, tuple)):
        return list(returned)
    return [returned]  # type: ignore[list-item]


def _write_back(graph: fx.Graph, target: fx.Node, value: fx.Node) -> None:
    node = graph.call_function(aten.copy_.default, (target, value))
    node.meta = {k: v for k, v in target.meta.items() if k in ("val", "tensor_meta")}
    node.meta["section"] = value.meta.get("section", "opt")


def _blocked_inputs(pairs: list[tuple[fx.Node, str]], by_name: dict[str, fx.Node]) -> dict[str, str]:
    """Inputs that must stay functional: another output still returned is a view of them."""
    candidates = {name for _, name in pairs if name in by_name}
    returned_others = [(v, n) for v, n in pairs if n not in candidates]
    blocked: dict[str, str] = {}
    for name in candidates:
        for value, other in returned_others:
            if _may_alias(value, by_name[name]):
                blocked[name] = f"output '{other}' is a view of it"
    return blocked


def _may_alias(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return a is b
    return StorageWeakRef(va.untyped_storage()) == StorageWeakRef(vb.untyped_storage())

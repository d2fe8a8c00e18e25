"""What `test` says about the first node that differs (app/bisect.py): where it came from, how far
off its inputs and output are, and what to try."""

from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
from torch import fx, nn

from sambaflow.app.bisect import Finding, difference, first_wrong_node, plain
from sambaflow.app.gold import tested_sections
from sambaflow.backends import rewrites
from sambaflow.backends.registry import get_backend
from sambaflow.passes.probe import probe_program
from sambaflow.runtime.session import session
from sambaflow.trace.graph import TracedGraph
from sambaflow.trace.locate import node_source
from sambaflow.trace.printing import node_text

_NARROW = (torch.float16, torch.bfloat16)


def explain_failure(model: nn.Module, tolerance: float, say: Callable[[str], None]) -> Finding | None:
    """After a failed `test`: find and print the first node that differs, or say the compiled
    program agrees node by node (then the difference is in the inputs or the trace itself)."""
    executable, store = session.executable, session.store
    sections = tested_sections(executable.sections)
    say(
        f"looking for the first node that differs: the compiled program against the reference backend, "
        f"node by node through {', '.join(sections)}, on the inputs of the run above"
    )
    try:
        finding = first_wrong_node(executable.graph, executable.backend, store, sections, tolerance)
    except Exception as exc:  # a diagnosis that fails must not hide the failure it explains
        say(f"could not look further ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return None
    if finding is not None:
        for line in finding_lines(executable.graph, finding, store, tolerance):
            print(line)
        return finding
    moved = _device_weights_moved(model, store, tolerance)
    say(
        "every node of the compiled program agrees with the reference backend"
        + (
            f"; the device's weights differ from the host model's: {', '.join(moved)}"
            if moved
            else ": the traced graph (as the reference backend runs it) differs from plain PyTorch; "
            "report it, with the model"
        )
    )
    return None


def _device_weights_moved(model: nn.Module, store: Mapping[str, torch.Tensor], tolerance: float) -> list[str]:
    """Parameters whose device copy differs from the host model's (the gold step's weights)."""
    moved = []
    for param in model.parameters():
        name = getattr(param, "sn_name", None)
        if name in store and not difference(name, plain(store[name]), plain(param), tolerance).ok:
            moved.append(name)
    return moved


def finding_lines(
    graph: TracedGraph, finding: Finding, store: Mapping[str, torch.Tensor], tolerance: float
) -> list[str]:
    """The report: the node, its model line, each input's and its output's error, a suggestion."""
    node = finding.node
    lines = [
        f"first node outside tolerance (section {node.meta.get('section')}): {node_text(node, {})}",
        f"  made by {node_source(node) or _no_source(graph)}",
    ]
    for item in finding.inputs:
        lines.append(f"  input  {item.name:32s} max_abs_err {item.abs_err:10.3e}  bound {item.bound:9.2e}")
    out = finding.output
    lines.append(f"  output {out.name:32s} max_abs_err {out.abs_err:10.3e}  bound {out.bound:9.2e}")
    lines.append("  suggestion: " + suggestion(graph, finding, store, tolerance))
    return lines


def _no_source(graph: TracedGraph) -> str:
    if any("stack_trace" in n.meta for n in graph.module.graph.nodes):
        return "no line of your code (sambaflow or torch made this node)"
    return "an unknown line (this trace recorded no model lines: the app's `test` command records them)"


def suggestion(
    graph: TracedGraph, finding: Finding, store: Mapping[str, torch.Tensor], tolerance: float
) -> str:
    """Why the node differs, as far as running it op by op tells, and what to do about it."""
    culprits = rewrites_that_change(graph, finding.node, store, tolerance)
    if culprits:
        names = ",".join(culprits)
        return (
            f"the inductor rewrite(s) {', '.join(culprits)} (sambaflow/backends/rewrites.py) change this "
            f"node's value even run op by op: recompile with SAMBAFLOW_REWRITES_OFF={names}, and report it"
        )
    local = _recomputed(graph, finding, store)
    dtype = finding.node.meta["val"].dtype
    if local is not None and difference("", finding.compiled[finding.node], local, tolerance).ok:
        wider = "float32" if dtype in _NARROW else "float64"
        return (
            f"the op is right on the compiled inputs but magnifies their rounding errors ({dtype}): "
            f"compute this line in {wider} (e.g. `.to(torch.{wider})` around it), or rewrite it to "
            "avoid cancellation"
        )
    if dtype in _NARROW:
        return f"the backend computes this {dtype} op differently from its inputs: try float32 for this line"
    return (
        "the backend computes this op wrongly from right inputs (the graph it compiles is right op "
        "by op): compile this model with --backend reference, and report the op with its shapes"
    )


def rewrites_that_change(
    graph: TracedGraph, node: fx.Node, store: Mapping[str, torch.Tensor], tolerance: float
) -> list[str]:
    """The rewrites that, alone, change `node`'s value when the program up to it runs op by op."""
    program = probe_program(graph, [node])
    args = [plain(store[name]) for name in program.inputs]
    reference = get_backend("reference")
    (expected,) = reference.compile(program)(args)
    changed = []
    for name in rewrites.REWRITES:
        rewritten = copy.copy(program)
        rewritten.module = copy.deepcopy(program.module)
        rewrites.apply_rewrite(name, rewritten.module.graph)
        rewritten.module.recompile()
        (value,) = reference.compile(rewritten)(args)
        if not difference(name, value, expected, tolerance).ok:
            changed.append(name)
    return changed


def _recomputed(
    graph: TracedGraph, finding: Finding, store: Mapping[str, torch.Tensor]
) -> torch.Tensor | None:
    """The node's op run eagerly on the compiled values of its inputs (None: one is not known)."""
    placeholders = (n for n in graph.module.graph.nodes if n.op == "placeholder")
    known = dict(finding.compiled)
    known.update((n, plain(store[s.name])) for n, s in zip(placeholders, graph.inputs) if s.name in store)
    node = finding.node
    if any(a not in known for a in node.all_input_nodes):
        return None
    with torch.no_grad():
        result = node.target(
            *fx.node.map_arg(node.args, known.get), **fx.node.map_arg(node.kwargs, known.get)
        )
    return result if isinstance(result, torch.Tensor) else None

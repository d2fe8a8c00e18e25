"""After `test` failed: the first node where the compiled program and the reference backend part ways.

Both run the same traced nodes on the same inputs (those of the failed run, read from the device
tensor store). First one probe program returns every node's value, so one compile finds the first
node outside tolerance. If every value then agrees (observing them all changed what the backend
compiled), the graph is bisected: a probe up to node k returns what later nodes read from nodes
up to k, and the first k where one of those differs is the node, in log2(nodes) compiles.
The finding names the model line the node came from (`trace/locate.py`), its inputs' and output's
error, and a suggestion (`diagnose.py`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import fx

from sambaflow.app.checks import compare
from sambaflow.app.gold import ABSOLUTE_TOLERANCE
from sambaflow.backends.base import Backend
from sambaflow.backends.registry import get_backend
from sambaflow.passes.probe import probe_program
from sambaflow.trace.graph import TracedGraph


@dataclass
class Difference:
    """One value compared: compiled against the reference backend."""

    name: str
    abs_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.abs_err <= self.bound


@dataclass
class Finding:
    """The first node outside tolerance, with what it read and both values of everything compared."""

    node: fx.Node
    output: Difference
    inputs: list[Difference]
    compiled: dict[fx.Node, torch.Tensor]
    reference: dict[fx.Node, torch.Tensor]
    compiles: int


def bound(expected: torch.Tensor, tolerance: float) -> float:
    """The rule `test` compares tensors with (gold.py): max abs error <= ABSOLUTE + tolerance x max |expected|."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return ABSOLUTE_TOLERANCE + tolerance * scale


def difference(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> Difference:
    if got.shape != want.shape:
        return Difference(name, float("inf"), bound(want, tolerance))
    return Difference(name, compare(got, want)[0], bound(want, tolerance))


def scope_nodes(graph: TracedGraph, sections: Sequence[str]) -> list[fx.Node]:
    """The ops of `sections` that make one tensor, in graph order (the values a probe can return)."""
    return [
        n
        for n in graph.module.graph.nodes
        if n.op == "call_function"
        and n.meta.get("section") in sections
        and isinstance(n.meta.get("val"), torch.Tensor)
    ]


def first_wrong_node(
    graph: TracedGraph,
    backend: Backend,
    store: Mapping[str, torch.Tensor],
    sections: Sequence[str],
    tolerance: float = 1e-4,
) -> Finding | None:
    """The first node of `sections` whose value `backend` computes outside tolerance of the
    reference backend's, both run on the graph inputs in `store`; None when every value agrees."""
    scope = scope_nodes(graph, sections)
    if not scope:
        return None
    run = _Prober(graph, probe_backend(backend), store)
    return run.all_values(scope, tolerance) or run.bisect(scope, tolerance)


def probe_backend(backend: Backend) -> Backend:
    """The backend to compile probes with. Inductor's ahead-of-time mode would write a package per
    probe into the compile cache; its in-process mode compiles the same rewritten graph with the
    same passes (inductor/__init__.py: "same numerics") and keeps nothing."""
    if getattr(backend, "mode", None) == "aot":
        probe = copy.copy(backend)
        probe.mode, probe.reports = "jit", []  # type: ignore[attr-defined]
        return probe
    return backend


class _Prober:
    """Compiles and runs probe programs on the run's inputs; counts the compiles."""

    def __init__(self, graph: TracedGraph, backend: Backend, store: Mapping[str, torch.Tensor]) -> None:
        self.graph, self.backend, self.compiles = graph, backend, 0
        self.store = store
        self.reference = get_backend("reference")

    def values(self, wanted: list[fx.Node]) -> tuple[dict[fx.Node, Any], dict[fx.Node, Any]]:
        """(compiled, reference) value of each wanted node."""
        program = probe_program(self.graph, wanted)
        args = [plain(self.store[name]) for name in program.inputs]
        self.compiles += 1
        compiled = self.backend.compile(program)(args)
        expected = self.reference.compile(program)(args)
        return dict(zip(wanted, compiled)), dict(zip(wanted, expected))

    def all_values(self, scope: list[fx.Node], tolerance: float) -> Finding | None:
        compiled, expected = self.values(scope)
        for node in scope:
            if not difference(node.name, compiled[node], expected[node], tolerance).ok:
                return self.finding(node, compiled, expected, tolerance)
        return None

    def bisect(self, scope: list[fx.Node], tolerance: float) -> Finding | None:
        """The first k whose probe (what later nodes read from nodes up to k) differs."""
        low, high, last = 0, len(scope) - 1, None
        while low <= high:
            middle = (low + high) // 2
            wanted = _cut_after(scope, middle)
            compiled, expected = self.values(wanted)
            if all(difference(n.name, compiled[n], expected[n], tolerance).ok for n in wanted):
                low = middle + 1
            else:
                high, last = middle - 1, (middle, compiled, expected)
        if last is None:
            return None
        return self.finding(scope[last[0]], last[1], last[2], tolerance)

    def finding(self, node: fx.Node, compiled: dict, expected: dict, tolerance: float) -> Finding:
        """`node` with the error of each input the probe returned (graph inputs are the same
        tensors on both sides: error 0)."""
        inputs = []
        for arg in node.all_input_nodes:
            if arg in compiled:
                inputs.append(difference(arg.name, compiled[arg], expected[arg], tolerance))
            elif arg.op == "placeholder":
                inputs.append(Difference(_input_name(self.graph, arg), 0.0, 0.0))
        output = difference(node.name, compiled[node], expected[node], tolerance)
        return Finding(node, output, inputs, compiled, expected, self.compiles)


def _cut_after(scope: list[fx.Node], k: int) -> list[fx.Node]:
    """Node k, what it reads, and every value from nodes up to k that a later node (or the graph's
    output) reads: all the later computation learns from the first k + 1 nodes."""
    done = set(scope[: k + 1])
    crossing = [n for n in scope[:k] if any(u not in done for u in n.users)]
    reads = [a for a in scope[k].all_input_nodes if a in done and a not in crossing]
    return crossing + reads + [scope[k]]


def _input_name(graph: TracedGraph, placeholder: fx.Node) -> str:
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    return graph.inputs[placeholders.index(placeholder)].name


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: compiled probes (Inductor's in-process mode) take no tensor subclasses."""
    return tensor.detach().as_subclass(torch.Tensor) if type(tensor) is not torch.Tensor else tensor

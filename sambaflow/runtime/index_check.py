"""Name the input behind an out-of-range index when a run fails.

A label of 10 for 10 classes makes the reference backend say `Target 10 is out of bounds` and an
Inductor binary `index out of bounds: 0 <= tmp10 < 10L` with a C++ backtrace; neither names the
input. Checking every integer input before each step would cost every step, so nothing is
checked until a run has failed: `explained_failures` then looks at the integer inputs that reach
an indexing op (embedding, a loss's class targets, gather, index_select, indexing) and, when one
holds a value outside its range, raises a `SambaRunError` naming the input, the bad value and the
valid range (the backend's own error stays attached as the cause).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import fx

from sambaflow.errors import SambaError, SambaRunError
from sambaflow.trace.graph import TracedGraph

aten = torch.ops.aten


@dataclass(frozen=True)
class IndexRange:
    """Values an integer input may hold: `0 <= v < size`, or `allowed` (a loss's ignore_index)."""

    input: str
    size: int
    used_by: str
    allowed: int | None = None

    def bad_values(self, value: torch.Tensor) -> torch.Tensor:
        bad = (value < 0) | (value >= self.size)
        if self.allowed is not None:
            bad &= value != self.allowed
        return value[bad]

    def message(self, bad: torch.Tensor) -> str:
        shown = sorted({int(v) for v in bad.flatten()[:1000].tolist()})[:5]
        extra = f" (or {self.allowed}, the ignore_index)" if self.allowed is not None else ""
        return (
            f"input '{self.input}' holds {bad.numel()} value(s) out of range, e.g. {shown}: it is "
            f"{self.used_by}, valid 0 <= value < {self.size}{extra}. Fix "
            f"the data (labels counted from 0, fewer than {self.size}), or rebuild the model for "
            "the range the data uses"
        )


@contextlib.contextmanager
def explained_failures(graph: TracedGraph, feeds: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Around a run: a backend failure caused by an out-of-range integer input is re-raised as a
    `SambaRunError` naming it; any other failure passes through unchanged. Free when nothing fails."""
    try:
        yield
    except SambaError:
        raise
    except Exception as exc:
        message = out_of_range(graph, feeds)
        if message is None:
            raise
        raise SambaRunError(message) from exc


def out_of_range(graph: TracedGraph, feeds: Mapping[str, torch.Tensor]) -> str | None:
    """The first out-of-range integer input among `feeds`, described; None when all are in range."""
    for index_range in index_ranges(graph):
        value = feeds.get(index_range.input)
        if value is None or value.is_floating_point() or value.is_complex():
            continue
        bad = index_range.bad_values(value.as_subclass(torch.Tensor))
        if bad.numel():
            return index_range.message(bad)
    return None


def index_ranges(graph: TracedGraph) -> list[IndexRange]:
    """For each integer graph input that reaches an indexing op, the range that op accepts."""
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    ranges = []
    for spec, node in zip(graph.inputs, placeholders):
        if spec.dtype.is_floating_point or spec.dtype == torch.bool:
            continue
        ranges += [IndexRange(spec.name, *found) for found in _uses_as_index(node)]
    return list(dict.fromkeys(ranges))


def _uses_as_index(start: fx.Node) -> list[tuple[int, str, int | None]]:
    """(size, op description, allowed extra value) for each indexing op `start` reaches through
    integer-valued ops (casts, views, copies)."""
    found, seen, todo = [], set(), [start]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            try:
                use = _index_use(user, node)
            except LookupError:  # an op without shape metadata: nothing to say about it
                use = None
            if use is not None:
                found.append(use)
            elif _integer_valued(user):
                todo.append(user)
    return found


def _index_use(user: fx.Node, index: fx.Node) -> tuple[int, str, int | None] | None:
    target, args = user.target, user.args
    if target in (aten.embedding.default, aten.embedding_dense_backward.default) and _at(args, 1, index):
        size = _shape(args[0])[0] if target == aten.embedding.default else args[2]
        return int(size), f"the row numbers of an embedding with {size} rows", None
    if target in (aten.nll_loss_forward.default, aten.nll_loss2d_forward.default) and _at(args, 1, index):
        classes = _shape(args[0])[0 if len(_shape(args[0])) == 1 else 1]
        return int(classes), f"the class targets of a loss over {classes} classes", _ignore(args, 4)
    if target in (aten.nll_loss_backward.default, aten.nll_loss2d_backward.default) and _at(args, 2, index):
        classes = _shape(args[1])[0 if len(_shape(args[1])) == 1 else 1]
        return int(classes), f"the class targets of a loss over {classes} classes", _ignore(args, 5)
    if target in (aten.gather.default, aten.index_select.default) and _at(args, 2, index):
        size = _shape(args[0])[int(args[1])]
        return int(size), f"the indices of {target.__name__} along a dimension of size {size}", None
    if target == aten.index.Tensor and isinstance(args[1], (list, tuple)) and index in args[1]:
        size = _shape(args[0])[list(args[1]).index(index)]
        return int(size), f"an index into a dimension of size {size}", None
    return None


def _at(args: tuple, position: int, node: fx.Node) -> bool:
    return len(args) > position and args[position] is node


def _ignore(args: tuple, position: int) -> int | None:
    value = args[position] if len(args) > position else -100
    return int(value) if isinstance(value, int) else None


def _shape(node: object) -> tuple[int, ...]:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        raise LookupError("no shape recorded")
    return tuple(int(s) for s in value.shape)


def _integer_valued(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool

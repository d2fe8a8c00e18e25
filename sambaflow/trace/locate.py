"""Where in the user's code: the model line an exception raised while tracing came from (as a
SambaTraceError), and the model line each traced node came from."""

from __future__ import annotations

import contextlib
import os
import re
import sysconfig
import traceback
from typing import Iterator

import torch
from torch import fx

import sambaflow
from sambaflow.errors import SambaTraceError

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep for path in (torch.__file__, sambaflow.__file__)
) + (os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep,)


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is the user's code (not torch, not ours)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not os.path.abspath(frame.filename).startswith(_LIBRARY_DIRS):
            return frame
    return None


def _reason(exc: BaseException) -> str:
    kind = type(exc).__name__
    if kind in ("DataDependentOutputException", "GuardOnDataDependentSymNode"):
        return (
            "the model needs the *value* of a tensor here (data-dependent control flow, "
            ".item(), .tolist() or printing a tensor). A compiled graph is static: express it "
            "with tensor ops such as torch.where, or move it out of forward()"
        )
    if kind == "DynamicOutputShapeException":
        return (
            "this op's output shape depends on tensor values (e.g. nonzero, boolean masking); "
            "a compiled graph needs static shapes: use torch.where or a fixed-size mask"
        )
    if kind == "UnsupportedOperatorException":
        return f"this op cannot be traced ({exc}); replace it with standard torch ops"
    return f"{kind}: {exc}"


def trace_error(exc: BaseException, what: str) -> SambaTraceError:
    frame = user_frame(exc)
    where = (
        f"{frame.filename}:{frame.lineno} (`{(frame.line or '').strip()}`)" if frame else "an unknown line"
    )
    return SambaTraceError(f"Tracing {what} failed at {where}: {_reason(exc)}")


#: whether traces record each node's stack (`node_source` reads it): about a third more tracing
#: time (GPT-2 tiny: 1.85 s against 1.4 s), so only `test` turns it on
_recording = [False]


@contextlib.contextmanager
def recording_sources(on: bool = True) -> Iterator[None]:
    """Traces made inside record the stack of every node (with `on`)."""
    before, _recording[0] = _recording[0], on
    try:
        yield
    finally:
        _recording[0] = before


def records_sources() -> bool:
    return _recording[0]


def node_source(node: fx.Node) -> str | None:
    """`file:line (`code`)` of the user's code that made `node`, from the stack the tracer recorded
    (inside `recording_sources`).

    A backward op runs inside autograd, not in the user's code: it is placed at the forward op it
    differentiates (the nearest input with a user frame, found upwards), as "backward of ...".
    """
    own = _user_line(node.meta.get("stack_trace"))
    if own is not None:
        return own
    seen, frontier = {node}, list(node.all_input_nodes)
    while frontier:
        nearest = frontier.pop(0)
        found = _user_line(nearest.meta.get("stack_trace"))
        if found is not None:
            return f"backward of {found}"
        frontier += [n for n in nearest.all_input_nodes if n not in seen]
        seen.update(nearest.all_input_nodes)
    return None


def _user_line(stack: str | None) -> str | None:
    """The innermost frame of a recorded stack (`File "f", line n, in fn` + code) in user code."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', stack or "")
    for filename, line, code in reversed(frames):
        if not os.path.abspath(filename).startswith(_LIBRARY_DIRS):
            return f"{filename}:{line} (`{code.strip()}`)"
    return None

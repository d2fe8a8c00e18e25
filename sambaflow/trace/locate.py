"""Turn an exception raised while tracing into a SambaTraceError that names the model's line."""

from __future__ import annotations

import os
import sysconfig
import traceback

import torch

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

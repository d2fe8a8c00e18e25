"""How a SambaFlow app ends on a `SambaError`: `error: <message>` on stderr and exit status 2.

`parse_app_args` installs the hook, so any app that calls it (not only the examples) gets it. The
message already says what went wrong and how to fix it; a traceback would bury it. Any other
exception keeps its traceback (the hook hands it to the hook it replaced), and so does a
`SambaError` when `SAMBAFLOW_DEBUG` is 1 or more. Ctrl-C ends the app with one line, status 130
(as a shell reports a process killed by SIGINT), instead of the traceback of wherever it landed.

The hook may itself be wrapped: `torch.distributed.init_process_group` (which `parse_app_args`
calls when it joins the replicas) puts its `_distributed_excepthook` around it, which points
`sys.stderr` at a buffer, calls our hook, then writes the buffer prefixed with the rank. Exiting
inside our hook would drop that buffer, so a wrapped hook only prints, and the exit status is set
once the wrappers have written, from an atexit handler.
"""

from __future__ import annotations

import atexit
import os
import sys
from types import TracebackType

from sambaflow.backends.counters import debug_level
from sambaflow.errors import SambaError

EXIT_STATUS = 2  # as argparse exits on a bad command line
INTERRUPTED_STATUS = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd process


def install() -> None:
    """Make `sys.excepthook` report `SambaError`s in one line; idempotent."""
    if _installed(sys.excepthook):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        status = exit_status(kind, error, tb, previous)
        if status is None:
            return
        if sys.excepthook is hook:
            _exit(status)
        else:  # wrapped (torch.distributed): let the wrapper write what we printed, exit after
            _exit_at_interpreter_exit(status)

    hook._sambaflow_hook = True  # type: ignore[attr-defined]
    hook.previous = previous  # type: ignore[attr-defined]
    sys.excepthook = hook


def _installed(hook: object) -> bool:
    """Our hook is `hook`, or somewhere inside the hooks that wrap it (torch's keeps a closure)."""
    seen = 0
    while hook is not None and seen < 8:
        if getattr(hook, "_sambaflow_hook", False):
            return True
        cells = getattr(hook, "__closure__", None) or ()
        hook = next((_cell(c) for c in cells if callable(_cell(c))), None)
        seen += 1
    return False


def _cell(cell: object) -> object:
    try:
        return cell.cell_contents  # type: ignore[attr-defined]
    except ValueError:  # an empty cell
        return None


def exit_status(
    kind: type[BaseException], error: BaseException, tb: TracebackType | None, previous
) -> int | None:
    """Print what the user should see; the status to exit with, or None for Python's own exit."""
    if isinstance(error, KeyboardInterrupt) and debug_level() < 1:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_STATUS
    return EXIT_STATUS if report(kind, error, tb, previous) else None


def report(kind: type[BaseException], error: BaseException, tb: TracebackType | None, previous) -> bool:
    """Print what the user should see; True when the process should exit with `EXIT_STATUS`."""
    if not isinstance(error, SambaError):
        previous(kind, error, tb)
        return False
    if debug_level() >= 1:
        previous(kind, error, tb)
    else:
        print(f"error: {error}", file=sys.stderr)
    return True


def _exit_at_interpreter_exit(status: int) -> None:
    """Exit with `status` once the hooks around ours have returned: registered last, this atexit
    handler runs first; it takes itself off the list and runs the others as `_exit` does."""

    def leave() -> None:
        atexit.unregister(leave)
        _exit(status)

    atexit.register(leave)


def _exit(status: int) -> None:
    """Exit with `status` from inside the hook: CPython exits 1 after any uncaught exception, and
    a SystemExit raised here is reported as an error in the hook. So: run the atexit handlers
    (temporary folders, logs), flush, and leave."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)

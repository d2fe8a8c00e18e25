"""How a SambaFlow app ends on a `SambaError`: `error: <message>` on stderr and exit status 2.

`parse_app_args` installs the hook, so any app that calls it (not only the examples) gets it. The
message already says what went wrong and how to fix it; a traceback would bury it. Any other
exception keeps its traceback (the hook hands it to the hook it replaced), and so does a
`SambaError` when `SAMBAFLOW_DEBUG` is 1 or more.
"""

from __future__ import annotations

import atexit
import os
import sys
from types import TracebackType

from sambaflow.backends.counters import debug_level
from sambaflow.errors import SambaError

EXIT_STATUS = 2  # as argparse exits on a bad command line


def install() -> None:
    """Make `sys.excepthook` report `SambaError`s in one line; idempotent."""
    if getattr(sys.excepthook, "_sambaflow_hook", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if not report(kind, error, tb, previous):
            return
        _exit(EXIT_STATUS)

    hook._sambaflow_hook = True  # type: ignore[attr-defined]
    hook.previous = previous  # type: ignore[attr-defined]
    sys.excepthook = hook


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

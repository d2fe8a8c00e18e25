"""Compile events: how many programs the backends compiled in this process (tests and logs read it).

`SAMBAFLOW_DEBUG=1` (or higher) prints each event, so a user can see that `run` compiles nothing.
"""

from __future__ import annotations

import os
import sys

compiles = 0


def debug_level() -> int:
    value = os.environ.get("SAMBAFLOW_DEBUG", "0")
    return int(value) if value.isdigit() else 0


def record_compile(backend: str = "", program: str = "") -> None:
    global compiles
    compiles += 1
    if debug_level() >= 1:
        print(f"[sambaflow] compile event: {backend} program '{program}'", file=sys.stderr, flush=True)

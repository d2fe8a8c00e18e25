"""How many programs the backends compiled in this process (tests and logs read it)."""

from __future__ import annotations

compiles = 0


def record_compile() -> None:
    global compiles
    compiles += 1

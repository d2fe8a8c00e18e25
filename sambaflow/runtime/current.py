"""Where the process's current session is registered.

Kept apart from `session.py` so tensors can ask for their device gradient without importing
the runtime machinery.
"""

from __future__ import annotations

from typing import Any

_current: Any = None


def current_session() -> Any:
    return _current


def set_current_session(session: Any) -> None:
    global _current
    _current = session

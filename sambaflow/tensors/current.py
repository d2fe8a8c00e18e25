"""Where the process's current session is registered.

It sits with the tensors, below the runtime: tensors ask it for their device gradient, and the
runtime's session registers itself here, so no lower stage imports the runtime.
"""

from __future__ import annotations

from typing import Any

_current: Any = None


def current_session() -> Any:
    return _current


def set_current_session(session: Any) -> None:
    global _current
    _current = session

"""Pick the backend to compile for; fall back to `reference`, saying so once, where it cannot work.

One rule everywhere (`compile`, `run` without `-p`, `trace_graph`, `session.compile`): the backend
asked for explicitly (a `backend=` argument, else `--backend`), else `$SAMBAFLOW_BACKEND`, else
inductor, which falls back to reference where Inductor or a C++ compiler is missing.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from sambaflow.backends.base import Backend
from sambaflow.backends.registry import get_backend
from sambaflow.errors import SambaBackendError

DEFAULT_BACKEND = "inductor"
BACKEND_VARIABLE = "SAMBAFLOW_BACKEND"


def default_backend_name() -> str:
    """`$SAMBAFLOW_BACKEND`, else inductor (which falls back to reference where it cannot run)."""
    return os.environ.get(BACKEND_VARIABLE) or DEFAULT_BACKEND


def requested_backend(explicit: str | Backend | None) -> str | Backend | None:
    """The backend asked for explicitly: `explicit`, else the parsed `--backend`, else None."""
    if explicit is not None:
        return explicit
    from sambaflow.app.args import parsed_args

    return getattr(parsed_args(), "backend", None)


def choose_backend(name: str | Backend | None, say: Callable[[str], None]) -> Backend:
    if name is not None and not isinstance(name, str):
        return name  # a configured backend object
    name = name or default_backend_name()
    try:
        backend = get_backend(name)
    except SambaBackendError as exc:
        if name != "inductor":
            raise
        return _fallback(name, str(exc), say)
    available = getattr(backend, "available", None)
    if available is not None:
        ok, reason = available()
        if not ok:
            return _fallback(name, reason, say)
    return backend


def _fallback(name: str, reason: str, say: Callable[[str], None]) -> Any:
    say(f"the {name} backend cannot run here ({reason}); falling back to the reference backend")
    return get_backend("reference")

"""The backends by name: the one place that knows every concrete backend.

It sits above the contract (`base.py`), which knows none, so a backend importing the contract
closes no import circle.
"""

from __future__ import annotations

from sambaflow.backends.base import Backend
from sambaflow.errors import SambaBackendError

BACKEND_NAMES = ("inductor", "reference")


def get_backend(name: str) -> Backend:
    """A fresh backend object for `name` (imported here, on demand: Inductor is slow to import)."""
    if name == "reference":
        from sambaflow.backends.reference import ReferenceBackend

        return ReferenceBackend()
    if name == "inductor":
        from sambaflow.backends.inductor import InductorBackend

        return InductorBackend()
    raise SambaBackendError(f"unknown backend '{name}': choose one of {sorted(BACKEND_NAMES)}")

"""Backends lower section programs to something callable on a list of tensors."""

from sambaflow.backends.base import Backend, CompiledProgram, get_backend
from sambaflow.backends.inductor import InductorBackend

__all__ = ["Backend", "CompiledProgram", "InductorBackend", "get_backend"]

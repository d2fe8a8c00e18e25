"""Backends lower section programs to something callable on a list of tensors."""

from sambaflow.backends.base import Backend, CompiledProgram
from sambaflow.backends.inductor import InductorBackend
from sambaflow.backends.registry import get_backend

__all__ = ["Backend", "CompiledProgram", "InductorBackend", "get_backend"]

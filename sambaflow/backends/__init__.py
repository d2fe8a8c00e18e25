"""Backends lower section programs to something callable on a list of tensors."""

from sambaflow.backends.base import Backend, CompiledProgram, get_backend

__all__ = ["Backend", "CompiledProgram", "get_backend"]

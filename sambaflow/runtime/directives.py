"""Session members SambaNova's modelzoo model code calls while it is traced: directives, auxiliary
tensors, and the switches it reads. A mixin of `Session`; nothing here changes numerics.

- `_add_directives({...})`: a context manager; the dict is in `_context_directives` inside it
  (compiler hints such as `opfusion_id`, recorded and without effect).
- `add_aux_tensor(tensor, name)`: a named tensor the model keeps for the device (RoPE's cos/sin
  tables); recorded by name, the graph reads the value the model uses.
- `use_static_functional()`: False: ops compute torch-in/torch-out (as they do here), so code takes
  its torch-typed path (e.g. int32 rather than uint16 indices).
- `disable_graphamp()`: a context manager; GraphAMP here only acts at trace time on the whole forward.
- `dynamic_dims`: the registered dynamic dimensions: none (every graph is static).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import torch

from sambaflow.errors import SambaArgumentError

_AUX_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*"


class SessionDirectives:
    """Directive state of a session (`Session` inherits it)."""

    def _reset_directives(self) -> None:
        self._context_directives: dict[str, Any] = {}
        self.aux_tensors: dict[str, torch.Tensor] = {}
        self.dynamic_dims: dict[str, Any] = {}

    @contextlib.contextmanager
    def _add_directives(self, directives: dict[str, Any] | None) -> Iterator[None]:
        if directives is not None and not isinstance(directives, dict):
            raise SambaArgumentError(
                f"session._add_directives: expected a dict of directives, got {type(directives).__name__}"
            )
        saved = dict(self._context_directives)
        self._context_directives.update(directives or {})
        try:
            yield
        finally:
            self._context_directives = saved

    def add_aux_tensor(self, tensor: torch.Tensor, name: str) -> None:
        """Record `tensor` as the auxiliary device tensor `name` (the same name again replaces it)."""
        if not self.is_valid_aux_tensor_name(name):
            raise SambaArgumentError(
                f"add_aux_tensor: name {name!r} is not a valid tensor name (letters, digits, '_', '.', '-')"
            )
        if not isinstance(tensor, torch.Tensor):
            raise SambaArgumentError(
                f"add_aux_tensor({name!r}): expected a tensor, got {type(tensor).__name__}"
            )
        self.aux_tensors[name] = tensor

    def is_valid_aux_tensor_name(self, name: str) -> bool:
        return isinstance(name, str) and re.fullmatch(_AUX_NAME, name) is not None

    def use_static_functional(self) -> bool:
        return False

    @contextlib.contextmanager
    def disable_graphamp(self) -> Iterator[None]:
        yield

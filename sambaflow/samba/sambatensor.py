"""`sambaflow.samba.sambatensor`: SambaFlow's module path for SambaTensor and its converters."""

from sambaflow.tensors.factories import from_torch_tensor
from sambaflow.tensors.sambatensor import SambaTensor

__all__ = ["SambaTensor", "from_torch_tensor"]

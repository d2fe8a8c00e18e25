"""`sambaflow.samba.nn.parameter`: re-exports `SambaParameter` (it lives in `sambaflow.tensors`)."""

from sambaflow.tensors.sambatensor import SambaParameter

__all__ = ["SambaParameter"]

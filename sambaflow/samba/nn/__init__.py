"""`sambaflow.samba.nn`: SambaFlow's nn import paths (`sambaflow.samba.nn.parameter.SambaParameter`)."""

from sambaflow.samba.nn.parameter import SambaParameter

__all__ = ["SambaParameter"]

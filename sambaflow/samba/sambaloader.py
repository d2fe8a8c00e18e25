"""`sambaflow.samba.sambaloader`: SambaLoader."""

from sambaflow.data.loader import SambaLoader

__all__ = ["SambaLoader"]

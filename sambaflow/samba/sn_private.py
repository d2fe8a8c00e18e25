"""`sambaflow.samba.sn_private`: SambaFlow's gather, scatter and multinomial (tensors/indexing.py)."""

from sambaflow.tensors.indexing import sn_gather, sn_multinomial, sn_scatter

__all__ = ["sn_gather", "sn_multinomial", "sn_scatter"]

"""`sambaflow.samba.functional.stir`: where SambaFlow apps import the STIR ops (tensors/stir.py)."""

from sambaflow.tensors.stir import sn_imm, sn_iteridx, sn_select, sn_zipmapreduce

__all__ = ["sn_imm", "sn_iteridx", "sn_select", "sn_zipmapreduce"]

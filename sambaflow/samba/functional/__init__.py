"""`sambaflow.samba.functional`: SambaFlow's functional ops (`stir`: element-wise STIR ops)."""

"""`sambaflow.samba.argconf`: SambaFlow's arguments as pydantic models (SambaNova's modelzoo uses them)."""

"""`sambaflow.samba.profiler`: `Profiler`, named event timing (app/profiler.py)."""

from sambaflow.app.profiler import Profiler

__all__ = ["Profiler"]

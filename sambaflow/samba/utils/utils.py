"""`sambaflow.samba.utils.utils`: where SambaFlow apps import `trace_graph` from."""

from sambaflow.app.checks import assert_close, get_file_dir, set_seed
from sambaflow.app.tracing import trace_graph

__all__ = ["assert_close", "get_file_dir", "set_seed", "trace_graph"]

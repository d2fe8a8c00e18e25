"""`sambaflow.samba.utils`: tracing, seeding, numeric checks."""

from sambaflow.samba.utils.utils import assert_close, get_file_dir, set_seed, trace_graph

__all__ = ["assert_close", "get_file_dir", "set_seed", "trace_graph"]

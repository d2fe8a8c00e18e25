"""`sambaflow.samba.utils`: tracing, measurement, seeding, numeric checks."""

from sambaflow.app.measure import measure_performance, measure_sections

# --- multigraph tracing and SambaFlow's element types (issue 18, generation) ---
from sambaflow.app.multigraph import trace_multigraph  # noqa: E402
from sambaflow.samba.utils.utils import assert_close, get_file_dir, set_seed, trace_graph
from sambaflow.tensors.sntype import SNType  # noqa: E402

__all__ = [
    "SNType",
    "trace_multigraph",
    "assert_close",
    "get_file_dir",
    "measure_performance",
    "measure_sections",
    "set_seed",
    "trace_graph",
]

# --- SambaNova's modelzoo (training): data-parallel ranks -----------------------------------------
from sambaflow.app.ranks import get_rank, get_world_size, is_main_process  # noqa: E402

__all__ += ["get_rank", "get_world_size", "is_main_process"]

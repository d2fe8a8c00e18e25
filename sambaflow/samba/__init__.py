"""`sambaflow.samba`: SambaFlow's public API (`from sambaflow import samba`)."""

from sambaflow.app.checkpoint import check_output_path, load, save, save_json
from sambaflow.app.compile import compile_pef
from sambaflow.runtime.session import session
from sambaflow.samba import optim, utils  # noqa: E402  (after session: utils uses it)
from sambaflow.tensors.factories import (
    from_torch,
    from_torch_tensor,
    normal,
    ones,
    rand,
    randint,
    randn,
    randn_like,
    to_torch,
    zeros,
)
from sambaflow.tensors.model import from_torch_, from_torch_model_
from sambaflow.tensors.ops import addmm
from sambaflow.tensors.sambatensor import SambaParameter, SambaTensor

session.set_compiler(compile_pef)  # the public layer wires the app's compiler into the runtime

# --- SambaFlow's multigraph API and the ops SambaNova's modelzoo calls (issue 18, generation) ---
from sambaflow.app.multigraph import compile_multigraph, init_multigraph_runtime  # noqa: E402
from sambaflow.samba import directives, graph  # noqa: E402
from sambaflow.tensors.factories import from_named_dict  # noqa: E402
from sambaflow.tensors.ops import triu_fill  # noqa: E402

session.set_multigraph_hooks(compile_multigraph, init_multigraph_runtime)

# --- SambaNova's modelzoo (training) ---------------------------------------------------------------
from sambaflow.runtime import mpi_fallback  # noqa: E402
from sambaflow.samba import lazy_param  # noqa: E402,F401

mpi_fallback.install()  # init_process_group(backend='mpi') joins with gloo where MPI is missing, saying so

__all__ = [
    "SambaParameter",
    "SambaTensor",
    "addmm",
    "check_output_path",
    "directives",
    "from_named_dict",
    "graph",
    "triu_fill",
    "from_torch",
    "from_torch_",
    "from_torch_model_",
    "from_torch_tensor",
    "load",
    "normal",
    "ones",
    "optim",
    "rand",
    "randint",
    "randn",
    "randn_like",
    "save",
    "save_json",
    "session",
    "to_torch",
    "utils",
    "zeros",
]

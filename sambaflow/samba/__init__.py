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

# --- SambaNova's modelzoo (training) ---------------------------------------------------------------
from sambaflow.runtime import mpi_fallback  # noqa: E402
from sambaflow.samba import lazy_param  # noqa: E402,F401

mpi_fallback.install()  # init_process_group(backend='mpi') joins with gloo where MPI is missing, saying so

__all__ = [
    "SambaParameter",
    "SambaTensor",
    "addmm",
    "check_output_path",
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

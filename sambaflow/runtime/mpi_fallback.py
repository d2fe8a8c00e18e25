"""`torch.distributed.init_process_group(backend='mpi')` on a PyTorch built without MPI.

SambaNova's data-parallel modelzoo app starts with `init_process_group(backend='mpi')`; pip builds
of PyTorch have no MPI backend, and the call would fail. `install()` (done by `import
sambaflow.samba`) wraps `torch.distributed.init_process_group` so that, only when the MPI backend
is asked for and is missing, the process joins its replicas with gloo the way sambaflow's own data
parallel does (runtime/launch_env.py: torchrun's variables, or mpirun's with MASTER_ADDR and
MASTER_PORT; with no launcher, a world of one), and says so in one line. Every other call goes to
torch unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.distributed as dist

from sambaflow.runtime import launch_env


def install() -> None:
    if not dist.is_available() or getattr(dist.init_process_group, "_sambaflow_mpi_fallback", False):
        return
    original = dist.init_process_group

    @functools.wraps(original)
    def init_process_group(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        if str(backend).lower() == "mpi" and not dist.is_mpi_available():
            return _join_with_gloo(original, kwargs)
        return original(backend, *args, **kwargs)

    init_process_group._sambaflow_mpi_fallback = True  # type: ignore[attr-defined]
    dist.init_process_group = init_process_group


def _join_with_gloo(original: Any, kwargs: dict[str, Any]) -> None:
    from sambaflow.runtime import communicator

    env = launch_env.detect()
    if env.launched:
        communicator._init_group(env)
        where = f"the {env.world_size}-process group (launched by {env.launcher}, rank {env.rank})"
    else:
        original("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=kwargs.get("timeout"))
        where = "a group of one (no torchrun or mpirun launched this process)"
    print(
        f"[sambaflow] init_process_group(backend='mpi'): this PyTorch has no MPI backend; "
        f"joined {where} with gloo instead",
        flush=True,
    )

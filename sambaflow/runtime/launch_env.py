"""Who launched this process, and where its replicas meet: torchrun, mpirun, or nobody.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and MASTER_ADDR / MASTER_PORT. mpirun sets only its
own rank variables (Open MPI: OMPI_COMM_WORLD_*; MPICH and Intel MPI: PMI_*), so the address the
replicas meet at must be passed along (`mpirun -x MASTER_ADDR=... -x MASTER_PORT=...`). With
nothing set the process is a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from sambaflow.errors import SambaRunError

# launcher -> (rank variable, size variable, local-rank variables in the order tried)
LAUNCHERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "torchrun": ("RANK", "WORLD_SIZE", ("LOCAL_RANK",)),
    "mpirun (Open MPI)": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    "mpirun (PMI)": ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
}


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place among the replicas."""

    launcher: str  # a key of LAUNCHERS, or "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def launched(self) -> bool:
        return self.launcher != "none"


def detect(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launch environment from `environ` (default: os.environ); explains what is inconsistent."""
    env = os.environ if environ is None else environ
    for launcher, (rank_var, size_var, local_vars) in LAUNCHERS.items():
        if rank_var in env and size_var in env:
            return _from_vars(env, launcher, rank_var, size_var, local_vars)
    return LaunchEnv("none")


def _from_vars(
    env: Mapping[str, str], launcher: str, rank_var: str, size_var: str, local_vars: tuple[str, ...]
) -> LaunchEnv:
    size = _int_var(env, size_var, launcher, minimum=1)
    rank = _int_var(env, rank_var, launcher, minimum=0)
    if rank >= size:
        raise SambaRunError(
            f"{launcher} environment: {rank_var}={rank} is not below {size_var}={size}: "
            "each replica's rank must be 0..size-1 (let the launcher set them)"
        )
    local_var = next((v for v in local_vars if v in env), None)
    local = _int_var(env, local_var, launcher, minimum=0) if local_var else 0
    addr, port = _master(env, launcher, size)
    return LaunchEnv(launcher, rank, size, local, addr, port)


def _master(env: Mapping[str, str], launcher: str, size: int) -> tuple[str | None, int | None]:
    addr, port = env.get("MASTER_ADDR", "").strip(), env.get("MASTER_PORT", "").strip()
    if size > 1 and not (addr and port):
        missing = [n for n, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if not v]
        raise SambaRunError(
            f"launched by {launcher} with {size} replicas, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: the replicas need one address to meet "
            "at. Set both for every rank, e.g. `mpirun -np 2 -x MASTER_ADDR=<host of rank 0> "
            "-x MASTER_PORT=29500 python app.py run --data-parallel ...` (torchrun sets them itself)"
        )
    if not port:
        return addr or None, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SambaRunError(f"MASTER_PORT={port!r} is not a TCP port (1..65535): set it to a free port")
    return addr, int(port)


def _int_var(env: Mapping[str, str], name: str, launcher: str, minimum: int) -> int:
    text = env[name].strip()
    if not text.lstrip("-").isdigit() or int(text) < minimum:
        raise SambaRunError(
            f"{launcher} environment: {name}={env[name]!r} is not an integer >= {minimum}: "
            "unset it or let the launcher set it"
        )
    return int(text)

"""This process's place among data-parallel replicas: `utils.get_rank()`, `get_world_size()`,
`is_main_process()`. The process group's, once joined; before that, the launcher's variables."""

from __future__ import annotations

from sambaflow.runtime import launch_env


def _joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if _joined():
        import torch.distributed as dist

        return dist.get_rank()
    return launch_env.detect().rank


def get_world_size() -> int:
    if _joined():
        import torch.distributed as dist

        return dist.get_world_size()
    return launch_env.detect().world_size


def is_main_process() -> bool:
    """Rank 0: the replica that prints and saves."""
    return get_rank() == 0


__all__ = ["get_rank", "get_world_size", "is_main_process"]

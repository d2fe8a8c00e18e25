"""How much host memory a new tensor or a step may take, to refuse sizes that cannot fit up front.

Linux overcommits: a tensor larger than the free memory often allocates, then the kernel's OOM
killer ends the process while the tensor is being filled, with no message. So sizes are checked
against `MemAvailable` (/proc/meminfo) before anything is allocated, or against
`SAMBAFLOW_MEMORY_LIMIT` (bytes, or with a K/M/G suffix: `8G`) where set: a limit of one's own on a
shared machine.
"""

from __future__ import annotations

import os

from sambaflow.errors import SambaArgumentError

LIMIT_ENV = "SAMBAFLOW_MEMORY_LIMIT"
_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def available_bytes() -> int | None:
    """`$SAMBAFLOW_MEMORY_LIMIT`, else the kernel's MemAvailable; None where neither is known."""
    text = os.environ.get(LIMIT_ENV, "").strip().upper().removesuffix("B").removesuffix("I")
    if text:
        number, suffix = (text[:-1], text[-1]) if text[-1] in _SUFFIX else (text, "")
        try:
            return int(float(number) * _SUFFIX[suffix])
        except ValueError:
            raise SambaArgumentError(
                f"{LIMIT_ENV}={os.environ[LIMIT_ENV]!r}: give a size in bytes, or with a K/M/G suffix (8G)"
            ) from None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gib(count: int) -> str:
    """A size in the unit that reads best: GiB, MiB or KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale // 4:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 2**10:.1f} KiB"


def check_fits(needed: int, what: str, advice: str) -> None:
    """Raise `SambaArgumentError` when `needed` bytes exceed what is available."""
    available = available_bytes()
    if available is not None and needed > available:
        source = f"{LIMIT_ENV}" if os.environ.get(LIMIT_ENV, "").strip() else "available (MemAvailable)"
        raise SambaArgumentError(
            f"{what} needs {gib(needed)}, more than the {gib(available)} of host memory {source}: {advice}"
        )

"""Write a file so that readers and concurrent writers only ever see a complete one.

The data goes to a unique temporary file in the target's folder (so the rename stays on one file
system), is flushed and fsynced, then `os.replace`s the target; on any error the temporary file is
removed. Two processes writing the same path both succeed; the file left is one of theirs, whole.
Used for PEFs and compile logs (pef/, app/) and for compile-cache entries (backends/inductor/).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: str, mode: int | None = None) -> Iterator[BinaryIO]:
    """`with atomic_write(path) as handle: handle.write(...)`: `path` appears complete or not at all.

    The file gets `mode`, else what the umask gives a new file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp's 0600 would hide a PEF from its group; cache entries ask for 0600
        os.chmod(temporary, 0o666 & ~_umask() if mode is None else mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _sync_folder(folder)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would race with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable (best effort: not every OS can open a folder)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

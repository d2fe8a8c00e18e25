"""Write a file so that readers and concurrent writers only ever see a complete one.

The data goes to a unique temporary file in the target's folder (so the rename stays on one file
system), is flushed and fsynced, then `os.replace`s the target; on any error the temporary file is
removed. Two processes writing the same path both succeed; the file left is one of theirs, whole.
Used for PEFs and compile logs (pef/, app/) and for compile-cache entries (backends/inductor/).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from sambaflow.errors import SambaIOError


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


@contextlib.contextmanager
def reported_as(path: str, what: str) -> Iterator[None]:
    """Around a write to `path` (and nothing else): an OSError becomes a `SambaIOError` naming
    `what` and `path` and saying what to do, instead of a traceback."""
    try:
        yield
    except OSError as exc:
        raise SambaIOError(write_error_message(path, what, exc)) from None


def write_error_message(path: str, what: str, exc: OSError, folder: str | None = None) -> str:
    """`could not write <what> <path>: <why>: <what to do>` for the usual errnos; `folder`: the
    one to blame (default: the path's own)."""
    folder = folder or os.path.dirname(os.path.abspath(path))
    advice = {
        errno.ENOSPC: f"the disk holding {folder} is full: free some space or write elsewhere",
        errno.EDQUOT: f"your disk quota for {folder} is used up: free some space or write elsewhere",
        errno.EROFS: f"{folder} is on a read-only file system: choose a writable folder",
        errno.EACCES: f"you may not write in {folder}: choose a folder you own",
        errno.EPERM: f"you may not write in {folder}: choose a folder you own",
        errno.EISDIR: "that is a folder: give the path of a file inside it",
        errno.ENOTDIR: "a part of that path is a file, not a folder: fix the path",
    }.get(exc.errno, exc.strerror or str(exc))
    return f"could not write {what} {path!r}: {advice}"


def check_writable(path: str, what: str) -> None:
    """Before a long compile or training run: raise `SambaIOError` now if `path` could not be
    written later (a folder, or under a folder that is read-only or a file). A folder that does not
    exist yet is fine where it can be created."""
    if os.path.isdir(path):
        raise SambaIOError(write_error_message(path, what, IsADirectoryError(errno.EISDIR, "")))
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise SambaIOError(write_error_message(path, what, NotADirectoryError(errno.ENOTDIR, "")))
    if not os.access(folder, os.W_OK | os.X_OK):  # EROFS too, even for root
        raise SambaIOError(write_error_message(path, what, _access_error(folder), folder))


def _access_error(folder: str) -> OSError:
    with contextlib.suppress(OSError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return OSError(errno.EROFS, "read-only file system")
    return PermissionError(errno.EACCES, "permission denied")


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

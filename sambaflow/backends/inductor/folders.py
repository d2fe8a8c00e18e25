"""Folders and files only this user can change: make them 0700 / 0600, say why one cannot be trusted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sambaflow.atomic import atomic_write

_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def make_private_folder(path: Path) -> str | None:
    """Create `path` (and missing parents) 0700; None when it can be trusted, else the reason why not.

    Trusted: `path` is a folder owned by this user that group and others cannot write, inside a
    folder owned by this user or root that others cannot write (or that is sticky, like /tmp), so
    nobody else can put files into it or swap it for another folder.
    """
    try:
        _make(path)
        return untrusted_reason(path)
    except OSError as exc:
        return f"the folder {path} cannot be made or read ({exc})"


def untrusted_reason(path: Path) -> str | None:
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a folder"
    if info.st_uid != os.getuid():
        return f"{path} is owned by user id {info.st_uid}, not by you ({os.getuid()})"
    if info.st_mode & _OTHERS_WRITE:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}): run `chmod 700 {path}`"
    parent = os.stat(path.parent)
    if parent.st_uid not in (os.getuid(), 0):
        return f"its parent {path.parent} is owned by user id {parent.st_uid}, who could replace it"
    if parent.st_mode & _OTHERS_WRITE and not parent.st_mode & stat.S_ISVTX:
        return (
            f"its parent {path.parent} is writable by group or others (mode "
            f"{stat.S_IMODE(parent.st_mode):o}), who could replace it: run `chmod 700 {path.parent}`"
        )
    return None


def _make(path: Path) -> None:
    missing = []
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # another process made it first: checked like any other
            continue
        os.chmod(folder, 0o700)  # whatever the umask


def write_private(path: Path, data: bytes) -> None:
    """Write `path` atomically (unique temp file in the same folder, fsync, rename), mode 0600."""
    with atomic_write(str(path), mode=0o600) as handle:
        handle.write(data)

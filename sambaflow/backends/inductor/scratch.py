"""This process's private folder for extracted packages: `<tmp>/sambaflow-<pid>-XXXX`, mode 0700.

Made on first use, removed at normal exit (atexit). A process that died (kill -9, a crash) cannot
remove its folder, so the next process that makes one removes the folders of this user's dead
processes first.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

PREFIX = "sambaflow-"
_NAME = re.compile(r"sambaflow-(\d+)-[A-Za-z0-9_]+")
_lock = threading.Lock()
_folder: tuple[int, Path] | None = None  # (owner pid, folder): a forked child makes its own


def private_folder() -> Path:
    """This process's folder (made on first call)."""
    global _folder
    with _lock:
        if _folder is None or _folder[0] != os.getpid() or not _folder[1].is_dir():
            remove_stale_folders()
            path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))  # 0700
            _folder = (os.getpid(), path)
            atexit.register(_remove, os.getpid(), path)
        return _folder[1]


@contextlib.contextmanager
def compiler_temporaries() -> Iterator[None]:
    """TMPDIR, for the processes started in the block (the C++ compiler), inside this process's
    private folder: a compiler interrupted by Ctrl-C can leave its temporary files (seen with g++
    under subprocess.run), and these then go with the folder, at exit or after a kill -9. Python's
    own tempfile has read TMPDIR already and keeps its folder."""
    folder = private_folder() / "tmp"
    folder.mkdir(exist_ok=True)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before


def remove_stale_folders(root: str | Path | None = None) -> list[Path]:
    """Remove this user's `sambaflow-<pid>-*` folders whose process is gone; returns them."""
    root = Path(root if root is not None else tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{PREFIX}*"):
        match = _NAME.fullmatch(path.name)
        if match and _is_ours(path) and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_ours(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _remove(pid: int, path: Path) -> None:
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)

"""Turn package bytes into AOTInductor's loader: checked extraction, one loader per package per process.

We extract the package ourselves, after `package.package_members` has checked every member name,
into `<private folder>/<sha256>/` (scratch.py), and hand AOTInductor the folder: its own loader
would extract to `$TMPDIR/aotinductor_XXXXXX` with no name checks, and leave that folder behind
when the process is killed. Each extraction of a package is a new `.so` path, which the dynamic
loader maps again and never unmaps (1.6 MB per load of the seed's step); extracting each package
once and keeping one loader per SHA-256 while any program uses it keeps reloads flat.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import weakref
import zipfile
from pathlib import Path
from typing import Any

import torch

from sambaflow.backends.inductor.package import MODEL, open_package, package_members
from sambaflow.backends.inductor.scratch import private_folder
from sambaflow.errors import SambaBackendError

_DONE = ".extracted"
_lock = threading.Lock()
_loaders: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def load_loader(blob: bytes) -> Any:
    """AOTInductor's loader for `blob`: the live one when these bytes were loaded before."""
    sha = hashlib.sha256(blob).hexdigest()
    with _lock:
        loader = _loaders.get(sha)
        if loader is None:
            loader = _new_loader(extracted(blob, sha))
            _loaders[sha] = loader
    return loader


def extracted(blob: bytes, sha: str) -> Path:
    """The package's files under this process's private folder (extracted once per SHA-256)."""
    folder = private_folder() / sha
    if (folder / _DONE).is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    safe_extract(blob, folder)
    (folder / _DONE).touch()
    return folder


def safe_extract(blob: bytes, folder: Path) -> None:
    """Write every member under `folder` (names checked first), files 0600, never through a link."""
    members = package_members(blob)
    folder.mkdir(mode=0o700)
    try:
        with open_package(blob) as archive:
            for info in members:
                _write_member(archive, info, folder / info.filename)
    except (OSError, zipfile.BadZipFile) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise SambaBackendError(
            f"inductor: the package cannot be extracted ({exc}); recompile the PEF"
        ) from None


def _write_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    if info.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with archive.open(info) as source, os.fdopen(os.open(path, flags, 0o600), "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


def _new_loader(folder: Path) -> Any:
    package_loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    try:
        if package_loader is None:  # pragma: no cover - older/newer torch: public, slower first call
            from torch._inductor import aoti_load_package

            return aoti_load_package(str(folder)).loader
        # The raw loader: torch._inductor.aoti_load_package costs ~2 s of imports on first use.
        return package_loader(str(folder), MODEL, False, 1, -1)
    except RuntimeError as exc:
        raise SambaBackendError(
            f"inductor: AOTInductor could not load the package extracted in {folder} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); recompile the PEF"
        ) from exc

"""Read a PEF's zip defensively: safe member names, no duplicates, every read capped.

A member is rejected before it is read when the zip declares more bytes than the caller allows,
and reading stops one byte past the cap when the zip's declaration lies, so a small PEF can never
make the loader inflate gigabytes.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Any

from sambaflow.errors import SambaPefError

MAX_MEMBERS = 10_000
MAX_NAME = 255
LIMIT_ENV = "SAMBAFLOW_PEF_MAX_MB"
DEFAULT_LIMIT_MB = 4096
_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    ValueError,
)


def max_pef_bytes() -> int:
    """The largest PEF (file and unpacked members each) this process reads: $SAMBAFLOW_PEF_MAX_MB."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return DEFAULT_LIMIT_MB << 20
    if not text.isdigit() or int(text) < 1:
        raise SambaPefError(f"{LIMIT_ENV}={text!r} is not a positive whole number of MiB: fix or unset it")
    return int(text) << 20


def unsafe_name_problem(name: str) -> str | None:
    """Why `name` may not be a PEF member (absolute, `..`, backslash, control characters), or None."""
    if not name or len(name) > MAX_NAME:
        return "is empty or too long"
    if name.startswith("/") or "\\" in name or ":" in name:
        return "is an absolute or non-portable path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' path component"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds control characters"
    return None


class Archive:
    """An open PEF zip whose member names have been checked; `read` caps every member."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._zip = _open_zip(path)
        try:
            self.infos = _checked_infos(self._zip, path)
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._zip.close()

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str, limit: int, what: str = "recompile it") -> bytes:
        """Member `name`, refused before reading when the zip declares more than `limit` bytes."""
        info = self.infos[name]
        if info.file_size > limit:
            raise _oversize(self.path, name, info.file_size, limit, what)
        try:
            with self._zip.open(info) as stream:
                data = stream.read(limit + 1)
        except _READ_ERRORS as exc:
            raise _damaged(
                self.path, f"member '{name}' cannot be read ({type(exc).__name__}: {exc})"
            ) from None
        if len(data) > limit:
            raise _oversize(self.path, name, len(data), limit, what)
        return data


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise SambaPefError(
            f"PEF file '{path}' does not exist: compile first "
            "(python app.py compile ...) or fix the -p/--pef path"
        )
    size, limit = os.path.getsize(path), max_pef_bytes()
    if size > limit:
        raise SambaPefError(
            f"'{path}' is {size >> 20} MiB, more than the {limit >> 20} MiB this process reads: "
            f"if you trust it, raise {LIMIT_ENV}"
        )
    try:
        return zipfile.ZipFile(path)
    except _READ_ERRORS as exc:  # zipfile, zlib and OS errors alike: a damaged file, never a crash
        raise _damaged(path, f"damaged, truncated or not a zip file: {exc}") from None


def _checked_infos(archive: zipfile.ZipFile, path: str) -> dict[str, zipfile.ZipInfo]:
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _damaged(path, f"it has {len(infos)} members, more than the limit of {MAX_MEMBERS}")
    checked: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        problem = unsafe_name_problem(info.filename)
        if problem:
            raise _damaged(path, f"member name {info.filename!r} {problem}")
        if info.filename in checked:
            raise _damaged(path, f"member '{info.filename}' appears twice")
        checked[info.filename] = info
    return checked


def _oversize(path: str, name: str, size: int, limit: int, what: str) -> SambaPefError:
    return SambaPefError(
        f"'{path}': member '{name}' holds {size} bytes, more than the {limit} its manifest allows: "
        f"the PEF is damaged or was tampered with; {what}"
    )


def _damaged(path: str, problem: str) -> SambaPefError:
    return SambaPefError(f"'{path}' is not a readable PEF ({problem}). Recompile it.")

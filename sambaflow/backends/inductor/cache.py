"""The compile cache: `.pt2` packages by fingerprint, each with a note of what it was compiled from.

A cached package is native code that goes into every PEF compiled afterwards, so the cache trusts
only what this user wrote: the folder must be this user's and not writable by others (folders.py;
otherwise the backend compiles without it and says why), and each entry's note records the
SHA-256 of its package, checked on every hit. An entry that does not match its note is a miss
(logged), never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sambaflow.backends.inductor.folders import make_private_folder, untrusted_reason, write_private
from sambaflow.backends.inductor.package import package_members
from sambaflow.errors import SambaBackendError

log = logging.getLogger("sambaflow.compile")
CACHE_ENV = "SAMBAFLOW_CACHE_DIR"


def default_cache_dir() -> Path:
    """`$SAMBAFLOW_CACHE_DIR/inductor`, else `~/.cache/sambaflow/inductor`."""
    root = os.environ.get(CACHE_ENV)
    return cache_dir_under(Path(root).expanduser() if root else Path.home() / ".cache" / "sambaflow")


def cache_dir_under(root: str | Path) -> Path:
    return Path(root) / "inductor"


@dataclass
class CacheEntry:
    """One cached package as found on disk; `note` is None when the note is missing or unreadable."""

    key: str
    package: Path
    note_path: Path
    note: dict[str, Any] | None
    size: int
    created: float

    @property
    def program(self) -> str:
        return str((self.note or {}).get("program", "?"))

    def part(self, name: str) -> str:
        parts = (self.note or {}).get("parts")
        return str(parts.get(name, "?")) if isinstance(parts, dict) else "?"


class PackageCache:
    """`.pt2` packages by fingerprint in `root`, each with a JSON note (program, parts, SHA-256)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def refused(self, create: bool = True) -> str | None:
        """Why this folder cannot be trusted (None when it can); `create` makes it, 0700, first."""
        if not create and not self.root.exists():
            return None
        reason = make_private_folder(self.root) if create else untrusted_reason(self.root)
        if reason is None:
            return None
        return (
            f"compile cache {self.root} refused: {reason}. Anyone who can write there could plant "
            f"native code in your PEFs; fix it, or set {CACHE_ENV} to a folder of your own"
        )

    def get(self, key: str, name: str, parts: dict[str, Any]) -> tuple[bytes | None, str]:
        refused = self.refused()
        if refused is not None:
            return None, refused + "; compiling without the cache"
        path = self.root / f"{key}.pt2"
        if not path.exists():
            return None, self._why_missing(name, parts)
        try:
            blob = self._read_checked(key, parts)
        except (OSError, SambaBackendError) as exc:
            log.warning("inductor: ignoring cache entry %s: %s", path, exc)
            return None, f"cached package {path} not used ({exc}); recompiling"
        return blob, f"same graph, inputs, torch and target as {path}"

    def put(self, key: str, name: str, parts: dict[str, Any], blob: bytes) -> str | None:
        """Store atomically; returns a warning instead of failing when the cache is unwritable."""
        refused = self.refused()
        if refused is not None:
            return refused
        note = {
            "program": name,
            "parts": parts,
            "created": time.time(),
            "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
        try:
            write_private(self.root / f"{key}.pt2", blob)
            write_private(self.root / f"{key}.json", json.dumps(note, indent=1).encode())
        except OSError as exc:
            return f"could not write the compile cache {self.root}: {exc}"
        return None

    def entries(self) -> list[CacheEntry]:
        """Every entry (a package, its note, or both), oldest first."""
        keys = {p.stem for p in self.root.glob("*.pt2")} | {p.stem for p in self.root.glob("*.json")}
        found = [self._entry(k) for k in keys] if self.root.is_dir() else []
        return sorted(found, key=lambda e: e.created)

    def problem(self, entry: CacheEntry) -> str | None:
        """Why `entry` must not be used (None when its package matches its note)."""
        try:
            self._read_checked(entry.key, None)
        except (OSError, SambaBackendError) as exc:
            return str(exc)
        return None

    def remove(self, entry: CacheEntry) -> None:
        entry.package.unlink(missing_ok=True)
        entry.note_path.unlink(missing_ok=True)

    def _entry(self, key: str) -> CacheEntry:
        package, note_path = self.root / f"{key}.pt2", self.root / f"{key}.json"
        try:
            note = _read_note(note_path)
        except (OSError, SambaBackendError):
            note = None
        sizes = [p.stat().st_size for p in (package, note_path) if p.exists()]
        mtimes = [p.stat().st_mtime for p in (package, note_path) if p.exists()]
        created = note.get("created") if note and isinstance(note.get("created"), (int, float)) else None
        return CacheEntry(key, package, note_path, note, sum(sizes), created or max(mtimes, default=0.0))

    def _read_checked(self, key: str, parts: dict[str, Any] | None) -> bytes:
        note = _read_note(self.root / f"{key}.json")
        if parts is not None and note.get("parts") != parts:
            raise SambaBackendError("its note describes another compile")
        blob = (self.root / f"{key}.pt2").read_bytes()
        actual = hashlib.sha256(blob).hexdigest()
        if actual != note.get("sha256"):
            raise SambaBackendError(
                f"the package's SHA-256 {actual[:16]}... is not the {str(note.get('sha256'))[:16]}... "
                "its note recorded: it was changed after it was cached"
            )
        package_members(blob)
        return blob

    def _why_missing(self, name: str, parts: dict[str, Any]) -> str:
        previous = self._latest_note(name, _tensor_names(parts))
        if previous is None:
            return f"not compiled before (no cached '{name}' program of this model in {self.root})"
        changed = [
            _difference(k, previous["parts"].get(k), v)
            for k, v in parts.items()
            if previous["parts"].get(k) != v
        ]
        return f"this model's newest cached '{name}' program differs: " + "; ".join(changed)

    def _latest_note(self, name: str, tensors: list[str]) -> dict[str, Any] | None:
        """The newest note of program `name` over the same named tensors (the same model)."""
        notes = []
        for path in self.root.glob("*.json") if self.root.is_dir() else []:
            try:
                note = _read_note(path)
            except (OSError, SambaBackendError):
                continue
            if note.get("program") == name and isinstance(note.get("parts"), dict):
                if _tensor_names(note["parts"]) == tensors:
                    notes.append(note)
        return max(notes, key=lambda n: n.get("created", 0), default=None)


def _tensor_names(parts: dict[str, Any]) -> list[str]:
    """The program's input names (`inputs` entries read 'name layout'): which model it is."""
    inputs = parts.get("inputs")
    return [str(entry).split(" ")[0] for entry in inputs] if isinstance(inputs, list) else []


def _read_note(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SambaBackendError(f"its note {path.name} is missing")
    try:
        note = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise SambaBackendError(f"its note {path.name} is not JSON ({exc})") from None
    if not isinstance(note, dict) or not isinstance(note.get("sha256"), str):
        raise SambaBackendError(f"its note {path.name} records no SHA-256 of the package")
    return note


def _difference(key: str, old: Any, new: Any) -> str:
    if key == "graph":
        return "the graph changed"
    if key == "compiler":
        return "sambaflow's inductor backend (its rewrites or passes) changed"
    if key == "threads":
        return f"compiled for {old} threads, now {new} (torch.get_num_threads(), e.g. OMP_NUM_THREADS)"
    if isinstance(old, list) and isinstance(new, list):
        pairs = [(a, b) for a, b in zip(old, new) if a != b]
        if pairs:
            return f"{key}: {pairs[0][0]} -> {pairs[0][1]}" + (
                f" (+{len(pairs) - 1} more)" if len(pairs) > 1 else ""
            )
        return f"{key}: {len(old)} -> {len(new)} entries"
    return f"{key}: {old} -> {new}"

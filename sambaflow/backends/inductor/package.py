"""What an AOTInductor `.pt2` package may hold, and whether it fits a program and this machine.

Every check reads the zip's directory or small metadata members; nothing here extracts or loads
the library. A package is refused when a member name could land outside its folder (absolute,
`..`, backslash, NUL, duplicate), when its members claim far more bytes than the package holds,
when it holds no compiled library, or when it was built for another graph or a CPU this one lacks.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import PurePosixPath

import torch

from sambaflow.backends.inductor.fingerprint import fingerprint
from sambaflow.backends.inductor.probe import cpu_features
from sambaflow.errors import SambaBackendError
from sambaflow.passes.sections import SectionProgram

MODEL = "model"
META_KEY = "sambaflow_fingerprint"
TARGET_KEY = "sambaflow_target"
#: members may claim at most this many times the package's size (AOTInductor stores them uncompressed)
MAX_EXPANSION = 32


def open_package(blob: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(blob))
    except zipfile.BadZipFile as exc:
        raise SambaBackendError(f"inductor: not an AOTInductor package ({exc})") from None


def package_members(blob: bytes) -> list[zipfile.ZipInfo]:
    """The checked members; the package must hold a compiled library, so loading compiles nothing."""
    with open_package(blob) as archive:
        members = archive.infolist()
    for info in members:
        check_member_name(info.orig_filename)
    _check_unique(members)
    _check_sizes(members, len(blob))
    if not any(_is_model_file(m.filename, ".so") for m in members):
        raise SambaBackendError(
            "inductor: the package holds no compiled library (.so); "
            "it would need compiling at load time. Recompile the PEF."
        )
    return members


def check_member_name(name: str) -> None:
    """Refuse a name that would be written outside the extraction folder, or reads differently elsewhere."""
    parts = PurePosixPath(name).parts
    bad = (
        not name
        or "\\" in name
        or "\x00" in name
        or name.startswith("/")
        or (len(name) > 1 and name[0].isalpha() and name[1] == ":")  # C:...
        or ".." in parts
    )
    if bad:
        raise SambaBackendError(
            f"inductor: the package holds a member named {name!r}, which is absolute or holds '..', a "
            "backslash or a NUL, so extracting it could write outside its folder; refusing to load it. "
            "The PEF was not written by sambaflow or was altered: recompile it from source."
        )


def _check_unique(members: list[zipfile.ZipInfo]) -> None:
    seen: set[str] = set()
    for info in members:
        if info.filename in seen:
            raise SambaBackendError(
                f"inductor: the package holds two members named {info.filename!r}; refusing to load it "
                "(which one is used would depend on the reader). Recompile the PEF."
            )
        seen.add(info.filename)


def _check_sizes(members: list[zipfile.ZipInfo], size: int) -> None:
    claimed = sum(m.file_size for m in members)
    if claimed > MAX_EXPANSION * size + (1 << 20):
        raise SambaBackendError(
            f"inductor: the package's members claim {claimed / 1e6:.1f} MB from a {size / 1e6:.1f} MB "
            f"package (more than {MAX_EXPANSION}x); refusing to extract it. Recompile the PEF."
        )


def _is_model_file(name: str, suffix: str) -> bool:
    return name.endswith(suffix) and f"/aotinductor/{MODEL}/" in name


def package_metadata(blob: bytes) -> dict[str, str]:
    """The metadata AOTInductor wrote next to the library (target ISA, our fingerprint)."""
    found = [m for m in package_members(blob) if _is_model_file(m.filename, "wrapper_metadata.json")]
    if not found:
        return {}
    with open_package(blob) as archive:
        try:
            meta = json.loads(archive.read(found[0]))
        except (ValueError, zipfile.BadZipFile) as exc:
            raise SambaBackendError(
                f"inductor: the package's metadata is unreadable ({exc}); recompile"
            ) from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SambaBackendError("inductor: the package's metadata is not a table of strings; recompile")
    return meta


def check_package(program: SectionProgram, blob: bytes) -> dict[str, str]:
    """Refuse a package built for another program, another graph, or a CPU this one lacks;
    returns its metadata."""
    meta = package_metadata(blob)
    if META_KEY not in meta or TARGET_KEY not in meta:
        raise SambaBackendError(
            f"inductor: the package for '{program.name}' was not made by this version of sambaflow's "
            "inductor backend (no fingerprint in it); recompile the PEF"
        )
    expected = fingerprint(program, meta[TARGET_KEY])
    if meta.get(META_KEY) != expected:
        raise SambaBackendError(
            f"inductor: the package for '{program.name}' was compiled from another graph or input "
            f"layout (fingerprint {meta.get(META_KEY)}, this program {expected}); recompile the PEF"
        )
    _check_isa(program, meta)
    return meta


def package_device(meta: dict[str, str]) -> str:
    """The device a package was compiled for (`cpu`, `cuda`), from its metadata."""
    return meta.get("AOTI_DEVICE_KEY", "cpu")


def _check_isa(program: SectionProgram, meta: dict[str, str]) -> None:
    device = package_device(meta)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SambaBackendError(
            f"inductor: '{program.name}' was compiled for CUDA and this machine has no GPU"
        )
    if device == "cpu":
        needed = set(meta.get("AOTI_CPU_ISA", "").lower().split())
        missing = needed - cpu_features()
        if missing:
            raise SambaBackendError(
                f"inductor: '{program.name}' was compiled for a CPU with {sorted(needed)}; this CPU "
                f"lacks {sorted(missing)}. Recompile the PEF on this machine."
            )

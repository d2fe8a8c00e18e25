"""Write and read PEF files: a zip of `manifest.json`, `graph.txt` and one JSON graph (plus an
optional backend binary) per program. Every member's SHA-256 is in the manifest; reading checks
the format version and every checksum before anything is built from the file."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

from sambaflow.errors import SambaPefError
from sambaflow.passes.sections import SectionProgram
from sambaflow.pef.codec import decode_graph, encode_graph
from sambaflow.pef.manifest import FORMAT, FORMAT_VERSION, graph_entry, graph_from_entry
from sambaflow.trace.graph import TracedGraph

MANIFEST = "manifest.json"


@dataclass
class CompiledGraph:
    """One graph to store: the traced step, its programs and each program's backend binary."""

    graph: TracedGraph
    programs: dict[str, SectionProgram]
    binaries: dict[str, bytes]


def write_pef(path: str, header: dict[str, Any], graphs: dict[str, CompiledGraph], text: str) -> None:
    members: dict[str, bytes] = {"graph.txt": text.encode()}
    manifest = dict(header, format=FORMAT, format_version=FORMAT_VERSION, graphs={})
    for kind, compiled in graphs.items():
        entry = graph_entry(compiled.graph)
        entry["programs"] = {}
        for name, program in compiled.programs.items():
            entry["programs"][name] = _program_members(
                kind, name, program, compiled.binaries.get(name), members
            )
        manifest["graphs"][kind] = entry
    manifest["members"] = {name: _sha256(data) for name, data in members.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".partial"
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        for name, data in members.items():
            archive.writestr(name, data)
    os.replace(temporary, path)  # never leave a half-written PEF under the real name


def _program_members(
    kind: str, name: str, program: SectionProgram, binary: bytes | None, members: dict[str, bytes]
) -> dict[str, Any]:
    graph_member = f"graphs/{kind}/{name}.json"
    # Key order is data here: a node's keyword arguments must come back in the traced order, or
    # the decoded graph's code (and so its fingerprint) differs from the compiled one.
    members[graph_member] = json.dumps(encode_graph(program.module)).encode()
    entry = {"inputs": program.inputs, "outputs": program.outputs, "graph": graph_member, "binary": None}
    if binary:
        twin = next((m for m, data in members.items() if m.endswith(".bin") and data is binary), None)
        entry["binary"] = twin or f"graphs/{kind}/{name}.bin"
        members[entry["binary"]] = binary
    return entry


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PefFile:
    """A PEF read from disk and fully verified (format, version, checksums)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.manifest, self.members = _read_verified(path)

    @property
    def kinds(self) -> list[str]:
        return list(self.manifest["graphs"])

    def entry(self, kind: str) -> dict[str, Any]:
        return self.manifest["graphs"][kind]

    def graph(self, kind: str) -> TracedGraph:
        entry = self.entry(kind)
        return graph_from_entry(entry, self.program(kind, "step").module)

    def program(self, kind: str, name: str) -> SectionProgram:
        spec = self.entry(kind)["programs"][name]
        module = decode_graph(_json(self.members[spec["graph"]], f"{self.path}:{spec['graph']}"))
        return SectionProgram(name, module, list(spec["inputs"]), list(spec["outputs"]))

    def binary(self, kind: str, name: str) -> bytes:
        member = self.entry(kind)["programs"][name]["binary"]
        return self.members[member] if member else b""


def _read_verified(path: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    if not os.path.isfile(path):
        raise SambaPefError(
            f"PEF file '{path}' does not exist: compile first "
            "(python app.py compile ...) or fix the -p/--pef path"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            contents = {name: archive.read(name) for name in archive.namelist()}
    except Exception as exc:  # zipfile, zlib and OS errors alike: a damaged file, never a crash
        raise SambaPefError(
            f"'{path}' is not a readable PEF (damaged, truncated or not a zip file: {exc}). Recompile it."
        ) from None
    if MANIFEST not in contents:
        raise SambaPefError(f"'{path}' has no {MANIFEST}: it is not a PEF written by sambaflow")
    manifest = _json(contents.pop(MANIFEST), f"{path}:{MANIFEST}")
    _check_format(manifest, path)
    _check_members(manifest, contents, path)
    return manifest, contents


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SambaPefError(f"{where} is not valid JSON ({exc}); the PEF is damaged: recompile it") from None


def _check_format(manifest: Any, path: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SambaPefError(
            f"'{path}' is not a sambaflow PEF (manifest format is "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SambaPefError(
            f"'{path}' has PEF format version {version}, written by sambaflow "
            f"{manifest.get('producer', {}).get('sambaflow', '?')}; this sambaflow reads format versions up "
            f"to {FORMAT_VERSION}. Upgrade sambaflow or recompile the PEF with this version."
        )
    if not isinstance(manifest.get("graphs"), dict) or not manifest["graphs"]:
        raise SambaPefError(f"'{path}': the manifest lists no graphs; the PEF is damaged, recompile it")
    if version < FORMAT_VERSION:
        raise SambaPefError(
            f"'{path}' has the older PEF format version {version}; this sambaflow "
            f"reads version {FORMAT_VERSION}. Recompile the PEF."
        )


def _check_members(manifest: dict[str, Any], contents: dict[str, bytes], path: str) -> None:
    expected = manifest.get("members", {})
    missing = sorted(set(expected) - set(contents))
    if missing:
        raise SambaPefError(f"'{path}' is missing members {missing}: the file is incomplete, recompile it")
    damaged = sorted(name for name, digest in expected.items() if _sha256(contents[name]) != digest)
    if damaged:
        raise SambaPefError(
            f"'{path}': members {damaged} fail their checksum: the file is damaged, recompile it"
        )

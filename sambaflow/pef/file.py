"""Write and read PEF files: a zip of `manifest.json`, `graph.txt` and one JSON graph (plus an
optional backend binary) per program, and `signature.json` when signed.

The manifest records every member's SHA-256 and size and a checksum of itself. Reading checks, in
order: the signature (when a key is configured, before anything is parsed), the format version, the
manifest's checksum and schema, that the zip holds exactly the listed members, each member's size
(before reading it) and digest, and that every program's inputs and outputs match its checksummed
graph member. Nothing is built from the file before all of that passes.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from typing import Any

from sambaflow.atomic import atomic_write
from sambaflow.errors import SambaPefError
from sambaflow.passes.sections import SectionProgram
from sambaflow.pef.archive import Archive
from sambaflow.pef.codec import encode_graph
from sambaflow.pef.consistency import (
    MANIFEST,
    check_consistency,
    check_listing,
    check_programs,
    manifest_digest,
    parse_json,
)
from sambaflow.pef.decode import decode_graph
from sambaflow.pef.manifest import FORMAT, FORMAT_VERSION, graph_entry, graph_from_entry
from sambaflow.pef.schema import check_manifest
from sambaflow.pef.sign import (
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    SigningKey,
    read_signature,
    sign,
    signed_by,
    verify,
)
from sambaflow.trace.graph import TracedGraph

MAX_MANIFEST_BYTES = 64 << 20


@dataclass
class CompiledGraph:
    """One graph to store: the traced step, its programs and each program's backend binary."""

    graph: TracedGraph
    programs: dict[str, SectionProgram]
    binaries: dict[str, bytes]


def write_pef(
    path: str,
    header: dict[str, Any],
    graphs: dict[str, CompiledGraph],
    text: str,
    key: SigningKey | None = None,
) -> None:
    """Write the PEF atomically (a unique temporary file, fsynced, then renamed); sign it with `key`."""
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
    manifest["members"] = {
        name: {"sha256": _sha256(data), "size": len(data)} for name, data in members.items()
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with atomic_write(path) as handle, zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, raw)
        for name, data in members.items():
            zf.writestr(name, data)
        if key is not None:
            zf.writestr(SIGNATURE, sign(raw, key))


def _program_members(
    kind: str, name: str, program: SectionProgram, binary: bytes | None, members: dict[str, bytes]
) -> dict[str, Any]:
    graph_member = f"graphs/{kind}/{name}.json"
    # Key order is data here: a node's keyword arguments must come back in the traced order, or
    # the decoded graph's code (and so its fingerprint) differs from the compiled one. The
    # program's input and output names live in the checksummed member too; loading compares them
    # with the manifest's.
    encoded = {"inputs": program.inputs, "outputs": program.outputs} | encode_graph(program.module)
    members[graph_member] = json.dumps(encoded).encode()
    entry = {"inputs": program.inputs, "outputs": program.outputs, "graph": graph_member, "binary": None}
    if binary:
        twin = next((m for m, data in members.items() if m.endswith(".bin") and data is binary), None)
        entry["binary"] = twin or f"graphs/{kind}/{name}.bin"
        members[entry["binary"]] = binary
    return entry


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PefFile:
    """A PEF read from disk and fully verified; with `key`, its signature was checked first."""

    def __init__(self, path: str, key: SigningKey | None = None, own_key: SigningKey | None = None) -> None:
        """`key`: only a PEF signed with it loads. `own_key` (with no `key`): the user's own key,
        checked when the PEF says it signed it; other PEFs load unverified."""
        self.path = path
        self.own_key = own_key
        self.manifest, self.members, self.signature, self.key = _read_verified(path, key, own_key)
        self._graphs = check_programs(self.manifest, self.members, path)

    @property
    def signed(self) -> bool:
        return self.signature is not None

    @property
    def verified(self) -> bool:
        """True when loading checked the signature (a key configured, or the user's own key)."""
        return self.key is not None

    @property
    def own(self) -> bool:
        """Verified with the user's own key: a PEF this user compiled."""
        return self.key is not None and self.key is self.own_key

    @property
    def signature_fields(self) -> dict[str, Any] | None:
        return read_signature(self.signature)

    @property
    def binary_members(self) -> list[str]:
        """Members holding native code (compiled backend binaries)."""
        programs = [p for g in self.manifest["graphs"].values() for p in g["programs"].values()]
        return sorted({p["binary"] for p in programs if p["binary"]})

    @property
    def kinds(self) -> list[str]:
        return list(self.manifest["graphs"])

    def entry(self, kind: str) -> dict[str, Any]:
        if kind not in self.manifest["graphs"]:
            raise SambaPefError(f"'{self.path}' has no '{kind}' graph (it has {self.kinds}): recompile it")
        return self.manifest["graphs"][kind]

    def graph(self, kind: str) -> TracedGraph:
        entry = self.entry(kind)
        return graph_from_entry(entry, self.program(kind, "step").module)

    def program(self, kind: str, name: str) -> SectionProgram:
        spec = self._spec(kind, name)
        module = decode_graph(self._graphs[spec["graph"]], f"'{self.path}': member '{spec['graph']}'")
        return SectionProgram(name, module, list(spec["inputs"]), list(spec["outputs"]))

    def binary(self, kind: str, name: str) -> bytes:
        member = self._spec(kind, name)["binary"]
        return self.members[member] if member else b""

    def _spec(self, kind: str, name: str) -> dict[str, Any]:
        programs = self.entry(kind)["programs"]
        if name not in programs:
            raise SambaPefError(
                f"'{self.path}' has no program '{name}' in its '{kind}' graph (it has "
                f"{sorted(programs)}): recompile it"
            )
        return programs[name]


def _read_verified(
    path: str, key: SigningKey | None, own_key: SigningKey | None = None
) -> tuple[dict[str, Any], dict[str, bytes], bytes | None, SigningKey | None]:
    """(manifest, members, signature, the key that verified it or None)."""
    with Archive(path) as archive:
        if MANIFEST not in archive.infos:
            raise SambaPefError(
                f"'{path}' has no {MANIFEST}: it is not a PEF written by sambaflow, or it is damaged: recompile it"
            )
        raw = archive.read(MANIFEST, MAX_MANIFEST_BYTES)
        signature = archive.read(SIGNATURE, MAX_SIGNATURE_BYTES) if SIGNATURE in archive.infos else None
        if key is None and own_key is not None and signed_by(signature, own_key):
            key = own_key  # it says the user signed it: check that it is so
        if key is not None:
            verify(raw, signature, key, path)  # before anything from the file is parsed
        manifest = parse_json(raw, f"{path}:{MANIFEST}")
        _check_format(manifest, path)
        _check_digest(manifest, path)
        check_manifest(manifest, path)
        check_consistency(manifest, path)
        check_listing(manifest, archive.names, signature is not None, path)
        members = {n: archive.read(n, e["size"]) for n, e in manifest["members"].items()}
    _check_members(manifest, members, path)
    return manifest, members, signature, key


def _check_format(manifest: Any, path: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SambaPefError(
            f"'{path}' is not a sambaflow PEF (manifest format is "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        producer = manifest.get("producer")
        made_by = producer.get("sambaflow", "?") if isinstance(producer, dict) else "?"
        raise SambaPefError(
            f"'{path}' has PEF format version {version!r}, written by sambaflow {made_by}; this sambaflow "
            f"reads format versions up to {FORMAT_VERSION}. Upgrade sambaflow or recompile the PEF with "
            "this version."
        )
    if version < FORMAT_VERSION:
        raise SambaPefError(
            f"'{path}' has the older PEF format version {version}; this sambaflow "
            f"reads version {FORMAT_VERSION}. Recompile the PEF."
        )


def _check_digest(manifest: dict[str, Any], path: str) -> None:
    if manifest.get("manifest_sha256") != manifest_digest(manifest, path):
        raise SambaPefError(
            f"'{path}': {MANIFEST} fails its checksum (manifest_sha256): the manifest was edited or "
            "damaged. Recompile the PEF"
        )


def _check_members(manifest: dict[str, Any], members: dict[str, bytes], path: str) -> None:
    expected = manifest["members"]
    damaged = sorted(
        name
        for name, data in members.items()
        if len(data) != expected[name]["size"] or _sha256(data) != expected[name]["sha256"]
    )
    if damaged:
        raise SambaPefError(
            f"'{path}': members {damaged} fail their checksum: the file is damaged, recompile it"
        )

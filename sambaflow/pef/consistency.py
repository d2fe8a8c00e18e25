"""Checks that tie a schema-valid manifest to itself and to the zip's members.

The manifest's own checksum; member names, sizes and the listing (no member missing, none
unlisted); each graph's programs (every declared section has one; the fused step reads and writes
exactly the graph's tensors); and each program's inputs and outputs against its checksummed graph
member, so an edited wiring list is an error, never a silently wrong run.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import Any

from sambaflow.errors import SambaPefError
from sambaflow.passes.sections import SAVED_PREFIX
from sambaflow.pef.archive import max_pef_bytes, unsafe_name_problem
from sambaflow.pef.sign import SIGNATURE

MANIFEST = "manifest.json"
_RECOMPILE = "the PEF is damaged or was edited: recompile it"


def manifest_digest(manifest: dict[str, Any], path: str = "") -> str:
    """SHA-256 of the manifest's canonical JSON, without its own `manifest_sha256` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError, TypeError):
        raise SambaPefError(f"'{path}': {MANIFEST} cannot be checksummed; {_RECOMPILE}") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _fail(path: str, problem: str) -> SambaPefError:
    return SambaPefError(f"'{path}': {problem}; {_RECOMPILE}")


def check_consistency(manifest: dict[str, Any], path: str) -> None:
    """Member table and per-graph checks that a schema cannot express."""
    if not manifest["graphs"]:
        raise _fail(path, "the manifest lists no graphs")
    _check_member_table(manifest["members"], path)
    for kind, entry in manifest["graphs"].items():
        _check_graph(kind, entry, manifest["members"], path)


def _check_member_table(members: dict[str, Any], path: str) -> None:
    total = 0
    for name, entry in members.items():
        problem = unsafe_name_problem(name)
        if problem or name in (MANIFEST, SIGNATURE):
            raise _fail(path, f"the manifest lists member {name!r}, which {problem or 'is reserved'}")
        digest = entry["sha256"]
        if len(digest) != 64 or not all(c in string.hexdigits for c in digest):
            raise _fail(path, f"members.{name}.sha256 is not a SHA-256 digest")
        if entry["size"] < 0:
            raise _fail(path, f"members.{name}.size is negative")
        total += entry["size"]
    if total > max_pef_bytes():
        raise SambaPefError(
            f"'{path}': its members add up to {total >> 20} MiB, more than the {max_pef_bytes() >> 20} MiB "
            "this process reads: if you trust it, raise SAMBAFLOW_PEF_MAX_MB"
        )


def _check_graph(kind: str, entry: dict[str, Any], members: dict[str, Any], path: str) -> None:
    where = f"graphs.{kind}"
    if not entry["sections"]:
        raise _fail(path, f"{where}.sections is empty")
    programs = entry["programs"]
    missing = [p for p in ["step", *entry["sections"]] if p not in programs]
    if missing:
        raise _fail(path, f"{where} declares sections {entry['sections']} but has no program {missing}")
    for name, program in programs.items():
        for field in ("graph", "binary"):
            member = program[field]
            if member is not None and member not in members:
                raise _fail(path, f"{where}.programs.{name}.{field} names '{member}', which is not a member")
    inputs, outputs = [s["name"] for s in entry["inputs"]], [s["name"] for s in entry["outputs"]]
    for name, program in programs.items():
        # a section reads graph inputs, and what earlier sections wrote (gradients, saved values)
        readable = inputs if name == "step" else inputs + outputs
        _check_names(program["inputs"], readable, name == "step", f"{where}.programs.{name}.inputs", path)
        _check_names(program["outputs"], outputs, name == "step", f"{where}.programs.{name}.outputs", path)
    if not set(entry["loss_names"]) <= set(outputs):
        raise _fail(path, f"{where}.loss_names {entry['loss_names']} are not all outputs of the graph")
    for spec in entry["inputs"] + entry["outputs"]:
        if any(d < 0 for d in spec["shape"]):
            raise _fail(path, f"{where}: tensor '{spec['name']}' has a negative size")


def _check_names(names: list[str], graph_names: list[str], step: bool, where: str, path: str) -> None:
    """A program reads and writes the graph's tensors (and, between sections, saved values)."""
    if len(set(names)) != len(names):
        raise _fail(path, f"{where} names a tensor twice")
    known = set(graph_names)
    foreign = [n for n in names if n not in known and (step or not n.startswith(SAVED_PREFIX))]
    if foreign:
        raise _fail(path, f"{where} names {foreign[:3]}, which are not tensors of the graph")


def check_listing(manifest: dict[str, Any], names: list[str], signed: bool, path: str) -> None:
    """The zip holds exactly the manifest's members (plus the manifest and the signature)."""
    listed = set(manifest["members"])
    present = set(names) - {MANIFEST} - ({SIGNATURE} if signed else set())
    missing, unlisted = sorted(listed - present), sorted(present - listed)
    if missing:
        raise SambaPefError(f"'{path}' is missing members {missing}: the file is incomplete, recompile it")
    if unlisted:
        raise _fail(path, f"it holds members {unlisted} that its manifest does not list")


def check_programs(manifest: dict[str, Any], members: dict[str, bytes], path: str) -> dict[str, Any]:
    """Each program's graph member, parsed, after checking its wiring against the manifest."""
    graphs: dict[str, Any] = {}
    for kind, entry in manifest["graphs"].items():
        for name, program in entry["programs"].items():
            member = program["graph"]
            if member not in graphs:
                graphs[member] = parse_json(members[member], f"'{path}': member '{member}'")
            _check_wiring(graphs[member], program, f"graphs.{kind}.programs.{name}", member, path)
    return graphs


def parse_json(data: bytes, where: str) -> Any:
    """A PEF member's JSON; damage (bad bytes, bad JSON, absurd nesting) is a SambaPefError."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SambaPefError(f"{where} is not valid JSON ({exc}); the PEF is damaged: recompile it") from None


def _check_wiring(encoded: Any, program: dict[str, Any], where: str, member: str, path: str) -> None:
    if not isinstance(encoded, dict) or not isinstance(encoded.get("nodes"), list):
        raise _fail(path, f"member '{member}' is not a graph")
    for field in ("inputs", "outputs"):
        if encoded.get(field) != program[field]:
            raise _fail(path, f"{where}.{field} differ from the {field} recorded in member '{member}'")
    nodes = [n for n in encoded["nodes"] if isinstance(n, dict)]
    placeholders = sum(1 for n in nodes if n.get("op") == "placeholder")
    if placeholders != len(program["inputs"]):
        raise _fail(
            path,
            f"member '{member}' has {placeholders} inputs; {where}.inputs lists {len(program['inputs'])}",
        )
    arity = _output_arity([n for n in nodes if n.get("op") == "output"])
    if arity != len(program["outputs"]):
        raise _fail(
            path, f"member '{member}' returns {arity} values; {where}.outputs lists {len(program['outputs'])}"
        )


def _output_arity(outputs: list[dict[str, Any]]) -> int | None:
    if len(outputs) != 1:
        return None
    args = outputs[0].get("args")
    value = args.get("tuple") if isinstance(args, dict) else None
    if not isinstance(value, list) or len(value) != 1:
        return None
    (result,) = value
    if isinstance(result, dict) and len(result) == 1 and ("tuple" in result or "list" in result):
        items = next(iter(result.values()))
        return len(items) if isinstance(items, list) else None
    return 1

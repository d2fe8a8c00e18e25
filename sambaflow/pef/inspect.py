"""Readable text of a PEF's manifest: versions, target, args, sections, tensors, hyperparameters,
and what loading it means for trust (signed or not, native code or not).

Nothing here builds a graph or touches a binary: inspecting a PEF runs no code from it.
"""

from __future__ import annotations

import math
from typing import Any

from sambaflow.passes.sections import SPLIT_AT_GRADIENTS
from sambaflow.pef.codec import dtype_from_name
from sambaflow.pef.file import PefFile
from sambaflow.pef.sign import KEY_ENV, TRUST_NOTE, key_path, load_key, user_key
from sambaflow.trace.graph import SECTION_ORDER
from sambaflow.trace.precision import describe as describe_precision

PROGRAM_ORDER = ["step", *SECTION_ORDER, *(name for name, _ in SPLIT_AT_GRADIENTS)]


def _bytes(entry: dict[str, Any]) -> int:
    return math.prod(entry["shape"]) * dtype_from_name(entry["dtype"]).itemsize


def _tensor_lines(entries: list[dict[str, Any]]) -> list[str]:
    lines = [f"    {'name':52s} {'role':13s} {'shape':16s} {'dtype':9s} {'bytes':>10s}"]
    for e in entries:
        shape = "x".join(map(str, e["shape"])) or "scalar"
        lines.append(f"    {e['name']:52s} {e['role']:13s} {shape:16s} {e['dtype']:9s} {_bytes(e):10d}")
    return lines


def _graph_lines(kind: str, entry: dict[str, Any]) -> list[str]:
    lines = [
        f"graph '{kind}': sections {', '.join(entry['sections'])}; {entry['node_count']} nodes; "
        f"fingerprint {entry['fingerprint'][:16]}"
    ]
    for name, program in sorted(entry["programs"].items(), key=lambda item: PROGRAM_ORDER.index(item[0])):
        binary = f", binary {program['binary']}" if program["binary"] else ""
        lines.append(
            f"  program {name:9s} {len(program['inputs']):3d} inputs -> "
            f"{len(program['outputs']):3d} outputs{binary}"
        )
    if entry["hyper_defaults"]:
        lines.append(
            "  hyperparameters (run-time inputs): "
            + ", ".join(f"{k}={v:g}" for k, v in entry["hyper_defaults"].items())
        )
    if entry["loss_names"]:
        lines.append(f"  losses: {', '.join(entry['loss_names'])}")
    lines.append("  inputs:")
    lines += _tensor_lines(entry["inputs"])
    lines.append("  outputs:")
    lines += _tensor_lines(entry["outputs"])
    return lines


def trust_lines(pef: PefFile) -> list[str]:
    """Signed or not (and checked or not), native code or not, and what loading it means."""
    fields = pef.signature_fields
    if pef.own:
        signed = f"signed with your own key ({pef.key.source}, key id {pef.key.key_id}), signature verified"
    elif pef.verified:
        signed = f"signed with the given key {pef.key.source} (key id {pef.key.key_id}), signature verified"
    elif pef.signed:
        key_id = fields["key_id"] if fields else "unreadable"
        signed = (
            f"signed with another key (key id {key_id}), not yours: not verified; set {KEY_ENV}=FILE "
            "to check it against a shared key"
        )
    else:
        signed = "unsigned"
    binaries = pef.binary_members
    if binaries:
        size = sum(len(pef.members[b]) for b in binaries)
        native = f"yes: {len(binaries)} {pef.manifest['target']['backend']} binaries, {size / 1024:.0f} KiB"
    else:
        native = "none (the JSON graphs run op by op; loading runs no code from the file)"
    return [f"  trust: {signed}", f"  native code: {native}", f"  note: {TRUST_NOTE}"]


def describe(path: str) -> str:
    """The PEF's manifest as text; with $SAMBAFLOW_SIGN_KEY set, its signature is checked first."""
    key = load_key(key_path())
    pef = PefFile(path, key, None if key else user_key())
    m = pef.manifest
    producer = m["producer"]
    lines = [
        f"PEF {path}",
        f"  name: {m['name']}   created: {m['created']}",
        f"  format version {m['format_version']}; sambaflow {producer['sambaflow']}, torch "
        f"{producer['torch']}, python {producer['python']}",
        f"  target: backend {m['target']['backend']} on {m['target']['device']}; "
        f"inference-only: {m['inference']}",
        f"  precision: {describe_precision(m['precision'])}",
    ]
    lines += trust_lines(pef)
    args = m["compile_args"]
    if args:
        lines.append("  compile args: " + ", ".join(f"{k}={v}" for k, v in sorted(args.items())))
    for kind in pef.kinds:
        lines += _graph_lines(kind, pef.entry(kind))
    total = sum(len(data) for data in pef.members.values())
    lines.append(f"members: {len(pef.members) + 1} files, {total / 1024:.0f} KiB besides the manifest")
    return "\n".join(lines)

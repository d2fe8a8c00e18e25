"""Readable text of a PEF's manifest: versions, target, args, sections, tensors, hyperparameters."""

from __future__ import annotations

import math
from typing import Any

from sambaflow.pef.codec import dtype_from_name
from sambaflow.pef.file import PefFile


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
    order = ["step", "fwd", "bckwd", "gradnorm", "opt"]
    for name, program in sorted(entry["programs"].items(), key=lambda item: order.index(item[0])):
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


def describe(path: str) -> str:
    pef = PefFile(path)
    m = pef.manifest
    producer = m.get("producer", {})
    lines = [
        f"PEF {path}",
        f"  name: {m.get('name')}   created: {m.get('created')}",
        f"  format version {m['format_version']}; sambaflow {producer.get('sambaflow')}, torch "
        f"{producer.get('torch')}, python {producer.get('python')}",
        f"  target: backend {m['target']['backend']} on {m['target']['device']}; "
        f"inference-only: {m.get('inference')}",
    ]
    args = m.get("compile_args") or {}
    if args:
        lines.append("  compile args: " + ", ".join(f"{k}={v}" for k, v in sorted(args.items())))
    for kind in pef.kinds:
        lines += _graph_lines(kind, pef.entry(kind))
    total = sum(len(data) for data in pef.members.values())
    lines.append(f"members: {len(pef.members) + 1} files, {total / 1024:.0f} KiB besides the manifest")
    return "\n".join(lines)

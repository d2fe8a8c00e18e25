"""What a report shows of a PEF without running it: programs, tensors, compile facts, trust."""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from sambaflow.app.args import ineffective_arguments
from sambaflow.backends import rewrites
from sambaflow.passes.sections import SectionProgram
from sambaflow.pef.codec import dtype_from_name
from sambaflow.pef.file import PefFile
from sambaflow.pef.inspect import PROGRAM_ORDER, trust_lines

#: what each program is, for the page (prompt/token programs would join here once PEFs hold them)
PROGRAM_ROLES = {
    "step": "the whole step, fused",
    "fwd": "forward",
    "bckwd": "backward",
    "gradnorm": "gradient norm (clipping)",
    "opt": "optimizer update",
    "grads": "forward and backward (gradient accumulation, data parallel)",
    "update": "gradnorm and opt (gradient accumulation, data parallel)",
}


@dataclass
class Program:
    name: str
    role: str
    node_count: int
    inputs: list[str]
    outputs: list[str]
    binary_bytes: int
    text: str


@dataclass
class Graph:
    """One graph of the PEF (`train` or `inference`)."""

    kind: str
    sections: list[str]
    node_count: int
    fingerprint: str
    loss_names: list[str]
    hyper_defaults: dict[str, float]
    programs: list[Program]
    tensors: list[dict[str, Any]]


@dataclass
class Facts:
    path: str
    name: str
    created: str
    producer: dict[str, str]
    backend: str
    device: str
    inference_only: bool
    graphs: list[Graph]
    graph_text: str
    compile: dict[str, Any] = field(default_factory=dict)
    trust: list[str] = field(default_factory=list)


def read_facts(pef: PefFile) -> Facts:
    m = pef.manifest
    target = m.get("target", {})
    return Facts(
        path=pef.path,
        name=m["name"],
        created=m["created"],
        producer=dict(m["producer"]),
        backend=target.get("backend", "reference"),
        device=target.get("device", "cpu"),
        inference_only=bool(m["inference"]),
        graphs=[_graph(pef, kind) for kind in sorted(pef.kinds, key=_graph_order)],
        graph_text=pef.members["graph.txt"].decode(errors="replace"),
        compile=compile_facts(pef),
        trust=[line.strip() for line in trust_lines(pef)],
    )


def _graph(pef: PefFile, kind: str) -> Graph:
    entry = pef.entry(kind)
    names = sorted(entry["programs"], key=lambda n: PROGRAM_ORDER.index(n) if n in PROGRAM_ORDER else 99)
    programs = [_program(pef, kind, name) for name in names]
    tensors = [dict(e, io="input", bytes=tensor_bytes(e)) for e in entry["inputs"]]
    tensors += [dict(e, io="output", bytes=tensor_bytes(e)) for e in entry["outputs"]]
    return Graph(
        kind,
        list(entry["sections"]),
        int(entry["node_count"]),
        entry["fingerprint"],
        list(entry["loss_names"]),
        dict(entry["hyper_defaults"]),
        programs,
        tensors,
    )


def _program(pef: PefFile, kind: str, name: str) -> Program:
    program = pef.program(kind, name)
    nodes = [n for n in program.module.graph.nodes if n.op not in ("placeholder", "output")]
    binary = pef.entry(kind)["programs"][name].get("binary")
    size = len(pef.members[binary]) if binary else 0
    role = PROGRAM_ROLES.get(name, name)
    return Program(name, role, len(nodes), program.inputs, program.outputs, size, program.as_text())


def tensor_bytes(entry: dict[str, Any]) -> int:
    return math.prod(entry["shape"]) * dtype_from_name(entry["dtype"]).itemsize


def compile_facts(pef: PefFile) -> dict[str, Any]:
    """Backend, target ISA, threads, cache hits and misses (from the compile log), rewrites applied,
    settings baked in at trace time, options that had no effect."""
    m = pef.manifest
    meta = m.get("pef_metadata", {})
    args = m.get("compile_args", {})
    main = pef.entry("train" if "train" in pef.kinds else pef.kinds[0])
    log = compile_log(pef.path)
    return {
        "backend": m.get("target", {}).get("backend", "reference"),
        "target": _binary_target(pef),
        "threads": meta.get("threads"),
        "cache": [line for line in log if re.search(r"\bcache (hit|miss|off)\b", line)],
        "log_found": bool(log),
        "rewrites": rewrites_applied(pef) if m.get("target", {}).get("backend") == "inductor" else {},
        "rewrites_off": meta.get("rewrites_off", []),
        "baked": list(main.get("baked", [])),
        "no_effect": ineffective_arguments(_Namespace(args)),
        "args": args,
    }


def compile_log(pef_path: str) -> list[str]:
    """The lines of `<name>.compile.log` beside the PEF, where compile left it ([] if absent)."""
    path = os.path.splitext(pef_path)[0] + ".compile.log"
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().splitlines()
    except OSError:
        return []


def _binary_target(pef: PefFile) -> str | None:
    """The target (device and CPU vector ISA) the first compiled binary records, if any."""
    if not pef.binary_members or pef.manifest.get("target", {}).get("backend") != "inductor":
        return None
    from sambaflow.backends.inductor.package import TARGET_KEY, package_metadata

    return package_metadata(pef.members[pef.binary_members[0]]).get(TARGET_KEY)


def rewrites_applied(pef: PefFile) -> dict[str, list[str]]:
    """For each inductor rewrite, the programs whose graph it changes (none: it found nothing)."""
    applied: dict[str, list[str]] = {name: [] for name in rewrites.REWRITES}
    for kind in pef.kinds:
        for name in pef.entry(kind)["programs"]:
            program = pef.program(kind, name)
            for rewrite in rewrites.REWRITES:
                if _changes(rewrite, program):
                    applied[rewrite].append(f"{kind}/{name}")
    return applied


def _changes(rewrite: str, program: SectionProgram) -> bool:
    module = with_shapes(copy.deepcopy(program.module))  # rewrites look at dtypes and shapes
    before = [(n.target, n.args) for n in module.graph.nodes]
    rewrites.apply_rewrite(rewrite, module.graph)
    return [(n.target, n.args) for n in module.graph.nodes] != before


def with_shapes(module: fx.GraphModule) -> fx.GraphModule:
    """`module` with every node's shape and dtype (`meta['val']`): a PEF records its inputs' only.
    Propagated on fake tensors: nothing is computed."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fakes = [
            torch.empty_strided(v.shape, v.stride(), dtype=v.dtype)
            for v in (p.meta["val"] for p in placeholders)
        ]
    FakeTensorProp(module, mode).propagate_dont_convert_inputs(*fakes)
    return module


class _Namespace:
    """The recorded compile arguments as `ineffective_arguments` reads them (absent: default)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def _graph_order(kind: str) -> tuple[int, str]:
    """Training first, then inference, then an app's named graphs (prompt, token) in name order."""
    known = ("train", "inference")
    return (known.index(kind), "") if kind in known else (len(known), kind)

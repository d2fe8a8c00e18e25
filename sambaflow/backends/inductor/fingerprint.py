"""What a compiled package depends on (graph, input layouts, torch, target), as readable parts and a digest."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sambaflow.backends.inductor.probe import target
from sambaflow.backends.rewrites import rewrites_off
from sambaflow.errors import SambaBackendError
from sambaflow.passes.sections import SectionProgram

#: bump when what `export` writes changes (the package layout or metadata); changes to the passes
#: are caught by `compiler_source_hash` in the cache key
FORMAT = "sambaflow-inductor-3"


def fingerprint_parts(program: SectionProgram, for_target: str | None = None) -> dict[str, Any]:
    """Everything a compiled binary depends on, readable (the cache explains misses with it).

    `for_target`: the target a package says it was built for (to check a package on another machine).
    """
    return {
        "graph": _graph_hash(program.module),
        "inputs": [f"{name} {_layout_text(v)}" for name, v in zip(program.inputs, input_values(program))],
        "outputs": list(program.outputs),
        "torch": torch.__version__,
        "target": for_target or target(_device_of(program)),
        "format": FORMAT,
    }


def fingerprint(program: SectionProgram, for_target: str | None = None) -> str:
    return digest(fingerprint_parts(program, for_target))


def compiler_source_hash() -> str:
    """What our side of a compile depends on: this backend, its ATen rewrites and Inductor pass
    (not the memory pool, which only serves runs), and the rewrites $SAMBAFLOW_REWRITES_OFF omits."""
    off = rewrites_off()
    return _source_hash() + (f"-without-{'-'.join(off)}" if off else "")


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    package = Path(__file__).parent
    sources = sorted(p for p in package.glob("*.py") if p.name != "pool.py") + [
        package.parent / n for n in ("rewrites.py", "inductor_passes.py")
    ]
    hasher = hashlib.sha256()
    for path in sources:
        hasher.update(path.name.encode() + b"\0" + path.read_bytes())
    return hasher.hexdigest()[:16]


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _graph_hash(module: torch.fx.GraphModule) -> str:
    hasher = hashlib.sha256(module.code.encode())
    for node in module.graph.nodes:
        if node.op == "get_attr":  # constants are not in the code text
            value = getattr(module, node.target)
            if isinstance(value, torch.Tensor):
                hasher.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:32]


def input_values(program: SectionProgram) -> list[torch.Tensor]:
    """The example value (shape, strides, dtype) of every input, from the traced graph."""
    placeholders = [n for n in program.module.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("val") for n in placeholders]
    missing = [name for name, v in zip(program.inputs, values) if not isinstance(v, torch.Tensor)]
    if missing or len(values) != len(program.inputs):
        raise SambaBackendError(
            f"inductor: program '{program.name}' has inputs without shape metadata {missing}; "
            "compile graphs traced by sambaflow.trace (make_fx records it), or use backend 'reference'"
        )
    return values


def _layout_text(value: torch.Tensor) -> str:
    dtype = str(value.dtype).replace("torch.", "")
    return f"{list(value.shape)} stride {list(value.stride())} {dtype}"


def _device_of(program: SectionProgram) -> str:
    # Graphs read back from a PEF carry storage-less ("meta") layouts and the device by name.
    placeholders = [n for n in program.module.graph.nodes if n.op == "placeholder"]
    devices = {n.meta.get("device") or n.meta["val"].device.type for n in placeholders if "val" in n.meta}
    return "cuda" if "cuda" in devices else "cpu"

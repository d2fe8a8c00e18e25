"""fx graphs of ATen ops -> JSON, with no pickle; `pef/decode.py` reads them back, accepting only data.

A node's target is written as its qualified name (`aten.addmm.default`, `operator.getitem`); on
load it is resolved only to ATen/prims ops and the operators in `OPERATORS`, so a PEF can never
make the loader call arbitrary Python.
"""

from __future__ import annotations

import base64
import math
import operator
from typing import Any

import torch
from torch import fx, nn

from sambaflow.errors import SambaPefError

#: The only call targets besides ATen/prims ops that a PEF graph may hold.
OPERATORS = {"operator.getitem": operator.getitem}
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SambaPefError(f"unknown dtype '{name}' in PEF; known: {sorted(DTYPES)}")
    return DTYPES[name]


# --- encoding -------------------------------------------------------------------------------------
def encode_graph(module: fx.GraphModule) -> dict[str, Any]:
    """JSON-ready description of `module`'s graph and its tensor constants."""
    nodes = [_encode_node(node) for node in module.graph.nodes]
    constants = {
        n.target: _encode_tensor(_attr(module, n.target)) for n in module.graph.nodes if n.op == "get_attr"
    }
    return {"nodes": nodes, "constants": constants}


def _attr(module: nn.Module, target: str) -> torch.Tensor:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _encode_node(node: fx.Node) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": node.name,
        "op": node.op,
        "target": _target_name(node),
        "args": _encode(node.args),
        "kwargs": _encode(dict(node.kwargs)),
    }
    if "section" in node.meta:
        entry["section"] = node.meta["section"]
    value = node.meta.get("val")
    if node.op == "placeholder" and isinstance(value, torch.Tensor):
        # Backends check binaries against the input layouts they were compiled for.
        entry["val"] = {
            "shape": list(value.shape),
            "stride": list(value.stride()),
            "dtype": dtype_name(value.dtype),
            "device": value.device.type,
        }
    return entry


def _target_name(node: fx.Node) -> str:
    if node.op in ("placeholder", "output", "get_attr"):
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        return (
            f"{node.target.namespace}.{node.target._schema.name.split('::')[-1]}.{node.target._overloadname}"
        )
    name = f"{node.target.__module__.replace('_operator', 'operator')}.{node.target.__name__}"
    if name not in OPERATORS:
        raise SambaPefError(f"cannot store graph node '{node.name}': target {node.target} is not an ATen op")
    return name


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):  # fx's immutable_list is a list
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    return _encode_torch_value(value)


def _encode_torch_value(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"dtype": dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise SambaPefError(f"cannot store graph argument {value!r} of type {type(value).__name__} in a PEF")


def _encode_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    data = tensor.detach().cpu().contiguous()
    raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""  # 0-d too
    return {
        "dtype": dtype_name(data.dtype),
        "shape": list(data.shape),
        "data": base64.b64encode(raw).decode(),
    }


__all__ = ["encode_graph", "dtype_name", "dtype_from_name", "OPERATORS"]

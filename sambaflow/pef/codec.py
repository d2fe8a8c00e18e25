"""fx graphs of ATen ops <-> JSON, with no pickle and no code execution on load.

A node's target is written as its qualified name (`aten.addmm.default`, `operator.getitem`) and
resolved on load only within `torch.ops` namespaces and a short list of operators, so a PEF can
never make the loader call arbitrary Python.
"""

from __future__ import annotations

import base64
import math
import operator
from typing import Any

import torch
from torch import fx, nn

from sambaflow.errors import SambaPefError

_OPERATORS = {"operator.getitem": operator.getitem}
_DTYPES = {
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
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_FORMATS = {
    str(f).removeprefix("torch."): f
    for f in (torch.contiguous_format, torch.channels_last, torch.preserve_format, torch.channels_last_3d)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise SambaPefError(f"unknown dtype '{name}' in PEF; known: {sorted(_DTYPES)}")
    return _DTYPES[name]


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
    if name not in _OPERATORS:
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
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return {
        "dtype": dtype_name(data.dtype),
        "shape": list(data.shape),
        "data": base64.b64encode(raw).decode(),
    }


# --- decoding -------------------------------------------------------------------------------------
def decode_graph(encoded: dict[str, Any]) -> fx.GraphModule:
    """Rebuild the GraphModule; only ATen ops and getitem can appear as targets."""
    try:
        return _decode_graph(encoded)
    except SambaPefError:
        raise
    except Exception as exc:  # malformed JSON structure
        raise SambaPefError(
            f"the PEF's graph description is malformed ({type(exc).__name__}: {exc})"
        ) from None


def _decode_graph(encoded: dict[str, Any]) -> fx.GraphModule:
    root = nn.Module()
    for name, tensor in encoded.get("constants", {}).items():
        root.register_buffer(name, _decode_tensor(tensor))
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in encoded["nodes"]:
        env[entry["name"]] = _decode_node(graph, entry, env)
    return fx.GraphModule(root, graph)


def _decode_node(graph: fx.Graph, entry: dict[str, Any], env: dict[str, fx.Node]) -> fx.Node:
    op = entry["op"]
    if op == "placeholder":
        node = graph.placeholder(entry["target"])
    elif op == "get_attr":
        node = graph.get_attr(entry["target"])
    elif op == "output":
        node = graph.output(_decode(entry["args"], env)[0])
    elif op == "call_function":
        node = graph.call_function(
            resolve_target(entry["target"]), _decode(entry["args"], env), _decode(entry["kwargs"], env)
        )
    else:
        raise SambaPefError(f"graph node '{entry.get('name')}' has unsupported kind '{op}'")
    node.name = entry["name"]
    if "section" in entry:
        node.meta["section"] = entry["section"]
    if "val" in entry:
        node.meta["val"], node.meta["device"] = _layout(entry["val"])
    return node


def _layout(val: dict[str, Any]) -> tuple[torch.Tensor, str]:
    """A storage-less tensor with the recorded layout, and the device it was on."""
    tensor = torch.empty_strided(
        val["shape"], val["stride"], dtype=dtype_from_name(val["dtype"]), device="meta"
    )
    return tensor, str(val["device"])


def resolve_target(name: str) -> Any:
    if name in _OPERATORS:
        return _OPERATORS[name]
    namespace, _, rest = name.partition(".")
    packet, _, overload = rest.partition(".")
    if namespace not in ("aten", "prims") or not packet or not overload:
        raise SambaPefError(f"graph target '{name}' is not an ATen op; refusing to load it")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except (AttributeError, RuntimeError):
        raise SambaPefError(
            f"graph op '{name}' does not exist in torch {torch.__version__}: "
            "recompile the PEF with this torch version"
        ) from None


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, dict):
        if len(value) != 1:
            raise SambaPefError(f"malformed value {value!r} in the PEF's graph")
        ((kind, inner),) = value.items()
        return _decode_tagged(kind, inner, env)
    return value


def _decode_tagged(kind: str, inner: Any, env: dict[str, fx.Node]) -> Any:
    if kind == "node":
        return env[inner]
    if kind in ("list", "tuple"):
        items = [_decode(v, env) for v in inner]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _decode(v, env) for k, v in inner.items()}
    simple = {
        "float": float,
        "dtype": dtype_from_name,
        "device": torch.device,
        "layout": _LAYOUTS.__getitem__,
        "memory_format": _FORMATS.__getitem__,
    }
    if kind not in simple:
        raise SambaPefError(f"unknown value tag '{kind}' in the PEF's graph")
    return simple[kind](inner)


def _decode_tensor(encoded: dict[str, Any]) -> torch.Tensor:
    dtype = dtype_from_name(encoded["dtype"])
    raw = bytearray(base64.b64decode(encoded["data"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(encoded["shape"]).clone()


__all__ = ["encode_graph", "decode_graph", "dtype_name", "dtype_from_name"]

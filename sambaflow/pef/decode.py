"""JSON graph -> fx graph, accepting only data.

Every string that torch.fx would paste into the generated Python source (node names, placeholder
and get_attr targets, keyword names) must be a plain identifier; every call target must resolve to
a `torch._ops.OpOverload` in `torch.ops.aten` / `torch.ops.prims` or to `operator.getitem`; every
node reference must name an earlier node. Anything else is a `SambaPefError` naming the member and
the node, raised before fx generates or runs any code.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import keyword
import math
import operator
from typing import Any

import torch
from torch import fx, nn

from sambaflow.errors import SambaPefError
from sambaflow.pef.codec import OPERATORS, dtype_from_name

NAMESPACES = ("aten", "prims")
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_FORMATS = {
    str(f).removeprefix("torch."): f
    for f in (torch.contiguous_format, torch.channels_last, torch.preserve_format, torch.channels_last_3d)
}
# Names the generated `forward(self, ...)` itself uses.
_RESERVED = {"self", "torch", "operator", "inf", "nan", "builtins", "NoneType", "device"}
MAX_DEPTH = 32
_FOREIGN = "The PEF was edited or not written by sambaflow: recompile it from source"
MAX_NODES = 1_000_000
MAX_RANK = 64
MAX_CONSTANT_BYTES = 1 << 30


def bad_graph(where: str, problem: str) -> SambaPefError:
    return SambaPefError(
        f"{where}: {problem}. The PEF is damaged or was edited by hand: recompile it "
        "(python app.py compile ...)"
    )


def check_identifier(
    value: Any, where: str, what: str, allow_builtins: bool = True, keyword_arg: bool = False
) -> str:
    """`value` as a Python identifier fx can paste into source unchanged, or SambaPefError.

    Variable names must also not shadow what the generated code uses; keyword names (`device=`)
    only need to be identifiers that are not Python keywords or dunder names.
    """
    if not isinstance(value, str) or not value.isidentifier() or not value.isascii():
        raise bad_graph(where, f"{what} {value!r} is not a plain Python identifier")
    dunder = value.startswith("__") and value.endswith("__")
    builtin = not allow_builtins and hasattr(builtins, value)
    reserved = value in _RESERVED and not keyword_arg
    if keyword.iskeyword(value) or dunder or builtin or reserved:
        raise bad_graph(where, f"{what} {value!r} is a reserved Python name")
    return value


def resolve_target(name: Any) -> Any:
    """The op a call node names: an ATen/prims OpOverload or operator.getitem, nothing else."""
    if isinstance(name, str) and name in OPERATORS:
        return OPERATORS[name]
    parts = name.split(".") if isinstance(name, str) else []
    plain = all(p.isidentifier() and not p.startswith("__") for p in parts)
    if len(parts) != 3 or parts[0] not in NAMESPACES or not plain:
        raise SambaPefError(f"graph target {name!r} is not an ATen op; refusing to load it. {_FOREIGN}")
    try:
        packet = getattr(getattr(torch.ops, parts[0]), parts[1])
        op = getattr(packet, parts[2])
    except Exception:  # torch raises AttributeError or RuntimeError for unknown ops
        raise SambaPefError(
            f"graph op '{name}' does not exist in torch {torch.__version__}: "
            "recompile the PEF with this torch version"
        ) from None
    if not isinstance(packet, torch._ops.OpOverloadPacket) or not isinstance(op, torch._ops.OpOverload):
        raise SambaPefError(f"graph target {name!r} is not an ATen op; refusing to load it. {_FOREIGN}")
    return op


def field(entry: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in entry:
        raise bad_graph(where, f"field '{key}' is missing")
    value = entry[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise bad_graph(where, f"field '{key}' is {type(value).__name__}, not {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


# --- the graph ------------------------------------------------------------------------------------
def decode_graph(encoded: Any, where: str = "the PEF's graph") -> fx.GraphModule:
    """Rebuild the GraphModule after checking every field; only data is accepted."""
    if not isinstance(encoded, dict):
        raise bad_graph(where, f"the graph is a JSON {type(encoded).__name__}, not an object")
    nodes = field(encoded, "nodes", list, where)
    if len(nodes) > MAX_NODES:
        raise bad_graph(where, f"{len(nodes)} nodes is more than the limit of {MAX_NODES}")
    root = _constants(encoded.get("constants", {}), where)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for index, entry in enumerate(nodes):
        _decode_node(graph, entry, env, where, index, root)
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(outputs) != 1 or outputs[0] is not list(graph.nodes)[-1]:
        raise bad_graph(where, "the graph must end in exactly one output node")
    try:  # every string fx pastes into source was checked above; this only catches what fx rejects
        return fx.GraphModule(root, graph)
    except Exception as exc:
        raise bad_graph(where, f"torch.fx cannot build it ({type(exc).__name__}: {exc})") from None


def _constants(encoded: Any, where: str) -> nn.Module:
    if not isinstance(encoded, dict):
        raise bad_graph(where, "field 'constants' is not an object")
    root = nn.Module()
    total = 0
    for name, tensor in encoded.items():
        at = f"{where}: constant '{name}'"
        check_identifier(name, at, "constant name")
        value = decode_tensor(tensor, at)
        total += value.numel() * value.element_size()
        if total > MAX_CONSTANT_BYTES:
            raise bad_graph(at, f"constants exceed the limit of {MAX_CONSTANT_BYTES} bytes")
        root.register_buffer(name, value)
    return root


def _decode_node(
    graph: fx.Graph, entry: Any, env: dict[str, fx.Node], where: str, index: int, root: nn.Module
) -> None:
    if not isinstance(entry, dict):
        raise bad_graph(where, f"node #{index} is not a JSON object")
    at = f"{where}: node #{index}"
    name = check_identifier(field(entry, "name", str, at), at, "node name", allow_builtins=False)
    at = f"{where}: node '{name}'"
    if name in env:
        raise bad_graph(at, "the node name is used twice")
    node = _make_node(graph, entry, env, at, root)
    node.name = name
    if "section" in entry:
        node.meta["section"] = field(entry, "section", str, at)
    if "val" in entry:
        node.meta["val"], node.meta["device"] = _layout(field(entry, "val", dict, at), at)
    env[name] = node


def _make_node(
    graph: fx.Graph, entry: dict[str, Any], env: dict[str, fx.Node], at: str, root: nn.Module
) -> fx.Node:
    op = field(entry, "op", str, at)
    if op == "placeholder":
        return graph.placeholder(check_identifier(field(entry, "target", str, at), at, "placeholder target"))
    if op == "get_attr":
        target = check_identifier(field(entry, "target", str, at), at, "constant target")
        if not hasattr(root, target):
            raise bad_graph(at, f"it reads constant '{target}', which the graph does not hold")
        return graph.get_attr(target)
    if op == "output":
        args = decode_value(field(entry, "args", dict, at), env, at)
        if not isinstance(args, tuple) or len(args) != 1:
            raise bad_graph(at, "the output node's args are not a 1-tuple")
        return graph.output(args[0])
    if op == "call_function":
        target = _target(entry, at)
        args = decode_value(field(entry, "args", dict, at), env, at)
        kwargs = decode_value(field(entry, "kwargs", dict, at), env, at)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise bad_graph(at, "args must be a tuple and kwargs an object")
        _check_call(target, args, kwargs, at)
        return graph.call_function(target, args, kwargs)
    raise bad_graph(at, f"unsupported node kind {op!r}")


def _check_call(target: Any, args: tuple, kwargs: dict[str, Any], at: str) -> None:
    """Arguments that fit the op's schema (fx formats them into source by position and name)."""
    for key in kwargs:
        check_identifier(key, at, "keyword argument", keyword_arg=True)
    if target is operator.getitem:
        fits = len(args) == 2 and not kwargs
    else:
        names = [a.name for a in target._schema.arguments]
        fits = len(args) <= len(names) and set(kwargs) <= set(names[len(args) :])
    if not fits:
        raise bad_graph(at, f"its arguments do not fit {getattr(target, '__name__', target)}'s signature")


def _target(entry: dict[str, Any], at: str) -> Any:
    try:
        return resolve_target(field(entry, "target", str, at))
    except SambaPefError as exc:
        raise SambaPefError(f"{at}: {exc}") from None


def _layout(val: dict[str, Any], at: str) -> tuple[torch.Tensor, str]:
    """A storage-less tensor with the recorded layout, and the device it was on."""
    shape, stride = _ints(field(val, "shape", list, at), at), _ints(field(val, "stride", list, at), at)
    device = field(val, "device", str, at)
    if len(shape) != len(stride) or not device.isidentifier():
        raise bad_graph(at, "the recorded input layout is inconsistent")
    dtype = _dtype(field(val, "dtype", str, at), at)
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta"), device


def _ints(values: list[Any], at: str) -> list[int]:
    if len(values) > MAX_RANK or not all(type(v) is int and 0 <= v < 1 << 62 for v in values):
        raise bad_graph(at, f"{values!r} is not a list of at most {MAX_RANK} sizes")
    return values


def _dtype(name: str, at: str) -> torch.dtype:
    try:
        return dtype_from_name(name)
    except SambaPefError as exc:
        raise SambaPefError(f"{at}: {exc}; recompile the PEF") from None


# --- values ---------------------------------------------------------------------------------------
def decode_value(value: Any, env: dict[str, fx.Node], at: str, depth: int = 0) -> Any:
    """One encoded argument: a JSON scalar, or a one-key tagged object."""
    if depth > MAX_DEPTH:
        raise bad_graph(at, f"an argument is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise bad_graph(at, f"malformed argument {_short(value)}")
    ((kind, inner),) = value.items()
    if kind in ("list", "tuple"):
        if not isinstance(inner, list):
            raise bad_graph(at, f"a '{kind}' argument holds {type(inner).__name__}, not a list")
        items = [decode_value(v, env, at, depth + 1) for v in inner]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        if not isinstance(inner, dict):
            raise bad_graph(at, "a 'dict' argument does not hold an object")
        return {k: decode_value(v, env, at, depth + 1) for k, v in inner.items()}
    return _decode_leaf(kind, inner, env, at)


def _decode_leaf(kind: str, inner: Any, env: dict[str, fx.Node], at: str) -> Any:
    if not isinstance(inner, str):
        raise bad_graph(at, f"a '{kind}' argument holds {type(inner).__name__}, not text")
    if kind == "node":
        if inner not in env:
            raise bad_graph(at, f"it uses node '{inner}', which no earlier node defines")
        return env[inner]
    if kind == "float":
        if inner not in ("inf", "-inf", "nan"):
            raise bad_graph(at, f"float {inner!r} is not inf, -inf or nan")
        return float(inner)
    try:
        return _LEAVES[kind](inner)
    except (KeyError, RuntimeError, SambaPefError):
        raise bad_graph(at, f"unknown argument {{{kind!r}: {inner!r}}}") from None


def _device(text: str) -> torch.device:
    if len(text) > 32:
        raise KeyError(text)
    return torch.device(text)


_LEAVES = {
    "dtype": dtype_from_name,
    "device": _device,
    "layout": _LAYOUTS.__getitem__,
    "memory_format": _FORMATS.__getitem__,
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def decode_tensor(encoded: Any, at: str) -> torch.Tensor:
    if not isinstance(encoded, dict):
        raise bad_graph(at, "the tensor is not a JSON object")
    dtype = _dtype(field(encoded, "dtype", str, at), at)
    shape = _ints(field(encoded, "shape", list, at), at)
    try:
        raw = bytearray(base64.b64decode(field(encoded, "data", str, at), validate=True))
    except (binascii.Error, ValueError):
        raise bad_graph(at, "the tensor's data is not base64") from None
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise bad_graph(at, f"the tensor holds {len(raw)} bytes; shape {shape} of {dtype} needs {expected}")
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape).clone()


__all__ = ["decode_graph", "resolve_target", "check_identifier", "decode_tensor", "OPERATORS"]

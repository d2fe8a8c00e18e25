"""The manifest's schema: every field, its type and allowed values, checked before anything is read.

A malformed manifest is a `SambaPefError` naming the field (`graphs.train.programs.opt.inputs[3]`),
never an AttributeError, KeyError or TypeError later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sambaflow.errors import SambaPefError
from sambaflow.passes.sections import SPLIT_AT_GRADIENTS
from sambaflow.pef.codec import DTYPES
from sambaflow.trace.graph import SECTION_ORDER

INPUT_ROLES = ("input", "param", "buffer", "state", "hyper", "output_grad")
OUTPUT_ROLES = ("output", "grad", "input_grad", "param_update", "state_update")
PROGRAM_NAMES = ("step", *SECTION_ORDER, *(name for name, _ in SPLIT_AT_GRADIENTS))
MAX_LIST = 1_000_000
#: graph names are also folder names inside the PEF
GRAPH_NAME = r"[A-Za-z][A-Za-z0-9_-]{0,63}"


@dataclass(frozen=True)
class Optional:
    spec: Any


@dataclass(frozen=True)
class MapOf:
    """An object whose keys pass `key` (a OneOf or None: any text) and whose values pass `value`."""

    value: Any
    key: Any = None


@dataclass(frozen=True)
class OneOf:
    values: tuple[Any, ...]


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class Matching:
    """Text that matches `pattern` whole (`what` says what it is, for the message)."""

    pattern: str
    what: str

    @property
    def values(self) -> Matching:  # MapOf keys are checked with `key in spec.key.values`
        return self

    def __contains__(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.pattern, value) is not None

    def __iter__(self) -> Any:
        return iter([self.what])


NUMBER = (int, float)
TENSOR = {
    "name": str,
    "role": OneOf(INPUT_ROLES + OUTPUT_ROLES),
    "shape": ListOf(int),
    "dtype": OneOf(tuple(DTYPES)),
    "batch_dim": Optional(int),
}
PROGRAM = {"inputs": ListOf(str), "outputs": ListOf(str), "graph": str, "binary": Optional(str)}
GRAPH = {
    "inputs": ListOf(TENSOR),
    "outputs": ListOf(TENSOR),
    "sections": ListOf(OneOf(SECTION_ORDER)),
    "loss_names": ListOf(str),
    "hyper_defaults": MapOf(NUMBER),
    "baked": ListOf(str),
    "fingerprint": str,
    "node_count": int,
    "programs": MapOf(PROGRAM, OneOf(PROGRAM_NAMES)),
}
MANIFEST = {
    "format": str,
    "format_version": int,
    "manifest_sha256": str,
    "name": str,
    "created": str,
    "producer": {"sambaflow": str, "torch": str, "python": str},
    "target": {"backend": OneOf(("reference", "inductor")), "device": str},
    "compile_args": dict,
    "pef_metadata": dict,
    "inference": bool,
    "init_output_grads": bool,
    "precision": str,
    "app_dir": Optional(str),
    # `train` and `inference`, or an app's own graph names (`prompt` and `token` for cached generation)
    "graphs": MapOf(GRAPH, Matching(GRAPH_NAME, "a graph name (letters, digits, _ and -)")),
    "members": MapOf({"sha256": str, "size": int}),
}


def check_manifest(manifest: Any, path: str) -> None:
    """Raise SambaPefError naming the first field of `manifest` that breaks the schema."""
    problem = _problem(manifest, MANIFEST, "")
    if problem is not None:
        where, what = problem
        raise SambaPefError(
            f"'{path}': manifest field '{where or '(top level)'}' {what}. The PEF is damaged or "
            "was edited: recompile it"
        )


def _problem(value: Any, spec: Any, where: str) -> tuple[str, str] | None:
    if isinstance(spec, Optional):
        return None if value is None else _problem(value, spec.spec, where)
    if isinstance(spec, dict):
        return _object_problem(value, spec, where)
    if isinstance(spec, MapOf):
        return _map_problem(value, spec, where)
    if isinstance(spec, ListOf):
        if not isinstance(value, list) or len(value) > MAX_LIST:
            return where, f"is {_type(value)}, not a list"
        return _first(_problem(v, spec.item, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(spec, OneOf):
        return (
            None
            if _hashable(value) and value in spec.values
            else (where, f"is {value!r}, not one of {list(spec.values)}")
        )
    if isinstance(value, bool) and spec is not bool:
        return where, f"is a bool, not {_name(spec)}"
    return None if isinstance(value, spec) else (where, f"is {_type(value)}, not {_name(spec)}")


def _object_problem(value: Any, spec: dict[str, Any], where: str) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        return where, f"is {_type(value)}, not an object"
    prefix = f"{where}." if where else ""
    missing = [key for key in spec if key not in value]
    if missing:
        return prefix + missing[0], "is missing"
    unknown = sorted(set(value) - set(spec))
    if unknown:
        return prefix + unknown[0], "is not a field of this PEF format version"
    return _first(_problem(value[key], sub, prefix + key) for key, sub in spec.items())


def _map_problem(value: Any, spec: MapOf, where: str) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        return where, f"is {_type(value)}, not an object"
    for key, item in value.items():
        if spec.key is not None and key not in spec.key.values:
            expected = spec.key.what if isinstance(spec.key, Matching) else f"one of {list(spec.key.values)}"
            return f"{where}.{key}", f"is not {expected}"
        problem = _problem(item, spec.value, f"{where}.{key}")
        if problem is not None:
            return problem
    return None


def _first(problems: Any) -> tuple[str, str] | None:
    return next((p for p in problems if p is not None), None)


def _hashable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _type(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _name(spec: Any) -> str:
    kinds = spec if isinstance(spec, tuple) else (spec,)
    return " or ".join({dict: "an object", list: "a list"}.get(k, f"a {k.__name__}") for k in kinds)

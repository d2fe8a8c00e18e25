"""Compiler directives: hints a SambaFlow app gives the compiler, with no effect on numerics.

`op_fusion(module, name)` asks the compiler to fuse the ops of `module` into one group called
`name` (SambaFlow's GPT-2 tutorial: `op_fusion(layers, "Encoder")`). Here it is recorded, on the
module (`module.sn_op_fusion`) and in a registry read by the compile report (`fusion_directives()`,
`fusion_groups(model)`); the graph and its results do not change.

`op_fusion(func_name=..., heuristic=..., plugins=..., ...)` (SambaNova's modelzoo) is the other
form: a context manager around the code whose ops form the group (a "hyperfunction"); it may be
kept and entered again and again. `sdpa_directives({...})` likewise wraps an attention call. Both
are recorded (`fusion_scopes()`) and change nothing: plugins and heuristics are RDU compiler parts.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from torch import nn

from sambaflow.errors import SambaArgumentError

M = TypeVar("M", nn.Module, Sequence[nn.Module])

# module -> fusion name, in the order the directives were given; weak so directives keep no model alive
_DIRECTIVES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def op_fusion(module: M | None = None, name: str | None = None, **hints: Any) -> Any:
    """Mark `module` (or each module of a list/tuple of them) as one fused group `name`; return it.

    Without a module, `op_fusion(func_name=..., **hints)` returns a `FusionScope`: a re-enterable
    context manager marking the ops traced inside it (SambaNova's modelzoo form)."""
    if module is None:
        return FusionScope(hints.pop("func_name", name), hints)
    if hints:
        raise SambaArgumentError(
            f"op_fusion: keyword hints {sorted(hints)} go with the context-manager form "
            "`with op_fusion(func_name=..., ...)`, not with a module"
        )
    if not isinstance(name, str) or not name.strip():
        raise SambaArgumentError(f"op_fusion: name must be a non-empty string, got {name!r}")
    for each in _modules_of(module):
        each.sn_op_fusion = name
        _DIRECTIVES[each] = name
    return module


def fusion_directives() -> list[tuple[str, nn.Module]]:
    """Every live `(name, module)` given to `op_fusion`, in the order they were given."""
    return [(name, module) for module, name in _DIRECTIVES.items()]


def fusion_groups(model: nn.Module) -> dict[str, list[str]]:
    """Fusion name -> module paths inside `model` marked with it (`""` is `model` itself)."""
    groups: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        name = getattr(module, "sn_op_fusion", None)
        if name is not None:
            groups.setdefault(name, []).append(path)
    return groups


def _modules_of(module: object) -> list[nn.Module]:
    if isinstance(module, nn.Module):
        return [module]
    if isinstance(module, (list, tuple)) and module and all(isinstance(m, nn.Module) for m in module):
        return list(module)
    raise SambaArgumentError(
        f"op_fusion: expected an nn.Module (or a non-empty list of them) to fuse, got "
        f"{type(module).__name__}; pass the layer whose ops form the group, e.g. op_fusion(block, 'Encoder')"
    )


class FusionScope:
    """`with op_fusion(func_name=..., heuristic=..., plugins=..., user_annotated=...)`: a named group
    of the ops traced inside. The hints are recorded (`fusion_scopes()`) and change nothing here."""

    def __init__(self, func_name: str | None, hints: dict[str, Any]) -> None:
        if func_name is not None and not isinstance(func_name, str):
            raise SambaArgumentError(f"op_fusion: func_name must be a string, got {func_name!r}")
        self.func_name, self.hints, self.entered = func_name, dict(hints), 0

    def __enter__(self) -> FusionScope:
        self.entered += 1
        _SCOPES.setdefault(self.func_name or "", dict(self.hints))
        _ACTIVE.append(self.func_name or "")
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.pop()

    def __repr__(self) -> str:
        return f"FusionScope({self.func_name!r}, hints={sorted(self.hints)})"


_SCOPES: dict[str, dict[str, Any]] = {}  # func_name -> hints, in the order first entered
_ACTIVE: list[str] = []


def fusion_scopes() -> dict[str, dict[str, Any]]:
    """Every `op_fusion(func_name=...)` scope entered in this process, with its hints."""
    return dict(_SCOPES)


def forget_fusion_scopes() -> None:
    """Forget the scopes entered so far, but those open now. Each compile starts with it
    (app/compile.py), so a process that compiles two unrelated models lists only the second one's
    hints in the second compile log."""
    for name in [n for n in _SCOPES if n not in _ACTIVE]:
        del _SCOPES[name]


def active_fusion_scopes() -> list[str]:
    """The `op_fusion` scopes open now, outermost first."""
    return list(_ACTIVE)


@contextlib.contextmanager
def sdpa_directives(directives: dict[str, Any] | None) -> Iterator[None]:
    """Hints for a scaled-dot-product-attention call (`sdp_mixed_p`, `sdp_block_size`): RDU
    kernel choices, recorded and without effect (mixed-precision attention is the model's own
    torch code)."""
    if directives is not None and not isinstance(directives, dict):
        raise SambaArgumentError(
            f"sdpa_directives: expected a dict of directives, got {type(directives).__name__}"
        )
    _SCOPES.setdefault("sdpa", dict(directives or {}))
    yield

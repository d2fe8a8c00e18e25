"""Compiler directives: hints a SambaFlow app gives the compiler, with no effect on numerics.

`op_fusion(module, name)` asks the compiler to fuse the ops of `module` into one group called
`name` (SambaFlow's GPT-2 tutorial: `op_fusion(layers, "Encoder")`). Here it is recorded, on the
module (`module.sn_op_fusion`) and in a registry read by the compile report (`fusion_directives()`,
`fusion_groups(model)`); the graph and its results do not change.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TypeVar

from torch import nn

from sambaflow.errors import SambaArgumentError

M = TypeVar("M", nn.Module, Sequence[nn.Module])

# module -> fusion name, in the order the directives were given; weak so directives keep no model alive
_DIRECTIVES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def op_fusion(module: M, name: str) -> M:
    """Mark `module` (or each module of a list/tuple of them) as one fused group `name`; return it."""
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

"""Trace a model called with structured arguments: `model(**{'input_ids': t, 'past_key_values':
[(k, v), ...], 'use_cache': True})`, as SambaNova's modelzoo traces its graphs.

`CallStructure.of(inputs)` splits the arguments into named tensor leaves (the graph's inputs,
each named once) and everything else (Python constants, None: fixed at trace time).
`structured_call(model, structure)` is a module whose `forward(**tensors)` (keyword: each input
by its name) rebuilds the arguments and calls `model`; it shares `model`'s parameters, buffers
and submodules (same paths, so the same names) and its class name, so the step tracer traces it
like `model` itself, as a keyword call (which primes cached tensors first, trace/constants.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from sambaflow.errors import SambaTraceError


@dataclass
class CallStructure:
    """How to rebuild a call's arguments from its distinct named tensors."""

    spec: pytree.TreeSpec
    leaves: list[Any]  # constants, or an index into `tensors`
    tensors: list[torch.Tensor]
    keyword: bool

    @staticmethod
    def of(inputs: Any, where: str) -> CallStructure:
        keyword = isinstance(inputs, dict)
        tree = inputs if keyword or isinstance(inputs, (list, tuple)) else (inputs,)
        paths, spec = pytree.tree_flatten_with_path(tree)
        tensors: list[torch.Tensor] = []
        by_name: dict[str, int] = {}
        leaves: list[Any] = []
        for path, value in paths:
            if not isinstance(value, torch.Tensor):
                leaves.append(_Constant(value))
                continue
            leaves.append(_index(value, pytree.keystr(path), by_name, tensors, where))
        return CallStructure(spec, leaves, tensors, keyword)

    def named(self) -> dict[str, torch.Tensor]:
        """The distinct input tensors by name: what the structured call takes as keywords."""
        return {t.sn_name: t for t in self.tensors}

    def rebuild(self, named: dict[str, torch.Tensor]) -> Any:
        names = [t.sn_name for t in self.tensors]
        values = [leaf.value if isinstance(leaf, _Constant) else named[names[leaf]] for leaf in self.leaves]
        return pytree.tree_unflatten(values, self.spec)


@dataclass(frozen=True)
class _Constant:
    value: Any


def _index(
    value: torch.Tensor, key: str, by_name: dict[str, int], tensors: list[torch.Tensor], where: str
) -> int:
    name = getattr(value, "sn_name", None)
    if name is None:
        raise SambaTraceError(
            f"{where}: input {key} is a tensor without a name: make it with "
            "samba.from_torch_tensor(t, name=...) (or samba.randn(..., name=...))"
        )
    if name in by_name:
        if tensors[by_name[name]] is not value:
            raise SambaTraceError(
                f"{where}: two different input tensors are named '{name}' (one at {key}): names must be unique"
            )
        return by_name[name]
    by_name[name] = len(tensors)
    tensors.append(value)
    return by_name[name]


class StructuredCall(nn.Module):
    """`forward(**tensors)` calls `model` with the arguments `structure` rebuilds from them."""

    def __init__(self, model: nn.Module, structure: CallStructure) -> None:
        super().__init__()
        # Share the model's members: named_parameters()/named_buffers() give the model's own paths.
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.training = model.training
        object.__setattr__(self, "_sn_model", model)  # not a submodule: paths stay the model's
        object.__setattr__(self, "_sn_structure", structure)

    def forward(self, **tensors: torch.Tensor) -> Any:
        arguments = self._sn_structure.rebuild(tensors)
        if self._sn_structure.keyword:
            return self._sn_model(**arguments)
        return self._sn_model(*arguments)


def structured_call(model: nn.Module, structure: CallStructure) -> StructuredCall:
    """A `StructuredCall` of `model` whose class bears `model`'s class name (for trace errors)."""
    cls = type(type(model).__name__, (StructuredCall,), {"__module__": type(model).__module__})
    return cls(model, structure)


__all__ = ["CallStructure", "StructuredCall", "structured_call"]

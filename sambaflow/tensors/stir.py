"""SambaFlow's STIR element-wise ops (`sambaflow.samba.functional.stir`) as plain torch code.

`sn_zipmapreduce(func, inputs)` maps `func(attrs, *inputs)` over the inputs broadcast together
(optionally reducing the result over `reduce_dim`). Inside `func`, `sn_iteridx(attrs, dim)` is the
position along `dim` of the broadcast shape, `sn_imm(value, dtype)` a constant and
`sn_select(cond, a, b)` an element-wise choice. On the RDU the function is fused into one
streaming kernel; here it runs (and traces) as the torch ops it is made of, with the same results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sambaflow.errors import SambaArgumentError
from sambaflow.tensors.sambatensor import SambaTensor
from sambaflow.tensors.sntype import as_dtype

_REDUCTIONS = {"ADD": "sum", "SUM": "sum", "MIN": "amin", "MAX": "amax", "MUL": "prod", "PROD": "prod"}


@dataclass(frozen=True)
class ZipMapAttrs:
    """What `func` learns about the iteration: the broadcast shape of the inputs."""

    shape: tuple[int, ...]

    def __getitem__(self, key: str) -> Any:  # SambaFlow passes attrs as a dict
        if key != "shape":
            raise KeyError(key)
        return self.shape


def sn_zipmapreduce(
    func: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    reduce_func: str | None = None,
    reduce_dim: int | Sequence[int] | None = None,
    stoc_accum: bool | None = False,
) -> torch.Tensor:
    """`func(attrs, *inputs)` over the inputs' broadcast shape; reduced over `reduce_dim` (kept as
    size-1 dims) with `reduce_func` ('ADD', 'MIN', 'MAX', 'MUL') if given. `stoc_accum` (stochastic
    rounding of bf16 accumulation on the RDU) has no effect here."""
    tensors = _checked_inputs(inputs)
    attrs = ZipMapAttrs(tuple(torch.broadcast_shapes(*(t.shape for t in tensors))))
    result = func(attrs, *tensors)
    if not isinstance(result, torch.Tensor):
        raise SambaArgumentError(f"sn_zipmapreduce: func returned {type(result).__name__}, not a tensor")
    result = result.expand(attrs.shape) if tuple(result.shape) != attrs.shape else result
    if reduce_func is None:
        if reduce_dim is not None:
            raise SambaArgumentError(
                "sn_zipmapreduce: reduce_dim given without reduce_func ('ADD', 'MIN', 'MAX')"
            )
        return result
    return _reduce(result, reduce_func, reduce_dim)


def _checked_inputs(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    tensors = list(inputs) if isinstance(inputs, (list, tuple)) else None
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise SambaArgumentError(
            f"sn_zipmapreduce: inputs must be a non-empty list of tensors, got {type(inputs).__name__}"
        )
    try:
        torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        shapes = [tuple(t.shape) for t in tensors]
        raise SambaArgumentError(
            f"sn_zipmapreduce: input shapes {shapes} do not broadcast together"
        ) from None
    return [t.torch() if isinstance(t, SambaTensor) else t for t in tensors]


def _reduce(result: torch.Tensor, reduce_func: str, reduce_dim: int | Sequence[int] | None) -> torch.Tensor:
    how = _REDUCTIONS.get(str(reduce_func).upper())
    if how is None:
        raise SambaArgumentError(
            f"sn_zipmapreduce: reduce_func {reduce_func!r} unknown; use one of {sorted(_REDUCTIONS)}"
        )
    dims = list(range(result.dim())) if reduce_dim is None else _dims(reduce_dim, result.dim())
    if how == "prod":
        for d in sorted(dims):
            result = result.prod(dim=d, keepdim=True)
        return result
    return getattr(torch, how)(result, dim=dims, keepdim=True)


def _dims(reduce_dim: int | Sequence[int], rank: int) -> list[int]:
    dims = [reduce_dim] if isinstance(reduce_dim, int) else list(reduce_dim)
    bad = [d for d in dims if not -rank <= d < rank]
    if bad:
        raise SambaArgumentError(f"sn_zipmapreduce: reduce_dim {bad} out of range for a {rank}-D result")
    return [d % rank for d in dims]


def sn_imm(input: float | int | bool, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d constant of `dtype`: it broadcasts without changing the other operand's dtype class."""
    if isinstance(input, torch.Tensor) or not isinstance(input, (int, float, bool)):
        raise SambaArgumentError(f"sn_imm: input must be a Python number, got {type(input).__name__}")
    return torch.tensor(input, dtype=as_dtype(dtype, "sn_imm"))


def sn_iteridx(attrs: ZipMapAttrs | dict, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each element's index along `dim` of the iteration shape, broadcastable to it."""
    shape = tuple(attrs["shape"])
    if not -len(shape) <= dim < len(shape):
        raise SambaArgumentError(f"sn_iteridx: dim {dim} out of range for iteration shape {list(shape)}")
    dim %= len(shape)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    chosen = torch.int32 if dtype is None else as_dtype(dtype, "sn_iteridx")
    return torch.arange(shape[dim], dtype=chosen).reshape(view)


def sn_select(cond: torch.Tensor, true_val: torch.Tensor, false_val: torch.Tensor) -> torch.Tensor:
    """`true_val` where `cond`, else `false_val` (`torch.where`)."""
    if not isinstance(cond, torch.Tensor) or cond.dtype != torch.bool:
        raise SambaArgumentError(
            f"sn_select: cond must be a bool tensor (a comparison), got "
            f"{getattr(cond, 'dtype', type(cond).__name__)}"
        )
    return torch.where(cond, true_val, false_val)


__all__ = ["ZipMapAttrs", "sn_imm", "sn_iteridx", "sn_select", "sn_zipmapreduce"]

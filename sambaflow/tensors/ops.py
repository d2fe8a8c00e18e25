"""Samba operators that are plain torch ops: they run eagerly and trace into the ATen graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sambaflow.errors import SambaArgumentError


def addmm(
    bias: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, is_transposed: bool = False
) -> torch.Tensor:
    """`bias + x @ weight.T` if `is_transposed` (weight is `(out, in)`, as in nn.Linear), else
    `bias + x @ weight` (weight is `(in, out)`). `x` may have leading batch dims; `bias` may be None.
    """
    _check_addmm_shapes(x, weight, is_transposed)
    if is_transposed:
        return F.linear(x, weight, bias)
    product = torch.matmul(x, weight)
    return product if bias is None else product + bias


def _check_addmm_shapes(x: torch.Tensor, weight: torch.Tensor, is_transposed: bool) -> None:
    if weight.dim() != 2 or x.dim() < 1:
        raise SambaArgumentError(
            f"addmm: weight must be 2-D and x at least 1-D, got weight {tuple(weight.shape)}, "
            f"x {tuple(x.shape)}"
        )
    inner = weight.shape[1] if is_transposed else weight.shape[0]
    if x.shape[-1] != inner:
        layout = "(out, in)" if is_transposed else "(in, out)"
        raise SambaArgumentError(
            f"addmm: x has {x.shape[-1]} features on its last dim, but weight {tuple(weight.shape)} "
            f"read as {layout} (is_transposed={is_transposed}) takes {inner}; flip is_transposed "
            f"if the weight is laid out the other way"
        )


def triu_fill(input: torch.Tensor, value: float) -> torch.Tensor:
    """`input` with the strict upper triangle of its last two dims (column > row) set to `value`:
    causal masking of attention scores. The result keeps `input`'s dtype."""
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        raise SambaArgumentError(
            f"triu_fill: input must be a tensor of at least 2 dims, got {getattr(input, 'shape', type(input).__name__)}"
        )
    rows, cols = input.shape[-2:]
    above = torch.arange(cols).reshape(1, cols) > torch.arange(rows).reshape(rows, 1)
    return torch.where(above, torch.tensor(value, dtype=input.dtype), input)

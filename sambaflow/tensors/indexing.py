"""SambaFlow's gather/scatter (`sambaflow.samba.sn_private`): XLA-style, with batched dimensions.

Layouts (`b` = `batched_dims` leading dims shared by operand, indices and result):

    operand        [*batch, *rest]                   rest: the operand's other dims
    start_indices  [*batch, *index_batch, len(dims)] one start per gathered/scattered dim
    window         [*rest] with dims[j] of size gather_lengths[j] (scatter: the update's window)
    gather result / scatter update  [*batch, *index_batch, *window]

`dims` (gather_dims / scatter_dims) count within `rest`. Gather clamps each start so the window
fits (as XLA does); scatter drops update elements whose target lies outside the operand (an
out-of-bounds index is a no-op, which code relies on to skip padding). `rmw_op` "kUpdate" writes,
"kAdd" accumulates (duplicates add up); a write to one place by two updates keeps one of them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sambaflow.errors import SambaArgumentError
from sambaflow.tensors.sambatensor import SambaTensor

_RMW = ("kUpdate", "kAdd")


def sn_gather(
    input_tensor: torch.Tensor,
    start_indices: torch.Tensor,
    gather_dims: Sequence[int],
    gather_lengths: Sequence[int],
    batched_dims: int = 0,
) -> torch.Tensor:
    """Windows of `input_tensor` starting at `start_indices`; see the module docstring."""
    operand, indices = _plain(input_tensor), _plain(start_indices)
    dims = _checked(operand, indices, gather_dims, batched_dims, "sn_gather")
    if len(gather_lengths) != len(dims):
        raise SambaArgumentError(
            f"sn_gather: gather_lengths {list(gather_lengths)} must have one length per gather dim {dims}"
        )
    rest = list(operand.shape[batched_dims:])
    window = list(rest)
    for d, length in zip(dims, gather_lengths):
        if not 0 < length <= rest[d]:
            raise SambaArgumentError(
                f"sn_gather: gather length {length} does not fit dim {d} of size {rest[d]}"
            )
        window[d] = length
    starts = [indices[..., j].to(torch.int64).clamp(0, rest[d] - window[d]) for j, d in enumerate(dims)]
    coords, _ = _coordinates(operand.shape, indices, batched_dims, dims, starts, window)
    return operand[tuple(coords)]


def sn_scatter(
    operand: torch.Tensor,
    update: torch.Tensor,
    start_indices: torch.Tensor,
    scatter_dims: Sequence[int],
    rmw_op: str = "kUpdate",
    unique_indices: bool = False,
    batched_dims: int = 0,
) -> torch.Tensor:
    """A copy of `operand` with `update` written (or added) at `start_indices`; see the module
    docstring. `unique_indices` is a performance promise on the RDU and changes nothing here."""
    base, values, indices = _plain(operand), _plain(update), _plain(start_indices)
    dims = _checked(base, indices, scatter_dims, batched_dims, "sn_scatter")
    if rmw_op not in _RMW:
        raise SambaArgumentError(f"sn_scatter: rmw_op {rmw_op!r} is not supported; use one of {list(_RMW)}")
    lead = list(indices.shape[:-1])
    window = list(values.shape[len(lead) :])
    rest = list(base.shape[batched_dims:])
    if list(values.shape[: len(lead)]) != lead or len(window) != len(rest):
        raise SambaArgumentError(
            f"sn_scatter: update shape {list(values.shape)} must be [*batch, *index_batch] {lead} followed "
            f"by a window of rank {len(rest)} (the operand {list(base.shape)} less its {batched_dims} batched dims)"
        )
    starts = [indices[..., j].to(torch.int64) for j in range(len(dims))]
    coords, valid = _coordinates(base.shape, indices, batched_dims, dims, starts, window)
    flat = _linear(coords, base.shape)
    size = base.numel()
    flat = torch.where(valid, flat, torch.full_like(flat, size))  # out of bounds: the spare slot
    spare = torch.cat([base.reshape(-1), base.new_zeros(1)])
    out = spare.index_put((flat.reshape(-1),), values.to(base.dtype).reshape(-1), accumulate=rmw_op == "kAdd")
    return out[:size].reshape(base.shape)


def sn_multinomial(probs: torch.Tensor, pre_generated_randoms: torch.Tensor) -> torch.Tensor:
    """One sample per row of `probs` [N, K] by inverse CDF: the first index whose cumulative
    probability exceeds the row's uniform random number in `pre_generated_randoms` [N, 1]
    (probabilities need not sum to one; they are normalised). Returns int64 [N, 1]."""
    p, u = _plain(probs), _plain(pre_generated_randoms)
    if p.dim() != 2 or tuple(u.shape) != (p.shape[0], 1):
        raise SambaArgumentError(
            f"sn_multinomial: probs must be [N, K] and pre_generated_randoms [N, 1]; got "
            f"{list(p.shape)} and {list(u.shape)}"
        )
    cdf = torch.cumsum(p.float(), dim=1)
    target = u.float() * cdf[:, -1:]
    index = torch.sum(cdf <= target, dim=1, keepdim=True)
    return index.clamp(max=p.shape[1] - 1).to(torch.int64)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A SambaTensor as the plain tensor it wraps (other tensors, fake ones while tracing, as they are)."""
    return t.torch() if isinstance(t, SambaTensor) else t


def _checked(
    operand: torch.Tensor, indices: torch.Tensor, dims: Sequence[int], batched: int, op: str
) -> list[int]:
    dims = list(dims)
    rank = operand.dim() - batched
    if not 0 <= batched <= min(operand.dim(), indices.dim() - 1):
        raise SambaArgumentError(
            f"{op}: batched_dims={batched} must be at most the operand's rank {operand.dim()} and the "
            f"indices' rank less one ({indices.dim() - 1})"
        )
    if list(operand.shape[:batched]) != list(indices.shape[:batched]):
        raise SambaArgumentError(
            f"{op}: the {batched} batched dims differ: operand {list(operand.shape)}, indices {list(indices.shape)}"
        )
    if not dims or any(not 0 <= d < rank for d in dims) or len(set(dims)) != len(dims):
        raise SambaArgumentError(
            f"{op}: dims {dims} must be distinct dims of the operand's {rank} non-batched dims"
        )
    if indices.shape[-1] != len(dims) or indices.dtype.is_floating_point:
        raise SambaArgumentError(
            f"{op}: start_indices {list(indices.shape)} {indices.dtype} must be integers whose last dim "
            f"({indices.shape[-1]}) holds one index per dim in {dims}"
        )
    return dims


def _coordinates(
    shape: torch.Size,
    indices: torch.Tensor,
    batched: int,
    dims: list[int],
    starts: list[torch.Tensor],
    window: list[int],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Index tensors (one per operand dim) of shape [*batch, *index_batch, *window], and which
    elements lie inside the operand."""
    lead = indices.dim() - 1  # batch + index batch dims
    total = lead + len(window)
    coords: list[torch.Tensor] = []
    for d in range(batched):
        coords.append(_along(shape[d], d, total))
    valid = torch.ones((), dtype=torch.bool)
    for r, size in enumerate(window):
        offset = _along(size, lead + r, total)
        if r in dims:
            start = starts[dims.index(r)].reshape(list(indices.shape[:-1]) + [1] * len(window))
            offset = offset + start
            valid = valid & (offset >= 0) & (offset < shape[batched + r])
        coords.append(offset)
    full = list(indices.shape[:-1]) + window
    return [c.expand(full) for c in coords], valid.expand(full)


def _along(size: int, position: int, total: int) -> torch.Tensor:
    view = [1] * total
    view[position] = size
    return torch.arange(size, dtype=torch.int64).reshape(view)


def _linear(coords: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    flat = torch.zeros_like(coords[0])
    for c, size in zip(coords, shape):
        flat = flat * size + c
    return flat


__all__ = ["sn_gather", "sn_multinomial", "sn_scatter"]

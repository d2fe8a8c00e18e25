"""Torch-like factories that return named SambaTensors, and torch <-> Samba conversion."""

from __future__ import annotations

import math
from typing import Any

import torch

from sambaflow.host_memory import check_fits
from sambaflow.tensors.sambatensor import SambaTensor


def _wrap(
    data: torch.Tensor, name: str | None, batch_dim: int | None, requires_grad: bool, sized_dims: Any = None
) -> SambaTensor:
    return SambaTensor(
        data, name=name, batch_dim=batch_dim, requires_grad=requires_grad, sized_dims=sized_dims
    )


def _check_fits(factory: str, size: tuple, dtype: Any, name: str | None, kwargs: dict) -> None:
    """Refuse a host tensor larger than the free memory before torch allocates it (host_memory.py:
    otherwise the OOM killer may end the app with no message)."""
    if torch.device(kwargs.get("device") or "cpu").type != "cpu" or not all(isinstance(n, int) for n in size):
        return
    dtype = dtype or torch.get_default_dtype()
    needed = math.prod(size) * (dtype.itemsize if isinstance(dtype, torch.dtype) else 8)
    shape = f"{list(size)} {str(dtype).removeprefix('torch.')}"
    check_fits(
        needed,
        f"{factory}: tensor {name or '(unnamed)'!r} of shape {shape}",
        "use a smaller batch (-b), or compile with micro-batches (-mb) of a size that fits",
    )


def _size(size: tuple) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        return tuple(size[0])
    return tuple(size)


def randn(
    *size: Any,
    name: str | None = None,
    batch_dim: int | None = None,
    requires_grad: bool = False,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> SambaTensor:
    """`torch.randn` returning a named SambaTensor (`sized_dims`: see SambaTensor.sized_dims)."""
    sized_dims = kwargs.pop("sized_dims", None)
    _check_fits("samba.randn", _size(size), dtype, name, kwargs)
    data = torch.randn(*_size(size), dtype=dtype, **kwargs)
    return _wrap(data, name, batch_dim, requires_grad, sized_dims)


def rand(
    *size: Any,
    name: str | None = None,
    batch_dim: int | None = None,
    requires_grad: bool = False,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> SambaTensor:
    """`torch.rand` returning a named SambaTensor (`sized_dims`: see SambaTensor.sized_dims)."""
    sized_dims = kwargs.pop("sized_dims", None)
    _check_fits("samba.rand", _size(size), dtype, name, kwargs)
    data = torch.rand(*_size(size), dtype=dtype, **kwargs)
    return _wrap(data, name, batch_dim, requires_grad, sized_dims)


def zeros(
    *size: Any,
    name: str | None = None,
    batch_dim: int | None = None,
    requires_grad: bool = False,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> SambaTensor:
    """`torch.zeros` returning a named SambaTensor (`sized_dims`: see SambaTensor.sized_dims)."""
    sized_dims = kwargs.pop("sized_dims", None)
    _check_fits("samba.zeros", _size(size), dtype, name, kwargs)
    data = torch.zeros(*_size(size), dtype=dtype, **kwargs)
    return _wrap(data, name, batch_dim, requires_grad, sized_dims)


def ones(
    *size: Any,
    name: str | None = None,
    batch_dim: int | None = None,
    requires_grad: bool = False,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> SambaTensor:
    """`torch.ones` returning a named SambaTensor (`sized_dims`: see SambaTensor.sized_dims)."""
    sized_dims = kwargs.pop("sized_dims", None)
    _check_fits("samba.ones", _size(size), dtype, name, kwargs)
    data = torch.ones(*_size(size), dtype=dtype, **kwargs)
    return _wrap(data, name, batch_dim, requires_grad, sized_dims)


def randint(
    *args: Any,
    name: str | None = None,
    batch_dim: int | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> SambaTensor:
    """`torch.randint(high, size)` or `torch.randint(low, high, size)` as a named SambaTensor."""
    size = kwargs.get("size", args[-1] if args and isinstance(args[-1], (tuple, list, torch.Size)) else ())
    _check_fits("samba.randint", tuple(size), dtype or torch.int64, name, kwargs)
    data = torch.randint(*args, dtype=dtype or torch.int64, **kwargs)
    return _wrap(data, name, batch_dim, False)


def randn_like(
    tensor: torch.Tensor,
    name: str | None = None,
    batch_dim: int | None = None,
    requires_grad: bool = False,
    **kwargs: Any,
) -> SambaTensor:
    """`torch.randn_like`; the result keeps `tensor`'s batch_dim unless one is given."""
    if batch_dim is None:
        batch_dim = getattr(tensor, "batch_dim", None)
    return _wrap(torch.randn_like(_plain(tensor), **kwargs), name, batch_dim, requires_grad)


def normal(
    mean: Any = 0.0,
    std: Any = 1.0,
    size: Any = None,
    *,
    name: str | None = None,
    batch_dim: int | None = None,
    requires_grad: bool = False,
    **kwargs: Any,
) -> SambaTensor:
    """`torch.normal` (any of its overloads) as a named SambaTensor."""
    if size is None:
        data = torch.normal(_plain(mean), _plain(std), **kwargs)
    else:
        data = torch.normal(mean, std, size=tuple(size), **kwargs)
    return _wrap(data, name, batch_dim, requires_grad)


def from_torch_tensor(
    tensor: torch.Tensor,
    name: str | None = None,
    batch_dim: int | None = None,
    requires_grad: bool | None = None,
    sized_dims: Any = None,
    region_name: str | None = None,
) -> SambaTensor:
    """Wrap a torch tensor as a SambaTensor that shares its memory."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"from_torch_tensor expects a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(tensor, SambaTensor):
        name = tensor.sn_name if name is None else name
        batch_dim = tensor.batch_dim if batch_dim is None else batch_dim
    return SambaTensor(
        tensor,
        name=name,
        batch_dim=batch_dim,
        requires_grad=requires_grad,
        sized_dims=sized_dims,
        region_name=region_name,
    )


def from_named_dict(tensors: dict[str, torch.Tensor]) -> dict[str, SambaTensor]:
    """`{name: tensor}` -> `{name: SambaTensor named name}` (sharing memory): feeds for `session.run`."""
    if not isinstance(tensors, dict):
        raise TypeError(f"from_named_dict expects a dict of name -> tensor, got {type(tensors).__name__}")
    return {name: from_torch_tensor(t, name=name) for name, t in tensors.items()}


from_torch = from_torch_tensor


def to_torch(value: Any) -> Any:
    """SambaTensor (or a list/tuple of them) -> plain torch tensor(s), sharing memory."""
    if isinstance(value, (list, tuple)):
        return type(value)(to_torch(v) for v in value)
    return _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, SambaTensor):
        return value.torch()
    return value

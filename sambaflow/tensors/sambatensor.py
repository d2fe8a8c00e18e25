"""SambaTensor: a torch tensor with a name, a batch dimension and a device gradient.

A SambaTensor *is* a `torch.Tensor` (a subclass sharing the wrapped tensor's memory), so every
torch operator, `torch.*` function, `torch.nn.functional` call and `nn` module accepts it. Results
of operators are plain torch tensors: only the tensors a user names are SambaTensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from sambaflow.errors import SambaArgumentError
from sambaflow.tensors.current import current_session


class SambaTensor(torch.Tensor):
    """A named tensor that can be fed to, or read from, a compiled graph."""

    # Operators on SambaTensors return plain tensors (as for nn.Parameter); the names belong to
    # the tensors the user created, not to every intermediate.
    __torch_function__ = torch._C._disabled_torch_function_impl

    sn_name: str | None
    batch_dim: int | None

    def __new__(
        cls,
        torch_tensor: torch.Tensor | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
        batch_dim: int | None = None,
        requires_grad: bool | None = None,
        region_name: str | None = None,
        sized_dims: Any = None,
    ) -> SambaTensor:
        data = _initial_data(torch_tensor, shape, dtype)
        grad_flag = data.requires_grad if requires_grad is None else requires_grad
        tensor = torch.Tensor._make_subclass(cls, data.detach(), grad_flag)
        _set_samba_attributes(tensor, name, batch_dim)
        if region_name is not None:
            tensor.sn_region_name = region_name
        if sized_dims is not None:
            tensor.sized_dims = sized_dims
        return tensor

    @property
    def sn_region_name(self) -> str | None:
        """The device region this tensor lives in (SambaFlow's multigraph): tensors of one region,
        in any graph of a PEF, are one device tensor. Default: the tensor's own name."""
        return self.__dict__.get("_sn_region_name") or self.sn_name

    @sn_region_name.setter
    def sn_region_name(self, value: str | None) -> None:
        self.__dict__["_sn_region_name"] = value

    @property
    def sized_dims(self) -> list[Any] | None:
        """SambaFlow's dynamic-dimension names per dim (None: static). Recorded; every graph here
        is compiled for the traced shape."""
        return self.__dict__.get("_sized_dims")

    @sized_dims.setter
    def sized_dims(self, value: Any) -> None:
        self.__dict__["_sized_dims"] = None if value is None else list(value)

    @property
    def name(self) -> str | None:  # type: ignore[override]
        return self.sn_name

    @property
    def sn_grad(self) -> torch.Tensor | None:
        """The device gradient: a seed set by the user, else the one the last run computed."""
        seed = self.__dict__.get("_sn_grad")
        if seed is not None or self.sn_name is None:
            return seed
        session = current_session()
        return None if session is None else session.gradient_of(self.sn_name)

    @sn_grad.setter
    def sn_grad(self, value: torch.Tensor | None) -> None:
        self.__dict__["_sn_grad"] = value

    def torch(self) -> torch.Tensor:
        """The plain torch tensor, sharing memory."""
        return self.as_subclass(torch.Tensor)

    torch_tensor = torch

    def cpu(self, *args: Any, **kwargs: Any) -> SambaTensor:  # type: ignore[override]
        """Host copy. Host and device memory are both host memory for the CPU backend."""
        return self._renamed(torch.Tensor.cpu(self, *args, **kwargs))

    @property
    def has_data(self) -> bool:
        """False for a tensor on the `meta` device (accelerate's `init_empty_weights`): no values."""
        return self.device.type != "meta"

    def rdu(self) -> SambaTensor:
        """Mark for the device; data moves to the device when a graph runs."""
        return self

    def bfloat16(self, *args: Any, **kwargs: Any) -> SambaTensor:  # type: ignore[override]
        return self._renamed(torch.Tensor.bfloat16(self, *args, **kwargs))

    def float(self, *args: Any, **kwargs: Any) -> SambaTensor:  # type: ignore[override]
        return self._renamed(torch.Tensor.float(self, *args, **kwargs))

    def half(self, *args: Any, **kwargs: Any) -> SambaTensor:  # type: ignore[override]
        return self._renamed(torch.Tensor.half(self, *args, **kwargs))

    def to(self, *args: Any, **kwargs: Any) -> SambaTensor:  # type: ignore[override]
        return self._renamed(torch.Tensor.to(self, *args, **kwargs))

    def _renamed(self, result: torch.Tensor) -> SambaTensor:
        if result is self:
            return self
        region = self.__dict__.get("_sn_region_name")
        return SambaTensor(result, name=self.sn_name, batch_dim=self.batch_dim, region_name=region)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        values = repr(self.torch().detach())
        return (
            f"SambaTensor(name={self.sn_name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"batch_dim={self.batch_dim}, requires_grad={self.requires_grad},\n  {values})"
        )

    def __deepcopy__(self, memo: dict) -> SambaTensor:
        if id(self) not in memo:
            clone = self.torch().detach().clone(memory_format=torch.preserve_format)
            memo[id(self)] = SambaTensor(
                clone, name=self.sn_name, batch_dim=self.batch_dim, requires_grad=self.requires_grad
            )
        return memo[id(self)]

    def __reduce_ex__(self, protocol: int) -> Any:
        # Pickle (and torch.save) as a plain tensor: checkpoints must load with weights_only=True.
        return self.torch().detach().clone().__reduce_ex__(protocol)


def named_view(tensor: torch.Tensor, name: str) -> SambaTensor:
    """A SambaTensor sharing `tensor`'s memory (the fast path for a graph's outputs every step)."""
    view = torch.Tensor._make_subclass(SambaTensor, tensor, False)
    view.sn_name = name
    view.batch_dim = None
    return view


class SambaParameter(SambaTensor, nn.Parameter):
    """A model parameter: an nn.Parameter with a Samba name.

    `SambaParameter(data, requires_grad, name)` wraps `data` (what `from_torch_model_` makes).
    SambaFlow's lazy form `SambaParameter(shape=..., dtype=..., materializer=fn, requires_grad=...)`
    makes a tensor of that shape and dtype and fills it with `fn(tensor)` right away (e.g. a
    transposed copy of another weight); `shape` may be any iterable of ints.
    """

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = True,
        name: str | None = None,
        *,
        shape: Iterable[int] | None = None,
        dtype: torch.dtype | None = None,
        materializer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> SambaParameter:
        if shape is None and (dtype is not None or materializer is not None):
            raise SambaArgumentError("SambaParameter: dtype= and materializer= need shape= as well")
        if shape is not None:
            return _lazy_parameter(cls, shape, dtype, materializer, requires_grad, name, data)
        base = torch.empty(0) if data is None else data.detach()
        tensor = torch.Tensor._make_subclass(cls, base, requires_grad)
        _set_samba_attributes(tensor, name, None)
        return tensor

    def __deepcopy__(self, memo: dict) -> SambaParameter:
        if id(self) not in memo:
            clone = self.torch().detach().clone(memory_format=torch.preserve_format)
            memo[id(self)] = SambaParameter(clone, self.requires_grad, self.sn_name)
        return memo[id(self)]

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return "Samba" + super().__repr__().replace("SambaTensor(", "Parameter(", 1)


def _lazy_parameter(
    cls: type[SambaParameter],
    shape: Iterable[int],
    dtype: torch.dtype | None,
    materializer: Callable[[torch.Tensor], torch.Tensor] | None,
    requires_grad: bool,
    name: str | None,
    data: torch.Tensor | None,
) -> SambaParameter:
    if data is not None:
        raise SambaArgumentError("SambaParameter: pass either data or shape=, not both")
    size = _checked_shape(shape)
    base = torch.zeros(size, dtype=dtype or torch.get_default_dtype())
    tensor = torch.Tensor._make_subclass(cls, base, requires_grad)
    _set_samba_attributes(tensor, name, None)
    if materializer is not None:
        _materialize(tensor, materializer)
    return tensor


def _checked_shape(shape: Iterable[int]) -> tuple[int, ...]:
    try:
        size = tuple(shape)
    except TypeError:
        raise SambaArgumentError(
            f"SambaParameter: shape= must be an iterable of ints, got {shape!r}"
        ) from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in size):
        raise SambaArgumentError(f"SambaParameter: shape= must hold non-negative ints, got {size}")
    return size


def _materialize(tensor: SambaParameter, materializer: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Fill `tensor` with `materializer(tensor)`, which must be a tensor of the same shape."""
    value = materializer(tensor)
    where = getattr(materializer, "__qualname__", type(materializer).__name__)
    if not isinstance(value, torch.Tensor):
        raise SambaArgumentError(
            f"SambaParameter: materializer {where} returned {type(value).__name__}, not a tensor"
        )
    if value.shape != tensor.shape:
        raise SambaArgumentError(
            f"SambaParameter: materializer {where} returned shape {tuple(value.shape)}, but the "
            f"parameter has shape={tuple(tensor.shape)}; make them agree (e.g. transpose the result)"
        )
    with torch.no_grad():
        tensor.copy_(value.detach())


def _initial_data(
    torch_tensor: torch.Tensor | None, shape: tuple[int, ...] | None, dtype: torch.dtype | None
) -> torch.Tensor:
    if torch_tensor is not None:
        return torch_tensor if dtype is None else torch_tensor.to(dtype)
    if shape is None:
        raise TypeError("SambaTensor needs either torch_tensor= or shape=")
    return torch.zeros(*shape, dtype=dtype or torch.float32)


def _set_samba_attributes(tensor: torch.Tensor, name: str | None, batch_dim: int | None) -> None:
    tensor.sn_name = name
    tensor.batch_dim = batch_dim

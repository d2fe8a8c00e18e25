"""Tensors a model caches across calls, met while tracing: real values, folded into the graph.

Some model code keeps tensors between calls: a module-level dict of RoPE cos/sin tables keyed by
sequence length, zero-padding tensors checked with `torch.all(t == 0).item()` before reuse, a
counter on a module. SambaFlow traces with real values, so such caches hold real tensors. We trace
with fake tensors, and a cache first filled during one trace would hand the next trace a fake
tensor of another fake mode (an error), or a value that never existed.

So, before the fake passes, `prime_caches` runs the model's forward once for real (parameters on
the `meta` device stood in by zeros, `no_grad`), which fills such caches with real tensors. While
tracing, `RealConstants` evaluates any torch call whose tensor arguments are all real (not fake,
not traced) eagerly, outside the tracer: `.item()` on a cached tensor gives its real value, and
a table derived from cached tensors is one real tensor. Where a real tensor meets a traced one,
the tracer lifts it into the graph as a constant (a `get_attr` node, stored in the PEF).

Priming happens where the app traces `forward(**inputs)` (SambaNova's modelzoo does): it costs
one real forward pass. A cached value is frozen at what priming computed; a cache that depends on
the parameters (zeros stand in for `meta` ones) would be wrong. Caches of tables and paddings do
not depend on them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from sambaflow.trace.casts import looks_compiled


def prime_caches(model: nn.Module, state: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> None:
    """Run `model` once for real on `state` (path -> tensor) and the call's arguments, so that
    whatever it caches across calls holds real tensors before tracing. `meta` tensors in `state`
    are stood in by zeros of their layout, integer inputs by zeros (`_dummy_input`)."""
    real = {path: _real(t) for path, t in state.items()}
    args, kwargs = pytree.tree_map_only(torch.Tensor, _dummy_input, (args, kwargs))
    with torch.no_grad(), looks_compiled(), RealConstants():
        functional_call(model, real, args, kwargs)


def _real(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "meta" or isinstance(tensor, FakeTensor):
        return torch.zeros(tensor.shape, dtype=tensor.dtype)
    return tensor.detach()


def _dummy_input(tensor: torch.Tensor) -> torch.Tensor:
    """Tracing inputs are dummies (SambaNova's tracers draw token ids up to 5000 whatever the
    vocabulary): integer ones are zeros here, an index valid for any embedding or gather."""
    if tensor.is_floating_point() or tensor.is_complex():
        return _real(tensor)
    return torch.zeros(tensor.shape, dtype=tensor.dtype)


def is_real(value: Any) -> bool:
    """A plain tensor with data: not fake, not meta, not a functional or traced wrapper."""
    if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor):
        return False
    if value.device.type == "meta" or torch._is_functional_tensor(value):
        return False
    return type(value) in (torch.Tensor, nn.Parameter) or not _is_wrapper(value)


def _is_wrapper(value: torch.Tensor) -> bool:
    return torch._C._dispatch_keys(value).has(torch._C.DispatchKey.Python)


class RealConstants(TorchFunctionMode):
    """Calls whose tensor arguments are all real run eagerly, outside fake and traced modes."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        if tensors and all(is_real(t) for t in tensors):
            with _disable_current_modes():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


__all__ = ["RealConstants", "is_real", "prime_caches"]

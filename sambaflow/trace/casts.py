"""What the tracer adjusts so library code takes the path it takes under torch.compile/export.

- `looks_compiled()`: `torch.compiler.is_compiling()` is True while we trace, as under
  `torch.export`. Libraries (Hugging Face's attention-mask code, for one) check it to skip
  value-dependent shortcuts such as `if torch.all(mask == 1): ...`, which a graph cannot hold.
- `IndexCasts`: SambaFlow apps feed int16 position ids and labels (and int32 token ids);
  eager PyTorch's embedding takes only int32/int64 indices and its losses only int64 targets.
  The graph keeps the app's dtypes at its inputs and casts where such an op reads them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def looks_compiled() -> Iterator[None]:
    """`torch.compiler.is_compiling()` (and `is_exporting()`) read True inside this block."""
    compiler = torch.compiler
    flags = [f for f in ("_is_compiling_flag", "_is_exporting_flag") if hasattr(compiler, f)]
    saved = {flag: getattr(compiler, flag) for flag in flags}  # torch.export sets these two
    for flag in flags:
        setattr(compiler, flag, True)
    try:
        yield
    finally:
        for flag, value in saved.items():
            setattr(compiler, flag, value)


_EMBEDDING_INDEX = (torch.int32, torch.int64)


class IndexCasts(TorchFunctionMode):
    """Cast narrow integer indices to what `F.embedding` and the classification losses accept."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.embedding:
            args, kwargs = _cast_argument(args, kwargs, 0, "input", _EMBEDDING_INDEX)
        elif func in (F.cross_entropy, F.nll_loss, F.multi_margin_loss):
            args, kwargs = _cast_argument(args, kwargs, 1, "target", (torch.int64,))
        return func(*args, **kwargs)


def _cast_argument(
    args: tuple, kwargs: dict[str, Any], position: int, name: str, accepted: tuple[torch.dtype, ...]
) -> tuple[tuple, dict[str, Any]]:
    if len(args) > position:
        args = args[:position] + (_to_index(args[position], accepted),) + args[position + 1 :]
    elif name in kwargs:
        kwargs[name] = _to_index(kwargs[name], accepted)
    return args, kwargs


def _to_index(value: Any, accepted: tuple[torch.dtype, ...]) -> Any:
    integer = isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex()
    if integer and value.dtype not in accepted and value.dtype != torch.bool:
        return value.to(torch.int64)
    return value

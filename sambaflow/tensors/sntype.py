"""`SNType`: SambaFlow's element types, as the torch dtypes they compute with here.

SambaNova's ops take `dtype=SNType.INT32` (or a torch dtype) for immediates and iteration
indices. On the RDU, `UINT16` indices save bandwidth; in torch-in/torch-out mode (here, always:
`session.use_static_functional()` is False) code asks `SNType.to_torch_reference_type(t)` for a
type torch computes with, and unsigned 16-bit indices become int32 (so `i - j` cannot wrap).
"""

from __future__ import annotations

import torch

from sambaflow.errors import SambaArgumentError


class SNType:
    """Element types by SambaFlow's names; each is a `torch.dtype`."""

    BOOL = torch.bool
    INT8 = torch.int8
    INT16 = torch.int16
    INT32 = torch.int32
    INT64 = torch.int64
    UINT8 = torch.uint8
    UINT16 = torch.uint16
    UINT32 = torch.uint32
    BF16 = torch.bfloat16
    FP16 = torch.float16
    FP32 = torch.float32
    FP64 = torch.float64

    @staticmethod
    def to_torch_reference_type(dtype: torch.dtype) -> torch.dtype:
        """The dtype torch computes `dtype` values with: unsigned 16/32-bit become int32/int64."""
        return {torch.uint16: torch.int32, torch.uint32: torch.int64}.get(as_dtype(dtype, "dtype"), dtype)


def as_dtype(dtype: object, what: str) -> torch.dtype:
    """`dtype` (an SNType member or torch dtype) checked, for an error naming `what`."""
    if not isinstance(dtype, torch.dtype):
        raise SambaArgumentError(
            f"{what}: expected a torch dtype or SNType member (e.g. SNType.INT32), got {dtype!r}"
        )
    return dtype


__all__ = ["SNType", "as_dtype"]

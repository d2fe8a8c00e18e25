"""Parameters on the `meta` device (accelerate's `init_empty_weights`) as host tensors of their layout."""

from __future__ import annotations

import torch


def on_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or for a `meta` tensor an unfilled CPU tensor of the same shape, strides and
    dtype: tracing reads only its layout, and memory that is never written costs nothing."""
    if tensor.device.type != "meta":
        return tensor
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)


def is_meta(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta"

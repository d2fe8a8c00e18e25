"""The MNIST transform SambaFlow apps pass to torchvision's `MNIST` dataset.

Works without torchvision or PIL: a PIL image is read through the numpy array protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sambaflow.app.datasets import MNIST_MEAN, MNIST_STD
from sambaflow.errors import SambaArgumentError


def _num_features(params: Any) -> int:
    """params['num_features'] from a dict, or params.num_features from a namespace."""
    value = (
        params.get("num_features") if isinstance(params, Mapping) else getattr(params, "num_features", None)
    )
    if value is None:
        raise SambaArgumentError(
            "dataset_transform(params) needs params['num_features'] (784 for MNIST): pass vars(args) "
            "from an app that defines --num-features, or {'num_features': 784}"
        )
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SambaArgumentError(f"dataset_transform: num_features must be a positive integer, got {value!r}")
    return int(value)


def _to_unit_float(image: Any) -> torch.Tensor:
    """A PIL image, numpy array or tensor -> float32 tensor; integer pixels 0..255 become [0, 1]."""
    if not isinstance(image, torch.Tensor):
        if hasattr(image, "convert") and getattr(image, "mode", "L") != "L":
            image = image.convert("L")
        image = torch.from_numpy(np.array(image))
    if image.dtype == torch.bool or image.is_complex():
        raise SambaArgumentError(f"dataset_transform got a {image.dtype} image: pass 8-bit grey pixels")
    if image.is_floating_point():
        return image.to(torch.float32)
    return image.to(torch.float32) / 255.0


class MnistTransform:
    """image -> [num_features] float32 tensor: scaled to [0, 1], normalised, flattened."""

    def __init__(self, num_features: int) -> None:
        self.num_features = num_features

    def __call__(self, image: Any) -> torch.Tensor:
        x = _to_unit_float(image)
        if x.numel() != self.num_features:
            raise SambaArgumentError(
                f"dataset_transform got an image of shape {list(x.shape)} ({x.numel()} values) but "
                f"num_features is {self.num_features}: pass --num-features {x.numel()} or 28x28 images"
            )
        return ((x - MNIST_MEAN) / MNIST_STD).reshape(self.num_features)

    def __repr__(self) -> str:
        return f"MnistTransform(num_features={self.num_features}, mean={MNIST_MEAN}, std={MNIST_STD})"


def dataset_transform(params: Any) -> MnistTransform:
    """The transform for torchvision's MNIST: to float in [0, 1], normalise, flatten to num_features."""
    return MnistTransform(_num_features(params))

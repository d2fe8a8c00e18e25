"""Small helpers apps call: seeding, the app's directory, numeric comparison."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from sambaflow.errors import SambaError


class SambaMismatchError(SambaError, AssertionError):
    """`assert_close` found tensors that differ by more than the tolerance."""


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_file_dir(file: str) -> str:
    """Directory of a file (apps pass `__file__`)."""
    return os.path.dirname(os.path.abspath(file))


def compare(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max rel error) of `actual` against `expected`."""
    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    diff = (a - e).abs()
    abs_err = float(diff.max()) if diff.numel() else 0.0
    rel_err = float((diff / e.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
    return abs_err, rel_err


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    name: str = "tensor",
    threshold: float | None = None,
    rtol: float | None = None,
    visualize: bool = False,
) -> None:
    """Raise if `actual` differs from `expected`: |a - e| <= threshold + rtol * |e| elementwise."""
    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    if a.shape != e.shape:
        raise SambaMismatchError(f"{name}: shape {list(a.shape)} != expected {list(e.shape)}")
    atol = 1e-5 if threshold is None else threshold
    rel = 1e-5 if rtol is None else rtol
    bad = (a - e).abs() > atol + rel * e.abs()
    if bool(bad.any()):
        abs_err, rel_err = compare(a, e)
        raise SambaMismatchError(
            f"{name}: {int(bad.sum())} of {a.numel()} values differ (max abs {abs_err:.3g}, "
            f"max rel {rel_err:.3g}; tolerance abs {atol:g} + rel {rel:g})"
        )

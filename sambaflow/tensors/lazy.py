"""Random sources for lazily materialised parameters (`SambaParameter(materializer=...)`).

SambaNova's modelzoo builds its lazy weight initialisers from `RNGProviderFactory().build_provider()`:
each provider, called, gives a sampler with `normal(mean, std, shape, dtype=)`. A factory draws one
seed per provider from torch's global generator, so `torch.manual_seed(n)` makes the weights
repeatable; each provider's samples do not depend on the order parameters are materialised in.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Sampler:
    """Draws from one seeded generator."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def normal(
        self, mean: float, std: float, shape: Sequence[int], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        values = torch.empty(tuple(shape), dtype=torch.float32).normal_(mean, std, generator=self.generator)
        return values.to(dtype) if dtype is not None else values

    def uniform(
        self, low: float, high: float, shape: Sequence[int], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        values = torch.empty(tuple(shape), dtype=torch.float32).uniform_(low, high, generator=self.generator)
        return values.to(dtype) if dtype is not None else values


class RNGProvider:
    """Called, a sampler seeded with this provider's seed (a fresh one each call, same stream)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self) -> Sampler:
        return Sampler(torch.Generator().manual_seed(self.seed))


class RNGProviderFactory:
    """Makes providers, each with its own seed drawn from torch's global generator."""

    def build_provider(self) -> RNGProvider:
        return RNGProvider(int(torch.randint(0, 2**62, (1,)).item()))


__all__ = ["RNGProvider", "RNGProviderFactory", "Sampler"]

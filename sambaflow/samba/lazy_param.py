"""`sambaflow.samba.lazy_param`: random sources for lazily materialised parameters."""

from sambaflow.tensors.lazy import RNGProvider, RNGProviderFactory, Sampler

__all__ = ["RNGProvider", "RNGProviderFactory", "Sampler"]

"""Where the device store's tensors live: on the CPU the store holds the host tensors' own memory.

The device is the CPU for the reference backend and Inductor's C++ programs, so the store can own
the host weights' memory instead of copying them (one copy of an LLM's weights, not two); the
programs then update them in place. Off the CPU the store holds copies, as a separate device's
memory would. Used by the session (`to_rdu`) and the multigraph loader alike.
"""

from __future__ import annotations

from typing import Any

import torch

from sambaflow.trace.graph import TensorSpec


def runs_on_cpu(graph: Any) -> bool:
    """Whether the graph's tensors live in host memory: the device is the CPU (the reference
    backend, Inductor's C++), not a GPU. Traced placeholders carry a fake tensor; a graph read
    from a PEF names the device."""
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("val") for n in placeholders]
    devices = {n.meta.get("device") or v.device.type for n, v in zip(placeholders, values) if v is not None}
    return devices <= {"cpu"}


def device_tensor(tensor: torch.Tensor, spec: TensorSpec, shared: set[int] | None) -> torch.Tensor:
    """What the store holds for host tensor `tensor`: its own memory as a plain tensor (no
    autograd, no subclass) where the device is the CPU and the programs can write into it in
    place; else a copy, as a separate device's memory would be. `shared` (None off the CPU) holds
    the storages stored so far: programs update each stored tensor in place, so two must never
    share memory (tied weights are one parameter, so one entry)."""
    plain = tensor.detach().as_subclass(torch.Tensor)
    if shared is None or not _shareable(plain, spec):
        return plain.clone()
    storage = plain.untyped_storage().data_ptr()
    if storage in shared:
        return plain.clone()
    shared.add(storage)
    return plain


def _shareable(tensor: torch.Tensor, spec: TensorSpec) -> bool:
    """A dense host tensor of the graph's shape and dtype that in-place writes may change
    (inference-mode tensors refuse them outside inference mode)."""
    return (
        tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.dtype == spec.dtype
        and tuple(tensor.shape) == tuple(spec.shape)
        and tensor.numel() > 0
        and tensor.is_contiguous()
        and not (tensor.is_inference() or tensor.is_conj() or tensor.is_neg())
    )


def same_memory(stored: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether the store holds `tensor`'s own memory (so there is nothing to copy back)."""
    return (
        stored.data_ptr() == tensor.data_ptr()
        and stored.device == tensor.device
        and stored.dtype == tensor.dtype
        and stored.shape == tensor.shape
        and stored.stride() == tensor.stride()
    )

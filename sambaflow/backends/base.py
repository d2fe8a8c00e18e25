"""The backend contract: compile a section program, call it on tensors in its input order."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from sambaflow.errors import SambaBackendError
from sambaflow.passes.sections import SectionProgram

CompiledProgram = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


class Backend(Protocol):
    name: str

    def compile(self, program: SectionProgram) -> CompiledProgram:
        """Return a callable: tensors in `program.inputs` order -> tensors in `program.outputs` order."""
        ...


def get_backend(name: str) -> Backend:
    from sambaflow.backends.inductor import InductorBackend
    from sambaflow.backends.reference import ReferenceBackend

    backends = {"reference": ReferenceBackend, "inductor": InductorBackend}
    if name not in backends:
        raise SambaBackendError(f"unknown backend '{name}': choose one of {sorted(backends)}")
    return backends[name]()

"""The backend contract: compile a section program, call it on tensors in its input order.

It names no concrete backend (they import it); `registry.py` maps names to backends.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from sambaflow.passes.sections import SectionProgram

CompiledProgram = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


class Backend(Protocol):
    name: str

    def compile(self, program: SectionProgram) -> CompiledProgram:
        """Return a callable: tensors in `program.inputs` order -> tensors in `program.outputs` order."""
        ...


def export_many(
    backend: Backend, programs: dict[str, SectionProgram], on_program: Callable[[str], None] | None = None
) -> dict[str, bytes]:
    """Every program's ahead-of-time binary by name; `on_program(name)` before each, in order.

    A backend with its own `export_many` may compile several at once (inductor); the default
    exports one after another.
    """
    own = getattr(backend, "export_many", None)
    if own is not None:
        return own(programs, on_program)
    binaries = {}
    for name, program in programs.items():
        if on_program is not None:
            on_program(name)
        binaries[name] = backend.export(program)  # type: ignore[attr-defined]
    return binaries

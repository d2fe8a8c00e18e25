"""The reference backend: run the ATen graph eagerly, op by op. The oracle; works everywhere."""

from __future__ import annotations

from typing import Sequence

import torch

from sambaflow.backends.base import CompiledProgram
from sambaflow.passes.sections import SectionProgram


class ReferenceBackend:
    name = "reference"
    device = "cpu"

    def compile(self, program: SectionProgram) -> CompiledProgram:
        # Nothing to compile: the graph itself is the program.
        return self.load(program, b"")

    def export(self, program: SectionProgram) -> bytes:
        """No binary: the PEF's JSON graph is all this backend needs."""
        return b""

    def load(self, program: SectionProgram, binary: bytes) -> CompiledProgram:
        module = program.module

        def run(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
            with torch.no_grad():
                return module(*tensors)

        return run

"""The reference backend: run the ATen graph eagerly, op by op. The oracle; works everywhere."""

from __future__ import annotations

from typing import Sequence

import torch

from sambaflow.backends.base import CompiledProgram
from sambaflow.passes.sections import SectionProgram


class ReferenceBackend:
    name = "reference"

    def compile(self, program: SectionProgram) -> CompiledProgram:
        module = program.module

        def run(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
            with torch.no_grad():
                return module(*tensors)

        return run

"""A traced step made runnable: the fused full-step program and one program per section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from sambaflow.backends.base import Backend, CompiledProgram, get_backend
from sambaflow.passes.sections import FULL_STEP, SectionProgram, full_step_program, section_programs
from sambaflow.trace.graph import TracedGraph


@dataclass
class Executable:
    """What a session runs. Programs are compiled on first use and kept."""

    graph: TracedGraph
    backend: Backend
    programs: dict[str, SectionProgram]
    compiled: dict[str, CompiledProgram] = field(default_factory=dict)

    @staticmethod
    def build(graph: TracedGraph, backend: str | Backend = "reference") -> Executable:
        chosen = get_backend(backend) if isinstance(backend, str) else backend
        programs = {FULL_STEP: full_step_program(graph)} | section_programs(graph)
        return Executable(graph, chosen, programs)

    @property
    def sections(self) -> list[str]:
        return self.graph.sections

    def program(self, name: str) -> tuple[SectionProgram, CompiledProgram]:
        if name not in self.compiled:
            self.compiled[name] = self.backend.compile(self.programs[name])
        return self.programs[name], self.compiled[name]

    def run(self, name: str, store: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> None:
        """Run program `name` on tensors from `into` or else `store`; write results to `into`."""
        program, compiled = self.program(name)
        args: Sequence[torch.Tensor] = [into[n] if n in into else store[n] for n in program.inputs]
        into.update(zip(program.outputs, compiled(args)))

"""A traced step made runnable: the fused full-step program and one program per section."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from sambaflow.backends.base import Backend, CompiledProgram, export_many
from sambaflow.backends.registry import get_backend
from sambaflow.passes.batch_reduction import batch_reduction
from sambaflow.passes.inplace import update_inputs_in_place
from sambaflow.passes.sections import (
    FULL_STEP,
    SectionProgram,
    full_step_program,
    section_programs,
    split_programs,
)
from sambaflow.passes.seeds import zero_seeded
from sambaflow.trace.graph import GRAD, OUTPUT_GRAD, TracedGraph


def programs_of(graph: TracedGraph, split_at_gradients: bool = False) -> dict[str, SectionProgram]:
    """The fused step and one program per section (a forward-only graph's step is its fwd); with
    `split_at_gradients`, also `grads` and `update` (gradient accumulation, data parallel).

    Programs that update parameters and optimizer state write them into the stored tensors
    (no new parameter memory per step; also measurably faster with Inductor). The fused step
    seeds every output but the losses with zero (`passes/seeds.py`).
    """
    step = full_step_program(graph)
    if graph.sections == ["fwd"]:
        return {FULL_STEP: step, "fwd": step}
    programs = {FULL_STEP: zero_seeded(step, zero_seeds(graph))} | section_programs(graph)
    if split_at_gradients:
        programs |= split_programs(graph)
    for name in (FULL_STEP, "opt", "update"):
        if name in programs:
            programs[name] = update_inputs_in_place(programs[name]).program
    return programs


def zero_seeds(graph: TracedGraph) -> list[str]:
    """Output-gradient seeds the fused step holds at zero: all but the losses'. Where no output is a
    loss (0-d, or named by `loss_indices`), the first output's seed stays an input too: SambaFlow
    apps seed a per-token loss, `outputs[0].sn_grad = scale`, every step (the GPT-2 tutorial)."""
    kept = list(graph.loss_names) or [s.name for s in graph.model_outputs[:1]]
    seeded = {f"{name}__grad" for name in kept}
    return [s.name for s in graph.inputs_with_role(OUTPUT_GRAD) if s.name not in seeded]


@dataclass
class Executable:
    """What a session runs. Programs are compiled on first use and kept."""

    graph: TracedGraph
    backend: Backend
    programs: dict[str, SectionProgram]
    compiled: dict[str, CompiledProgram] = field(default_factory=dict)

    @staticmethod
    def build(graph: TracedGraph, backend: str | Backend, split_at_gradients: bool = False) -> Executable:
        chosen = get_backend(backend) if isinstance(backend, str) else backend
        return Executable(graph, chosen, programs_of(graph, split_at_gradients))

    @staticmethod
    def from_binaries(
        graph: TracedGraph, backend: Backend, programs: dict[str, SectionProgram], binaries: dict[str, bytes]
    ) -> Executable:
        """Programs read from a PEF: load what the backend compiled ahead of time, compile nothing."""
        compiled = {
            name: backend.load(program, binaries.get(name, b"")) for name, program in programs.items()
        }
        return Executable(graph, backend, programs, compiled)

    def binaries(self, on_program: Callable[[str], None] | None = None) -> dict[str, bytes]:
        """The backend's ahead-of-time binary of every program (for the PEF); a program that
        serves under two names (a forward-only graph's step and fwd) is exported once."""
        first: dict[int, str] = {}
        for name, program in self.programs.items():
            first.setdefault(id(program), name)
        distinct = {name: self.programs[name] for name in first.values()}
        exported = export_many(self.backend, distinct, on_program)
        return {name: exported[first[id(program)]] for name, program in self.programs.items()}

    @property
    def sections(self) -> list[str]:
        return self.graph.sections

    @functools.cached_property
    def step_seeds(self) -> frozenset[str]:
        """The output-gradient seeds the fused step takes; the others it holds at zero (read on
        every run, so worked out once: the programs never change)."""
        step = set(self.programs[FULL_STEP].inputs)
        return frozenset(s.name for s in self.graph.inputs_with_role(OUTPUT_GRAD) if s.name in step)

    @functools.cached_property
    def gradient_split(self) -> tuple[list[str], list[str]]:
        """The programs that make the gradients, and those that then update the weights: `grads`
        and `update` where compiled, else the section programs."""
        if "grads" in self.programs and "update" in self.programs:
            return ["grads"], ["update"]
        after = [s for s in self.sections if s in ("gradnorm", "opt")]
        return [s for s in self.sections if s not in after], after

    @functools.cached_property
    def gradient_names(self) -> list[str]:
        """The parameters' gradients, in graph order (what accumulation and all-reduce change)."""
        return [s.name for s in self.graph.outputs if s.role == GRAD]

    @functools.cached_property
    def loss_reductions(self) -> dict[str, str | None]:
        """'mean' or 'sum' for each loss: how it combines over accumulated batches."""
        made = dict(zip((s.name for s in self.graph.outputs), self.graph.returned_nodes()))
        return {name: batch_reduction(made[name]) if name in made else None for name in self.graph.loss_names}

    def program(self, name: str) -> tuple[SectionProgram, CompiledProgram]:
        if name not in self.compiled:
            twin = next(
                (n for n, p in self.programs.items() if p is self.programs[name] and n in self.compiled), None
            )
            self.compiled[name] = self.compiled[twin] if twin else self.backend.compile(self.programs[name])
        return self.programs[name], self.compiled[name]

    def run(self, name: str, store: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> None:
        """Run program `name` on tensors from `into` or else `store`; write results to `into`."""
        program, compiled = self.program(name)
        args: Sequence[torch.Tensor] = [into[n] if n in into else store[n] for n in program.inputs]
        into.update(zip(program.outputs, compiled(args)))

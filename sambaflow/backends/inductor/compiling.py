"""Compile a section program with TorchInductor: ahead of time into a `.pt2` package, or in-process (JIT)."""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from sambaflow.backends.base import CompiledProgram
from sambaflow.backends.inductor.fingerprint import input_values
from sambaflow.backends.inductor.package import META_KEY, TARGET_KEY
from sambaflow.backends.inductor.scratch import compiler_temporaries
from sambaflow.backends.rewrites import rewrite_for_inductor
from sambaflow.errors import SambaBackendError
from sambaflow.passes.sections import SectionProgram


def compile_package(program: SectionProgram, key: str, for_target: str) -> bytes:
    """torch.export the traced graph, compile it with AOTInductor, return the package bytes."""
    from torch._inductor import aoti_compile_and_package
    from torch.export import export

    examples = _examples(program)
    notes = {META_KEY: key, TARGET_KEY: for_target, "sambaflow_program": program.name}
    configs = {"aot_inductor.metadata": notes, **passes(program)}
    with (
        tempfile.TemporaryDirectory(prefix="sambaflow-aoti-") as tmp,
        warnings.catch_warnings(),
        compiler_temporaries(),
    ):
        warnings.simplefilter("ignore", FutureWarning)
        try:
            exported = export(prepared(program), tuple(examples), strict=False)
            path = aoti_compile_and_package(
                exported, package_path=os.path.join(tmp, f"{program.name}.pt2"), inductor_configs=configs
            )
        except Exception as exc:
            raise SambaBackendError(
                f"inductor: AOT compile of program '{program.name}' failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); use backend 'reference'"
            ) from exc
        return Path(path).read_bytes()


def compile_jit(program: SectionProgram) -> CompiledProgram:
    """Compile in this process with `compile_fx` (no package, Inductor's own caches only)."""
    from torch._inductor.compile_fx import compile_fx

    with warnings.catch_warnings(), torch._inductor.config.patch(passes(program)):
        warnings.simplefilter("ignore", FutureWarning)
        compiled = compile_fx(prepared(program), _examples(program))

    def run(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        # compile_fx's wrapper dispatches on subclasses (SambaTensor inputs fail there): pass plain ones
        return compiled(*[t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor) for t in tensors])

    return run


def prepared(program: SectionProgram) -> torch.fx.GraphModule:
    """A copy of the program's graph with the rewrites Inductor needs (`rewrites.py`: `alpha`, tanh)."""
    return rewrite_for_inductor(copy.deepcopy(program.module))


def passes(program: SectionProgram) -> dict[str, Any]:
    """Inductor configuration that adds our post-grad pass (inductor_passes.py).

    A micro-batched program keeps its order: Inductor's locality reordering pulls each
    micro-batch's forward next to the others' (they read the same weights), so all their
    activations were alive at once and the step's peak memory did not fall with -mb (75 MiB at
    every micro-batch size in microbatch_bench; 28 MiB at 4 parts without it, same step time)."""
    from sambaflow.backends.inductor_passes import BlockedBatchSums  # imports Inductor: compile time only

    configs: dict[str, Any] = {"post_grad_custom_post_pass": BlockedBatchSums()}
    if any("microbatch" in node.meta for node in program.module.graph.nodes):
        configs["reorder_for_locality"] = False
    return configs


def _examples(program: SectionProgram) -> list[torch.Tensor]:
    """Fake example inputs (shape, strides, dtype, device; no data): export and Inductor read only
    their layouts, and real ones would be a second copy of the weights and optimizer state while
    compiling (13.2 GiB for a 1.1 B-parameter AdamW step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return [
            torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
            for v in input_values(program)
        ]

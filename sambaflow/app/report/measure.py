"""Run a PEF's programs on made-up inputs for the report: time per section, the step against its
matrix-product floor, peak memory against the graph's estimate, tokens (or samples) per second.

The PEF holds no weights: parameters are small random numbers, optimizer state zeros, integer
inputs zeros (a valid index and label for any model), hyperparameters the compiled defaults. The
timings are those of the compiled programs, whatever the numbers.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from sambaflow.app.cpu_load import busy_warning, cpu_seconds, other_cpu_share
from sambaflow.app.report.facts import with_shapes
from sambaflow.backends.inductor import pool as memory_pool
from sambaflow.backends.registry import get_backend
from sambaflow.errors import SambaArgumentError
from sambaflow.passes.memory import peak_computed_bytes
from sambaflow.passes.sections import FULL_STEP
from sambaflow.pef.file import PefFile
from sambaflow.runtime.executable import Executable
from sambaflow.trace.graph import HYPER, INPUT, OUTPUT_GRAD, STATE, TracedGraph

aten = torch.ops.aten
#: the side of the square float32 matrix product that measures this machine's GEMM rate
GEMM_SIDE = 1024


@dataclass
class Measurement:
    kind: str
    source: str
    section_seconds: dict[str, float]  # median of each section program alone, and "step"
    matmul_flops: int
    gemm_flops_per_s: float
    estimate_bytes: int
    peak_bytes: int | None  # measured: the step's high-water mark above what was held before it
    tokens: int | None  # tokens (2-D integer input) or samples per step
    unit: str  # "tokens" or "samples"
    threads: int
    warning: str | None = None  # other processes took CPU time while timing

    @property
    def step_seconds(self) -> float:
        return self.section_seconds[FULL_STEP]

    @property
    def floor_seconds(self) -> float:
        return self.matmul_flops / self.gemm_flops_per_s if self.gemm_flops_per_s else 0.0


def measure_pef(pef: PefFile, n_iterations: int = 20) -> Measurement:
    """Time every section program alone and the fused step (medians of `n_iterations`)."""
    kind = _kind(pef)
    executable = _executable(pef, kind)
    store = made_up_inputs(executable.graph)
    _run(executable, FULL_STEP, store)  # warm-up: loads binaries, leaves every section's inputs
    sections = [s for s in executable.sections if s in executable.programs]
    names = sections if sections != [FULL_STEP] else []
    samples: dict[str, list[float]] = {name: [] for name in [*names, FULL_STEP]}
    before = cpu_seconds()
    for _ in range(max(1, n_iterations)):
        for name in samples:
            begin = time.perf_counter()
            _run(executable, name, store)
            samples[name].append(time.perf_counter() - begin)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    busy = busy_warning(other_cpu_share(before, cpu_seconds()), torch.get_num_threads())
    _give_back_free_memory()
    peak = step_peak_bytes(lambda: _run(executable, FULL_STEP, store))
    measured = _measurement(pef, kind, f"measured here, median of {n_iterations} runs", medians, peak)
    measured.warning = busy
    return measured


def from_sections_json(pef: PefFile, path: str) -> Measurement:
    """The times a `measure-sections --json FILE` run wrote (peak memory is not in it)."""
    try:
        report = json.loads(Path(path).read_text())
        medians = {str(k): float(v) for k, v in report["median_s"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SambaArgumentError(
            f"--sections-json {path}: expected the JSON `measure-sections --json FILE` writes "
            f'({{"median_s": {{"fwd": ..., "step": ...}}, ...}}); could not read it: {exc}'
        ) from None
    if FULL_STEP not in medians:
        raise SambaArgumentError(f"--sections-json {path}: it has no 'step' time; rerun measure-sections")
    return _measurement(pef, _kind(pef), f"from {path}", medians, None)


def _measurement(
    pef: PefFile, kind: str, source: str, medians: dict[str, float], peak: int | None
) -> Measurement:
    step = with_shapes(pef.program(kind, FULL_STEP).module)
    tokens, unit = work_per_step(pef.graph(kind))
    return Measurement(
        kind,
        source,
        medians,
        matmul_flops(step),
        gemm_rate(),
        peak_computed_bytes(step, fused=_fuses(pef)),
        peak,
        tokens,
        unit,
        torch.get_num_threads(),
    )


def _fuses(pef: PefFile) -> bool:
    """Whether the PEF's programs were compiled by a backend that fuses elementwise chains
    (Inductor), so the memory estimate counts them as it runs them (passes/memory.py)."""
    return pef.manifest.get("target", {}).get("backend", "reference") == "inductor"


def _kind(pef: PefFile) -> str:
    """The graph to time: the training step, else the forward graph; of a cached-generation PEF's
    prompt and token graphs the token graph (what sets the speed of generation)."""
    for kind in ("train", "inference", "token"):
        if kind in pef.kinds:
            return kind
    return pef.kinds[0]


def _executable(pef: PefFile, kind: str) -> Executable:
    graph = pef.graph(kind)
    programs = {name: pef.program(kind, name) for name in pef.entry(kind)["programs"]}
    binaries = {name: pef.binary(kind, name) for name in programs}
    backend = get_backend(pef.manifest.get("target", {}).get("backend", "reference"))
    return Executable.from_binaries(graph, backend, programs, binaries)


def _run(executable: Executable, name: str, store: dict[str, torch.Tensor]) -> None:
    staged: dict[str, torch.Tensor] = {}
    executable.run(name, store, staged)
    store.update(staged)


def made_up_inputs(graph: TracedGraph) -> dict[str, torch.Tensor]:
    """A value for every graph input (see the module docstring)."""
    store = {}
    for spec in graph.inputs:
        if spec.role == HYPER:
            store[spec.name] = torch.tensor(graph.hyper_defaults.get(spec.name, 0.0), dtype=spec.dtype)
        elif spec.role == OUTPUT_GRAD:
            loss = spec.name.removesuffix("__grad") in graph.loss_names
            store[spec.name] = (torch.ones if loss else torch.zeros)(spec.shape, dtype=spec.dtype)
        elif spec.dtype.is_floating_point and spec.role != STATE:
            store[spec.name] = (torch.randn(spec.shape) * 0.02).to(spec.dtype)
        else:
            store[spec.name] = torch.zeros(spec.shape, dtype=spec.dtype)
    return store


def matmul_flops(module: fx.GraphModule) -> int:
    """Multiply-adds x 2 of the matrix products and convolutions in `module` (the rest is cheap
    next to them in most models, so their time at the GEMM rate is a floor for the step)."""
    return sum(_flops(node) for node in module.graph.nodes if node.op == "call_function")


def _flops(node: fx.Node) -> int:
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0
    if node.target in (aten.mm.default, aten.bmm.default):
        return 2 * out.numel() * _shape(node.args[0])[-1]
    if node.target in (aten.addmm.default, aten.baddbmm.default):
        return 2 * out.numel() * _shape(node.args[1])[-1]
    if node.target is aten.convolution.default:
        weight = _shape(node.args[1])
        return 2 * out.numel() * (weight[1] * int(torch.tensor(weight[2:]).prod()) if len(weight) > 2 else 1)
    return 0


def _shape(arg: Any) -> tuple[int, ...]:
    value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else (0,)


def gemm_rate() -> float:
    """This machine's float32 matrix-product rate (flop/s) at torch's thread count: the best of
    5 x 2 products of GEMM_SIDE (smaller ones stay below the peak: 512 measured 4x slower here)."""
    a, b = torch.randn(GEMM_SIDE, GEMM_SIDE), torch.randn(GEMM_SIDE, GEMM_SIDE)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        torch.mm(a, b)
        torch.mm(a, b)
        best = min(best, (time.perf_counter() - begin) / 2)
    return 2 * GEMM_SIDE**3 / best


def _give_back_free_memory() -> None:
    """Return the memory pool's and the C heap's free pages to the system, so a step's buffers
    fault in afresh and show in the high-water mark."""
    memory_pool.release()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its free heap may hide small buffers
        pass


def step_peak_bytes(step: Any) -> int | None:
    """How far one call of `step` raised the process's resident memory above where it was (Linux:
    /proc/self/clear_refs resets the high-water mark); None where that cannot be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
        step()
        return (_status_kb("VmHWM") - before) * 1024
    except (OSError, ValueError):
        return None


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(field)


def work_per_step(graph: TracedGraph) -> tuple[int | None, str]:
    """Tokens per step where an input is a 2-D integer batch (token ids), else samples."""
    inputs = graph.inputs_with_role(INPUT)
    for spec in inputs:
        if not spec.dtype.is_floating_point and len(spec.shape) == 2:
            return spec.shape[0] * spec.shape[1], "tokens"
    for spec in inputs:
        if spec.batch_dim is not None:
            return spec.shape[spec.batch_dim], "samples"
    return None, "samples"

"""The inductor backend: compile a section program with TorchInductor (C++/OpenMP on the CPU).

Two ways to compile, same numerics:

- `export(program) -> bytes` compiles ahead of time with AOTInductor (`torch.export` of the
  traced graph, then `aoti_compile_and_package`) and returns the `.pt2` package, which goes into
  the PEF. `load(program, blob)` turns those bytes into a callable in any process and compiles
  nothing. Packages are cached by fingerprint (graph code, input names/shapes/strides/dtypes,
  torch version, target), so compiling the same graph again is a cache hit.
- `mode="jit"`: `torch._inductor.compile_fx.compile_fx` in this process, no package.

`compile(program)` is `load(program, export(program))` in the default `aot` mode.

The modules, lowest first: `probe` (is Inductor usable, the target: device and CPU vector ISAs),
`fingerprint` (what a package depends on), `package` (the checks on a package's members and
metadata: names that could escape the extraction folder, size, graph, CPU), `folders` (0700
folders, 0600 atomic files, who may write a folder), `cache` (the compile cache, each entry checked
against the SHA-256 its note recorded), `scratch` (this process's private extraction folder),
`loader` (checked extraction, one AOTInductor loader per package per process), `compiling`
(AOTInductor and compile_fx), `worker` and `parallel` (`export_many`: several programs compiling
at once, in worker processes and this one; `SAMBAFLOW_COMPILE_JOBS`), `runner` (calling a loaded
program), `pool` (the memory pool CPU programs run in: big buffers keep their pages between runs;
`SAMBAFLOW_MEMORY_POOL_MB`), `report` (what `export` did).
The trust checks live in `package`, `folders`, `cache` and `loader`.

Before compiling, `prepared` applies `rewrites.py`: `add/sub(..., alpha=a)` as `x + y * a` (Inductor
in torch 2.13 drops `alpha` in `torch.mm(a, b).add(p, alpha=c)` on the CPU) and float32 `tanh` as
an exp-based form (Inductor's SLEEF tanh is ~6x slower than exp); tests/test_inductor_backend.py
keeps these facts checked. Inductor also runs `inductor_passes.BlockedBatchSums` on its post-grad
graph (sums over the batch, e.g. bias gradients, in row blocks).

A loaded program checks input strides (and re-lays out odd ones), not shapes or dtypes: the
runtime checks what users feed. Set AOTI_RUNTIME_CHECK_INPUTS=1 to make the binary check them
too (about 8 µs per call for the seed's step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sambaflow.backends.base import CompiledProgram
from sambaflow.backends.counters import record_compile
from sambaflow.backends.inductor import pool
from sambaflow.backends.inductor.cache import CACHE_ENV, PackageCache, default_cache_dir
from sambaflow.backends.inductor.compiling import compile_jit, compile_package, passes, prepared
from sambaflow.backends.inductor.fingerprint import (
    FORMAT,
    compiler_source_hash,
    digest,
    fingerprint,
    fingerprint_parts,
    input_values,
)
from sambaflow.backends.inductor.loader import load_loader
from sambaflow.backends.inductor.package import check_package, package_device, package_metadata
from sambaflow.backends.inductor.parallel import CompilePool, Job, RemoteTraceback, compile_jobs
from sambaflow.backends.inductor.probe import available, target
from sambaflow.backends.inductor.report import CompileReport
from sambaflow.backends.inductor.runner import boxed_runner, mutated_inputs
from sambaflow.backends.inductor.worker import task_for
from sambaflow.errors import SambaBackendError
from sambaflow.passes.sections import SectionProgram

__all__ = [
    "CACHE_ENV",
    "FORMAT",
    "CompileReport",
    "InductorBackend",
    "PackageCache",
    "available",
    "check_package",
    "compile_jit",
    "compile_package",
    "compiler_source_hash",
    "default_cache_dir",
    "fingerprint",
    "fingerprint_parts",
    "mutated_inputs",
    "package_metadata",
    "passes",
    "prepared",
    "target",
]

log = logging.getLogger("sambaflow.compile")


@dataclass
class ExportPlan:
    """One program's export before compiling: what the cache is keyed on and what it held."""

    program: SectionProgram
    parts: dict[str, Any]
    cached_as: dict[str, Any]
    blob: bytes | None  # the cached package; None: compile it
    status: str
    reason: str
    seconds: float  # spent on the fingerprint and the cache

    @property
    def key(self) -> str:
        return digest(self.parts)

    def compile_here(self) -> tuple[bytes, float]:
        """(package, seconds) compiled in this process."""
        start = time.perf_counter()
        blob = compile_package(self.program, self.key, self.parts["target"])
        return blob, time.perf_counter() - start


_load_loader = load_loader  # the name benchmarks/inductor_probe.py uses


class InductorBackend:
    """`compile`, `export`, `load` of section programs through TorchInductor."""

    name = "inductor"
    device = "cpu"  # sambaflow traces and stores tensors on the CPU today
    fuses_elementwise = True  # memory estimates (passes/memory.py): elementwise chains are not stored

    def __init__(
        self, cache_dir: str | Path | None = None, *, use_cache: bool = True, mode: str = "aot"
    ) -> None:
        if mode not in ("aot", "jit"):
            raise SambaBackendError(f"inductor: mode must be 'aot' or 'jit', got {mode!r}")
        self.cache = PackageCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        self.use_cache = use_cache
        self.mode = mode
        self.reports: list[CompileReport] = []

    available = staticmethod(available)

    @property
    def last_report(self) -> CompileReport | None:
        return self.reports[-1] if self.reports else None

    def compile(self, program: SectionProgram) -> CompiledProgram:
        if self.mode == "jit":
            record_compile(self.name, program.name)
            on_cpu = all(v.device.type == "cpu" for v in input_values(program))
            return pool.wrap(compile_jit(program), on_cpu=on_cpu)
        return self.load(program, self.export(program))

    def export(self, program: SectionProgram) -> bytes:
        """The AOTInductor `.pt2` package for `program`, from the cache when the fingerprint matches."""
        plan = self._plan(program)
        return self._finish(plan, *(plan.compile_here() if plan.blob is None else (plan.blob, 0.0)))

    def export_many(
        self, programs: dict[str, SectionProgram], on_program: Callable[[str], None] | None = None
    ) -> dict[str, bytes]:
        """`export` of every program, several compiling at once (parallel.py). `on_program(name)`
        calls, reports and cache entries come in the programs' order, as from one `export` after
        another."""
        notify = on_program or (lambda name: None)
        packages: dict[str, bytes] = {}
        if compile_jobs() == 1:  # one after another in this process
            for name, program in programs.items():
                notify(name)
                packages[name] = self.export(program)
            return packages
        plans = {name: self._plan(program) for name, program in programs.items()}
        jobs = [_job(name, plan) for name, plan in plans.items() if plan.blob is None]

        def here(name: str) -> tuple[str, bytes, float]:
            return ("ok", *plans[name].compile_here())

        # this process compiles too, so one job fewer in workers
        with CompilePool(jobs, min(compile_jobs(), len(jobs)) - 1, here) as pool:
            for name, plan in plans.items():
                notify(name)
                packages[name] = self._finish(plan, *_awaited(pool, name, plan))
        return packages

    def _plan(self, program: SectionProgram) -> ExportPlan:
        record_compile(self.name, program.name)
        start = time.perf_counter()
        parts = fingerprint_parts(program)
        # The cache also keys on our rewrite/pass sources; the package's own fingerprint does not,
        # so a PEF keeps loading after they change.
        # Inductor also writes the thread count into the C++ it generates (its parallel loops).
        cached_as = {**parts, "compiler": compiler_source_hash(), "threads": torch.get_num_threads()}
        blob, status, reason = self._from_cache(program.name, cached_as)
        return ExportPlan(program, parts, cached_as, blob, status, reason, time.perf_counter() - start)

    def _finish(self, plan: ExportPlan, blob: bytes, seconds: float) -> bytes:
        """Store a compiled package in the cache and report the export."""
        reason = plan.reason
        if plan.blob is None and plan.status == "miss":
            stored = self.cache.put(digest(plan.cached_as), plan.program.name, plan.cached_as, blob)
            reason += "; " + (stored or f"stored in {self.cache.root}")
        seconds += plan.seconds
        self._report(CompileReport(plan.program.name, plan.key, plan.status, reason, seconds, len(blob)))
        return blob

    def load(self, program: SectionProgram, blob: bytes) -> CompiledProgram:
        """A callable from a package made by `export`; checks it fits `program`, compiles nothing.

        Loading the same bytes again reuses this process's loader for them (loader.py).
        """
        meta = check_package(program, blob)
        loader = load_loader(blob)
        run = boxed_runner(loader.boxed_run, input_values(program), mutated_inputs(program))
        # the package's device, not the inputs': a graph read from a PEF has meta example values
        return pool.wrap(run, on_cpu=package_device(meta) == "cpu")

    def _from_cache(self, name: str, cached_as: dict[str, Any]) -> tuple[bytes | None, str, str]:
        """(package or None, "hit" / "miss" / "off", why)."""
        if not self.use_cache:
            return None, "off", "cache off"
        refused = self.cache.refused()
        if refused is not None:
            log.warning("inductor: %s", refused)
            return None, "off", refused + "; compiling without the cache"
        blob, reason = self.cache.get(digest(cached_as), name, cached_as)
        return blob, ("hit" if blob is not None else "miss"), reason

    def _report(self, report: CompileReport) -> None:
        self.reports.append(report)
        log.info(report.as_text())


def _job(name: str, plan: ExportPlan) -> Job:
    try:
        task = task_for(plan.program, plan.key, plan.parts["target"])
    except Exception as exc:  # noqa: BLE001 - whatever does not pickle compiles in this process
        log.info("inductor: '%s' compiles in this process (%s: %s)", name, type(exc).__name__, exc)
        task = None
    return Job(name, task, size=len(plan.program.module.graph.nodes))


def _awaited(pool: CompilePool, name: str, plan: ExportPlan) -> tuple[bytes, float]:
    """(package, compile seconds): the cached one, or the pool's; a failed compile raises here."""
    if plan.blob is not None:
        return plan.blob, 0.0
    outcome, value, detail = pool.result(name)
    if outcome != "ok":
        raise SambaBackendError(value) from (RemoteTraceback(detail) if detail else None)
    return value, detail

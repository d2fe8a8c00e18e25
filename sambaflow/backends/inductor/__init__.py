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
(AOTInductor and compile_fx), `runner` (calling a loaded program), `report` (what `export` did).
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
from pathlib import Path
from typing import Any

import torch

from sambaflow.backends.base import CompiledProgram
from sambaflow.backends.counters import record_compile
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
from sambaflow.backends.inductor.package import check_package, package_metadata
from sambaflow.backends.inductor.probe import available, target
from sambaflow.backends.inductor.report import CompileReport
from sambaflow.backends.inductor.runner import boxed_runner, mutated_inputs
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
_load_loader = load_loader  # the name benchmarks/inductor_probe.py uses


class InductorBackend:
    """`compile`, `export`, `load` of section programs through TorchInductor."""

    name = "inductor"
    device = "cpu"  # sambaflow traces and stores tensors on the CPU today

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
            return compile_jit(program)
        return self.load(program, self.export(program))

    def export(self, program: SectionProgram) -> bytes:
        """The AOTInductor `.pt2` package for `program`, from the cache when the fingerprint matches."""
        record_compile(self.name, program.name)
        start = time.perf_counter()
        parts = fingerprint_parts(program)
        key = digest(parts)
        # The cache also keys on our rewrite/pass sources; the package's own fingerprint does not,
        # so a PEF keeps loading after they change.
        # Inductor also writes the thread count into the C++ it generates (its parallel loops).
        cached_as = {**parts, "compiler": compiler_source_hash(), "threads": torch.get_num_threads()}
        blob, status, reason = self._from_cache(program.name, cached_as)
        if blob is None:
            blob = compile_package(program, key, parts["target"])
            if status == "miss":
                stored = self.cache.put(digest(cached_as), program.name, cached_as, blob)
                reason += "; " + (stored or f"stored in {self.cache.root}")
        self._report(CompileReport(program.name, key, status, reason, time.perf_counter() - start, len(blob)))
        return blob

    def load(self, program: SectionProgram, blob: bytes) -> CompiledProgram:
        """A callable from a package made by `export`; checks it fits `program`, compiles nothing.

        Loading the same bytes again reuses this process's loader for them (loader.py).
        """
        check_package(program, blob)
        loader = load_loader(blob)
        return boxed_runner(loader.boxed_run, input_values(program), mutated_inputs(program))

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

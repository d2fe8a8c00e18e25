"""The inductor backend: compile a section program with TorchInductor (C++/OpenMP on the CPU).

Two ways to compile, same numerics:

- `export(program) -> bytes` compiles ahead of time with AOTInductor (`torch.export` of the
  traced graph, then `aoti_compile_and_package`) and returns the `.pt2` package, which goes into
  the PEF. `load(program, blob)` turns those bytes into a callable in any process and compiles
  nothing. Packages are cached by fingerprint (graph code, input names/shapes/strides/dtypes,
  torch version, target), so compiling the same graph again is a cache hit.
- `mode="jit"`: `torch._inductor.compile_fx.compile_fx` in this process, no package.

`compile(program)` is `load(program, export(program))` in the default `aot` mode.

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

import copy
import functools
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sambaflow.backends.base import CompiledProgram
from sambaflow.backends.counters import record_compile
from sambaflow.backends.rewrites import rewrite_for_inductor
from sambaflow.errors import SambaBackendError
from sambaflow.passes.sections import SectionProgram

log = logging.getLogger("sambaflow.compile")

#: bump when what `export` writes changes (the package layout or metadata); changes to the passes
#: are caught by `compiler_source_hash` in the cache key
FORMAT = "sambaflow-inductor-3"
CACHE_ENV = "SAMBAFLOW_CACHE_DIR"
_MODEL = "model"
_META_KEY = "sambaflow_fingerprint"
_TARGET_KEY = "sambaflow_target"


# --- availability and target ---------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """(usable, reason): whether TorchInductor and a working C++ compiler are here."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except Exception as exc:  # pragma: no cover - depends on the torch build
        return False, f"TorchInductor cannot be imported ({type(exc).__name__}: {exc})"
    try:
        compiler = get_cpp_compiler()
    except Exception as exc:
        return False, f"no C++ compiler for TorchInductor ({exc}); install g++ or set CXX"
    return _compiler_works(compiler)


def _compiler_works(compiler: str) -> tuple[bool, str]:
    path = shutil.which(compiler)
    if path is None:
        return False, f"the C++ compiler '{compiler}' is not on PATH; install g++ or set CXX"
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"the C++ compiler {path} does not run ({exc})"
    if done.returncode != 0:
        return False, f"the C++ compiler {path} does not run: {done.stderr.strip()[:200]}"
    version = (done.stdout.splitlines() or ["?"])[0]
    return True, f"TorchInductor (torch {torch.__version__}) with {version}"


def target(device: str = "cpu") -> str:
    """What a compiled binary is specific to: `cpu-<vector ISAs>` or `cuda-sm<major><minor>`.

    From cpuinfo, so it costs microseconds (Inductor's pick_vec_isa compiles probes: 1-8 s).
    """
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability()
        return f"cuda-sm{major}{minor}"
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return "cpu-" + ("+".join(sorted(_cpu_features())) or "novec") + (f"-{forced}" if forced else "")


# --- fingerprint -----------------------------------------------------------------------------
def fingerprint_parts(program: SectionProgram, for_target: str | None = None) -> dict[str, Any]:
    """Everything a compiled binary depends on, readable (the cache explains misses with it).

    `for_target`: the target a package says it was built for (to check a package on another machine).
    """
    return {
        "graph": _graph_hash(program.module),
        "inputs": [f"{name} {_layout_text(v)}" for name, v in zip(program.inputs, _input_values(program))],
        "outputs": list(program.outputs),
        "torch": torch.__version__,
        "target": for_target or target(_device_of(program)),
        "format": FORMAT,
    }


def fingerprint(program: SectionProgram, for_target: str | None = None) -> str:
    return _digest(fingerprint_parts(program, for_target))


@functools.lru_cache(maxsize=1)
def compiler_source_hash() -> str:
    """What our side of a compile depends on: this backend, its ATen rewrites and Inductor pass."""
    folder = Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("inductor.py", "rewrites.py", "inductor_passes.py"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _graph_hash(module: torch.fx.GraphModule) -> str:
    digest = hashlib.sha256(module.code.encode())
    for node in module.graph.nodes:
        if node.op == "get_attr":  # constants are not in the code text
            value = getattr(module, node.target)
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _input_values(program: SectionProgram) -> list[torch.Tensor]:
    placeholders = [n for n in program.module.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("val") for n in placeholders]
    missing = [name for name, v in zip(program.inputs, values) if not isinstance(v, torch.Tensor)]
    if missing or len(values) != len(program.inputs):
        raise SambaBackendError(
            f"inductor: program '{program.name}' has inputs without shape metadata {missing}; "
            "compile graphs traced by sambaflow.trace (make_fx records it), or use backend 'reference'"
        )
    return values


def _layout_text(value: torch.Tensor) -> str:
    dtype = str(value.dtype).replace("torch.", "")
    return f"{list(value.shape)} stride {list(value.stride())} {dtype}"


def _device_of(program: SectionProgram) -> str:
    # Graphs read back from a PEF carry storage-less ("meta") layouts and the device by name.
    placeholders = [n for n in program.module.graph.nodes if n.op == "placeholder"]
    devices = {n.meta.get("device") or n.meta["val"].device.type for n in placeholders if "val" in n.meta}
    return "cuda" if "cuda" in devices else "cpu"


# --- reports and cache ------------------------------------------------------------------------
@dataclass
class CompileReport:
    """One `export`: cache hit or miss and why, time spent, package size."""

    program: str
    fingerprint: str
    cache: str  # "hit", "miss" or "off"
    reason: str
    seconds: float
    size: int

    def as_text(self) -> str:
        return (
            f"inductor '{self.program}': cache {self.cache} ({self.reason}); "
            f"{self.seconds:.2f} s, package {self.size / 1e6:.1f} MB, fingerprint {self.fingerprint}"
        )


def default_cache_dir() -> Path:
    """`$SAMBAFLOW_CACHE_DIR/inductor`, else `~/.cache/sambaflow/inductor`."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "sambaflow"
    return base / "inductor"


class PackageCache:
    """`.pt2` packages by fingerprint, each with a JSON note of what it was compiled from."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str, name: str, parts: dict[str, Any]) -> tuple[bytes | None, str]:
        path = self.root / f"{key}.pt2"
        if not path.exists():
            return None, self._why_missing(name, parts)
        try:
            blob = path.read_bytes()
            _package_members(blob)
        except (OSError, SambaBackendError) as exc:
            return None, f"cached package {path} is unreadable ({exc}); recompiling"
        return blob, f"same graph, inputs, torch and target as {path}"

    def put(self, key: str, name: str, parts: dict[str, Any], blob: bytes) -> str | None:
        """Store atomically; returns a warning instead of failing when the cache is unwritable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.root / f"{key}.pt2", blob)
            note = {"program": name, "parts": parts, "created": time.time()}
            _write_atomic(self.root / f"{key}.json", json.dumps(note, indent=1).encode())
        except OSError as exc:
            return f"could not write the compile cache {self.root}: {exc}"
        return None

    def _why_missing(self, name: str, parts: dict[str, Any]) -> str:
        previous = self._latest_note(name)
        if previous is None:
            return f"no package for program '{name}' in {self.root} yet"
        changed = [
            _difference(k, previous["parts"].get(k), v)
            for k, v in parts.items()
            if previous["parts"].get(k) != v
        ]
        return (
            f"no cached package matches; the newest cached '{name}' program (perhaps another "
            f"model's) differs: " + "; ".join(changed)
        )

    def _latest_note(self, name: str) -> dict[str, Any] | None:
        notes = []
        for path in self.root.glob("*.json") if self.root.is_dir() else []:
            try:
                note = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if note.get("program") == name and isinstance(note.get("parts"), dict):
                notes.append(note)
        return max(notes, key=lambda n: n.get("created", 0), default=None)


def _difference(key: str, old: Any, new: Any) -> str:
    if key == "graph":
        return "the graph changed"
    if key == "compiler":
        return "sambaflow's inductor backend (its rewrites or passes) changed"
    if key == "threads":
        return f"compiled for {old} threads, now {new} (torch.get_num_threads(), e.g. OMP_NUM_THREADS)"
    if isinstance(old, list) and isinstance(new, list):
        pairs = [(a, b) for a, b in zip(old, new) if a != b]
        if pairs:
            return f"{key}: {pairs[0][0]} -> {pairs[0][1]}" + (
                f" (+{len(pairs) - 1} more)" if len(pairs) > 1 else ""
            )
        return f"{key}: {len(old)} -> {len(new)} entries"
    return f"{key}: {old} -> {new}"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- package checks ---------------------------------------------------------------------------
def _package_members(blob: bytes) -> list[str]:
    """Member names; the package must hold a compiled library, so loading compiles nothing."""
    try:
        names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
    except zipfile.BadZipFile as exc:
        raise SambaBackendError(f"inductor: not an AOTInductor package ({exc})") from None
    if not any(n.endswith(".so") and f"/aotinductor/{_MODEL}/" in n for n in names):
        raise SambaBackendError(
            "inductor: the package holds no compiled library (.so); "
            "it would need compiling at load time. Recompile the PEF."
        )
    return names


def package_metadata(blob: bytes) -> dict[str, str]:
    """The metadata AOTInductor wrote next to the library (target ISA, our fingerprint)."""
    names = _package_members(blob)
    found = [n for n in names if n.endswith("wrapper_metadata.json") and f"/aotinductor/{_MODEL}/" in n]
    if not found:
        return {}
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return json.loads(archive.read(found[0]))


def check_package(program: SectionProgram, blob: bytes) -> None:
    """Refuse a package built for another program, another graph, or a CPU this one lacks."""
    meta = package_metadata(blob)
    if _META_KEY not in meta or _TARGET_KEY not in meta:
        raise SambaBackendError(
            f"inductor: the package for '{program.name}' was not made by this version of sambaflow's "
            "inductor backend (no fingerprint in it); recompile the PEF"
        )
    expected = fingerprint(program, meta[_TARGET_KEY])
    if meta.get(_META_KEY) != expected:
        raise SambaBackendError(
            f"inductor: the package for '{program.name}' was compiled from another graph or input "
            f"layout (fingerprint {meta.get(_META_KEY)}, this program {expected}); recompile the PEF"
        )
    _check_isa(program, meta)


def _check_isa(program: SectionProgram, meta: dict[str, str]) -> None:
    device = meta.get("AOTI_DEVICE_KEY", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SambaBackendError(
            f"inductor: '{program.name}' was compiled for CUDA and this machine has no GPU"
        )
    if device == "cpu":
        needed = set(meta.get("AOTI_CPU_ISA", "").lower().split())
        missing = needed - _cpu_features()
        if missing:
            raise SambaBackendError(
                f"inductor: '{program.name}' was compiled for a CPU with {sorted(needed)}; this CPU "
                f"lacks {sorted(missing)}. Recompile the PEF on this machine."
            )


def _cpu_features() -> set[str]:
    """Vector ISAs this CPU has, named as Inductor names them, from cpuinfo (no compiler probe)."""
    if platform.machine() in ("x86_64", "AMD64"):
        checks = {
            "avx2": "_is_avx2_supported",
            "avx512": "_is_avx512_supported",
            "avx512_vnni": "_is_vnni_supported",
            "amx_tile": "_is_amx_tile_supported",
        }
        found = {isa for isa, fn in checks.items() if getattr(torch.cpu, fn, lambda: False)()}
        return found - {"avx512_vnni"} if "avx512" not in found else found
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return {word for isa in valid_vec_isa_list() for word in str(isa).split()}


# --- the backend ------------------------------------------------------------------------------
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
        key = _digest(parts)
        # The cache also keys on our rewrite/pass sources; the package's own fingerprint does not,
        # so a PEF keeps loading after they change.
        # Inductor also writes the thread count into the C++ it generates (its parallel loops).
        cached_as = {**parts, "compiler": compiler_source_hash(), "threads": torch.get_num_threads()}
        cache_key = _digest(cached_as)
        blob, reason = (
            self.cache.get(cache_key, program.name, cached_as) if self.use_cache else (None, "cache off")
        )
        hit = blob is not None
        if blob is None:
            blob = compile_package(program, key, parts["target"])
            if self.use_cache:
                reason += "; " + (
                    self.cache.put(cache_key, program.name, cached_as, blob) or f"stored in {self.cache.root}"
                )
        status = "hit" if hit else ("miss" if self.use_cache else "off")
        self._report(CompileReport(program.name, key, status, reason, time.perf_counter() - start, len(blob)))
        return blob

    def load(self, program: SectionProgram, blob: bytes) -> CompiledProgram:
        """A callable from a package made by `export`; checks it fits `program`, compiles nothing."""
        check_package(program, blob)
        loader = _load_loader(blob)
        return _boxed_runner(loader.boxed_run, _input_values(program), mutated_inputs(program))

    def _report(self, report: CompileReport) -> None:
        self.reports.append(report)
        log.info(report.as_text())


def compile_package(program: SectionProgram, key: str, for_target: str) -> bytes:
    """torch.export the traced graph, compile it with AOTInductor, return the package bytes."""
    from torch._inductor import aoti_compile_and_package
    from torch.export import export

    examples = _examples(program)
    notes = {_META_KEY: key, _TARGET_KEY: for_target, "sambaflow_program": program.name}
    configs = {"aot_inductor.metadata": notes, **passes()}
    with tempfile.TemporaryDirectory(prefix="sambaflow-aoti-") as tmp, warnings.catch_warnings():
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

    with warnings.catch_warnings(), torch._inductor.config.patch(passes()):
        warnings.simplefilter("ignore", FutureWarning)
        compiled = compile_fx(prepared(program), _examples(program))

    def run(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        return compiled(*tensors)

    return run


def prepared(program: SectionProgram) -> torch.fx.GraphModule:
    """A copy of the program's graph with the rewrites Inductor needs (`rewrites.py`: `alpha`, tanh)."""
    return rewrite_for_inductor(copy.deepcopy(program.module))


def passes() -> dict[str, Any]:
    """Inductor configuration that adds our post-grad pass (inductor_passes.py)."""
    from sambaflow.backends.inductor_passes import BlockedBatchSums  # imports Inductor: compile time only

    return {"post_grad_custom_post_pass": BlockedBatchSums()}


def _examples(program: SectionProgram) -> list[torch.Tensor]:
    return [
        torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).zero_()
        for v in _input_values(program)
    ]


def _load_loader(blob: bytes) -> Any:
    """AOTInductor's package loader. It extracts the library, so the file can go right after."""
    fd, path = tempfile.mkstemp(suffix=".pt2", prefix="sambaflow-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        package_loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
        if package_loader is None:  # pragma: no cover - older/newer torch: public, slower first call
            from torch._inductor import aoti_load_package

            return aoti_load_package(path).loader
        # The raw loader: torch._inductor.aoti_load_package costs ~2 s of imports on first use.
        return package_loader(path, _MODEL, False, 1, -1)
    finally:
        os.unlink(path)


def _same_layout(tensor: torch.Tensor, stride: tuple[int, ...]) -> bool:
    """Strides that differ only on dimensions of size 1 address the same elements."""
    return all(n == 1 or a == b for n, a, b in zip(tensor.shape, tensor.stride(), stride))


def mutated_inputs(program: SectionProgram) -> list[int]:
    """Positions of the inputs the graph writes into (e.g. after passes.inplace)."""
    placeholders = [n for n in program.module.graph.nodes if n.op == "placeholder"]
    written = set()
    for node in program.module.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is not None and schema.is_mutable:
            written.update(
                a
                for a, arg in zip(node.args, schema.arguments)
                if isinstance(a, torch.fx.Node) and arg.is_write
            )
    return [i for i, node in enumerate(placeholders) if node in written]


def _boxed_runner(
    boxed_run: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    values: list[torch.Tensor],
    mutated: list[int],
) -> CompiledProgram:
    """Call the compiled step on a fresh list (boxed_run empties it); re-lay out odd inputs.

    The binary reads each input at the strides it was compiled for and does not check them
    (unless AOTI_RUNTIME_CHECK_INPUTS=1), so a tensor with other strides is copied first, and
    copied back afterwards if the program writes into it.
    """
    strides = [v.stride() for v in values]
    if all(v.is_contiguous() for v in values):
        is_contiguous = torch.Tensor.is_contiguous

        def laid_out(args: list[torch.Tensor]) -> bool:  # ~1.5 µs for 27 inputs
            return all(map(is_contiguous, args))
    else:
        stride_of = torch.Tensor.stride

        def laid_out(args: list[torch.Tensor]) -> bool:  # ~2.5 µs for 27 inputs
            return list(map(stride_of, args)) == strides

    def run(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        args = list(tensors)
        if len(args) == len(strides) and laid_out(args):
            return boxed_run(args)
        return _relaid_run(boxed_run, args, strides, mutated)

    return run


def _relaid_run(boxed_run: Callable, args: list[torch.Tensor], strides: list, mutated: list[int]) -> Any:
    if len(args) != len(strides):
        raise SambaBackendError(f"inductor: the program takes {len(strides)} tensors, given {len(args)}")
    originals = list(args)
    moved = [i for i, (t, s) in enumerate(zip(args, strides)) if t.stride() != s and not _same_layout(t, s)]
    for i in moved:
        t = args[i]
        args[i] = torch.empty_strided(t.shape, strides[i], dtype=t.dtype, device=t.device).copy_(t)
    written = [(originals[i], args[i]) for i in mutated if i in moved]
    outputs = boxed_run(args)
    for original, value in written:
        original.copy_(value)
    return outputs

"""The memory pool of compiled CPU programs: big buffers keep their pages from one run to the next.

A compiled step allocates its large buffers (logits, their gradients, activations) afresh on
every run, and torch's CPU allocator gives each back to the system when it is freed: the next run
faults every page in again. On the 2-core machine here that kernel work was a third of the tiny
GPT-2 step (152 ms, 102 ms with the pool), and greedy generation ran at about half the speed
it has with the pool.
`pool.cpp` is an allocator in front of torch's: inside a program run (`wrap`), allocations of
1 MiB or more come from memory it keeps mapped, best-fit, split and merged, so a step's buffers
reuse the previous step's pages and the peak stays where torch's allocator has it. Outside runs
(eager PyTorch in the same process, the host side of the app) nothing changes.

The pool holds freed memory up to a cap, `SAMBAFLOW_MEMORY_POOL_MB` (default a quarter of the
machine's memory; `0` turns the pool off). The library is built from `pool.cpp` with the C++
compiler Inductor uses, once per cache folder: `<cache>/inductor/runtime/pool-<key>.so` with a
note of its SHA-256, checked (like a cached package) before the copy in this process's private
folder is loaded. Without a compiler, programs run as before and the compile log says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

import torch

from sambaflow.backends.inductor.cache import default_cache_dir
from sambaflow.backends.inductor.folders import make_private_folder, write_private
from sambaflow.backends.inductor.scratch import private_folder

log = logging.getLogger("sambaflow.compile")
ENV = "SAMBAFLOW_MEMORY_POOL_MB"
SOURCE = Path(__file__).with_name("pool.cpp")
MIN_BYTES = 1 << 20  # smaller blocks stay in glibc's heap, which already keeps them
_lock = threading.Lock()
_library: ctypes.PyDLL | None = None
_tried = False
_reason = "not needed yet"
_cap = 0  # the cap the pool was installed with

Run = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


def wrap(run: Run, on_cpu: bool) -> Run:
    """`run` with its allocations taken from the pool, for a program compiled for the CPU (on a
    GPU, torch's caching allocator already keeps memory); others come back as they are."""
    library = _pool() if on_cpu else None
    if library is None:
        return run
    enter, leave = library.sambaflow_pool_enter, library.sambaflow_pool_exit

    def pooled(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        enter()
        try:
            return run(tensors)
        finally:
            leave()

    return pooled


def stats() -> dict[str, int] | None:
    """What the pool holds (None when it is off or not built): bytes, free bytes, blocks lent, hits, misses."""
    if _library is None:
        return None
    values = (ctypes.c_size_t * 5)()
    _library.sambaflow_pool_stats(values)
    return dict(zip(("bytes", "free_bytes", "lent", "hits", "misses"), values))


def release() -> int:
    """Give the pool's free memory back to the system now; returns the bytes it still holds (lent)."""
    return int(_library.sambaflow_pool_release()) if _library is not None else 0


def status() -> str:
    """One line for logs: on (with its cap) or why not."""
    return (
        f"memory pool on (keeps up to {_cap >> 20} MiB free)" if _library else f"memory pool off: {_reason}"
    )


def cap_bytes() -> int:
    """The most freed memory the pool keeps, from SAMBAFLOW_MEMORY_POOL_MB (0: off)."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size // 4
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise ValueError(f"{ENV}={text!r}: expected a whole number of MiB (0 turns the memory pool off)")
    return megabytes << 20


def _pool() -> ctypes.PyDLL | None:
    """The installed pool library, built or loaded on first use; None when off or unavailable."""
    global _library, _tried, _reason, _cap
    with _lock:
        if not _tried:
            cap = cap_bytes()  # a bad value is the user's error, raised at every load until fixed
            _tried = True
            if cap == 0:
                _reason = f"{ENV}=0"
            else:
                try:
                    _library, _cap = _install(_load(), cap), cap
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _reason = str(exc)
                    log.warning("inductor: %s; compiled programs run without it", status())
    return _library


def _install(library: ctypes.PyDLL, cap: int) -> ctypes.PyDLL:
    library.sambaflow_pool_install.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    library.sambaflow_pool_release.restype = ctypes.c_size_t
    if library.sambaflow_pool_install(MIN_BYTES, cap) != 1:
        raise RuntimeError("another CPU allocator with a higher priority is installed")
    return library


def _load() -> ctypes.PyDLL:
    """Load the library: the cached build when its SHA-256 matches its note, else a new build."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the memory pool is built for Linux only (this is {sys.platform})")
    key = _key()
    local = private_folder() / f"pool-{key}.so"
    cached = _cached(key)
    if cached is not None:
        write_private(local, cached)
    else:
        _build(local)
        _store(key, local.read_bytes())
    # PyDLL: the calls are a few instructions; holding the GIL is cheaper than releasing it
    return ctypes.PyDLL(str(local))


def _key() -> str:
    """What a build depends on: our source, the torch it links against, the C++ ABI."""
    parts = [SOURCE.read_bytes(), torch.__version__.encode(), str(_torch_dir()).encode()]
    parts.append(str(torch._C._GLIBCXX_USE_CXX11_ABI).encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:24]


def _runtime_folder() -> Path | None:
    folder = default_cache_dir() / "runtime"
    reason = make_private_folder(folder)
    if reason is not None:
        log.info("inductor: memory pool not cached (%s)", reason)
        return None
    return folder


def _cached(key: str) -> bytes | None:
    """The cached build's bytes if its note's SHA-256 matches them (logged and ignored otherwise)."""
    folder = _runtime_folder()
    if folder is None or not (folder / f"pool-{key}.so").exists():
        return None
    try:
        note = json.loads((folder / f"pool-{key}.json").read_text())
        blob = (folder / f"pool-{key}.so").read_bytes()
    except (OSError, ValueError) as exc:
        log.warning("inductor: cached memory pool in %s ignored (%s); rebuilding", folder, exc)
        return None
    if not isinstance(note, dict) or note.get("sha256") != hashlib.sha256(blob).hexdigest():
        log.warning(
            "inductor: cached memory pool pool-%s.so in %s does not match its note; rebuilding", key, folder
        )
        return None
    return blob


def _store(key: str, blob: bytes) -> None:
    folder = _runtime_folder()
    if folder is None:
        return
    note = {"source": SOURCE.name, "torch": torch.__version__, "sha256": hashlib.sha256(blob).hexdigest()}
    try:
        write_private(folder / f"pool-{key}.so", blob)
        write_private(folder / f"pool-{key}.json", json.dumps(note, indent=1).encode())
    except OSError as exc:
        log.info("inductor: memory pool not cached (%s)", exc)


def _build(target: Path) -> None:
    compiler = _compiler()
    torch_dir = _torch_dir()
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    command = [
        compiler, "-O2", "-shared", "-fPIC", "-std=c++17",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", str(SOURCE), f"-L{torch_dir / 'lib'}", "-lc10",
        f"-Wl,-rpath,{torch_dir / 'lib'}", "-Wl,-z,nodelete", "-o", str(temporary),
    ]  # fmt: skip
    log.info("inductor: building the memory pool: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        first = (done.stderr.strip().splitlines() or ["no message"])[0][:300]
        raise RuntimeError(f"the memory pool did not build with {compiler} ({first})")
    os.chmod(temporary, 0o600)
    os.replace(temporary, target)


def _compiler() -> str:
    """The C++ compiler Inductor would use: $CXX, else c++ / g++ / clang++ on PATH."""
    wanted = os.environ.get("CXX")
    candidates = [wanted] if wanted else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path is not None:
            return path
    raise RuntimeError(
        f"no C++ compiler ({' or '.join(candidates)} not found on PATH); install g++ or set CXX"
    )


def _torch_dir() -> Path:
    return Path(torch.__file__).resolve().parent

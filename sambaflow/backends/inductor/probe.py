"""Is TorchInductor usable here, and what is a compiled binary specific to (device, CPU vector ISAs)."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess

import torch


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
    return "cpu-" + ("+".join(sorted(cpu_features())) or "novec") + (f"-{forced}" if forced else "")


def cpu_features() -> set[str]:
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

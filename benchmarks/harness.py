"""What every benchmark here shares: interleaved timing of variants in one process, summaries and
ratios, the share of the CPUs other processes took, peak memory in a fresh process, the machine,
and a TARGETS block.

Method: each variant is a `Step` (a callable taking the step number). `warm_up` runs each a few
times for an estimate; `measure` then runs them in rounds, `block` steps of one variant after
another, the order rotating every round, with the garbage collector off, so that a noisy machine
slows every variant alike. Only ratios from the same run count.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sambaflow.app.cpu_load import cpu_seconds, other_cpu_share

Step = Callable[[int], Any]
OTHER_CPU_WARN = 0.03
T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- timing -----------------------------------------------------------------------------------------
def warm_up(steps: dict[str, Step], count: int, seconds: float) -> dict[str, float]:
    """Run each variant `count` steps (at most about `seconds` each); return a per-step estimate."""
    estimate = {}
    for name, step in steps.items():
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < count and (len(times) < 3 or time.perf_counter() - started < seconds):
            t = time.perf_counter()
            step(3 + len(times))
            times.append(time.perf_counter() - t)
        estimate[name] = statistics.median(times[len(times) // 2 :])
    return estimate


def measure(steps: dict[str, Step], rounds: int, block: int) -> dict[str, list[float]]:
    """Seconds per step of each variant: `rounds` rounds of `block` steps each, interleaved."""
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    position = dict.fromkeys(names, 0)
    clock = time.perf_counter
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                step, out, first = steps[name], samples[name], position[name]
                for i in range(first, first + block):
                    t = clock()
                    step(i)
                    out.append(clock() - t)
                position[name] = first + block
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {
        "median_us": statistics.median(times) * 1e6,
        "p10_us": q[0] * 1e6,
        "p90_us": q[-1] * 1e6,
        "mean_us": statistics.fmean(times) * 1e6,
        "n": len(times),
    }


def timed(what: str, steps: dict[str, Step], rounds: int, block: int, warmup: int = 2) -> dict[str, Any]:
    """Warm up, then measure interleaved; per variant a summary, and the CPU share others took."""
    estimate = warm_up(steps, warmup, 0.0)
    say(
        f"{what}: timing {rounds} rounds x {block} per variant, interleaved (about "
        f"{rounds * block * sum(estimate.values()):.0f} s; warm-up "
        + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in estimate.items())
        + ")"
    )
    before = cpu_seconds()
    samples = measure(steps, rounds, block)
    busy = other_cpu_share(before, cpu_seconds())
    if busy > OTHER_CPU_WARN:
        say(f"WARNING: other processes took {busy:.0%} of the CPUs while timing {what}")
    timing = {n: summary(t) for n, t in samples.items()}
    return {"timing": timing, "rounds": rounds, "block": block, "other_cpu": busy}


def medians(phase: dict) -> dict[str, float]:
    return {n: t["median_us"] for n, t in phase.get("timing", {}).items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --- memory -----------------------------------------------------------------------------------------
def proc_status_kb(*keys: str) -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in keys}


def settle() -> None:
    """Free what can be freed and give the heap's free pages back, so RSS counts live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> None:
    """From here on VmHWM is the peak RSS (Linux: writing 5 to clear_refs resets it)."""
    Path("/proc/self/clear_refs").write_text("5")


def report_memory(report: dict[str, Any]) -> None:
    """A memory child's result, read back by `run_memory_child`."""
    print("MEMORY " + json.dumps(report), flush=True)


def run_memory_child(argv: list[str], cwd: Path | None = None) -> dict[str, Any]:
    """Run `python argv...` in a fresh process; its `report_memory` dict, or {'error': stderr}."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY ")]
    if done.returncode != 0 or not lines:
        say(f"memory subprocess failed:\n{done.stderr[-2000:]}")
        return {"error": done.stderr[-2000:]}
    return json.loads(lines[-1][len("MEMORY ") :])


# --- the machine and the targets ----------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


@dataclass
class Target:
    """One line of the TARGETS block: `value` against `bound` (at least, or at most)."""

    what: str
    value: float | None
    bound: float
    at_most: bool = False

    @property
    def met(self) -> bool:
        if self.value is None:
            return False
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": f"{self.what} {'<=' if self.at_most else '>='} {self.bound}",
            "value": self.value,
            "met": self.met,
        }


def print_targets(targets: list[Target], title: str = "TARGETS") -> None:
    if targets:
        print(f"\n{title}")
        for t in targets:
            sign = "<=" if t.at_most else ">="
            print(f"  {'met ' if t.met else 'MISS'}  {t.what} {sign} {t.bound}: {fmt(t.value, 3)}")

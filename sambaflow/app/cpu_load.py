"""How much of the CPUs other processes take: a busy neighbour slows OpenMP code far more than
its share (a 2-thread step waits at every barrier for the thread the neighbour displaced).

`cpu_seconds()` is a snapshot; `other_cpu_share(before, after)` the share of all CPU time between
two snapshots that went to other processes (or the hypervisor: steal time counts). Linux only
(/proc/stat); elsewhere the machine's time reads as 0 and the share as 0.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from pathlib import Path

#: above this share of the CPUs taken by others, timings are reported as disturbed
BUSY_SHARE = 0.1


def cpu_seconds() -> tuple[float, float, float]:
    """(wall, CPU seconds used by the whole machine incl. steal, CPU seconds used by this process)."""
    machine_busy = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        machine_busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), machine_busy, own.ru_utime + own.ru_stime


def other_cpu_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Share of all CPU time that other processes (or the hypervisor) took between two snapshots."""
    wall = after[0] - before[0]
    others = (after[1] - before[1]) - (after[2] - before[2])
    share = others / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
    return min(1.0, max(0.0, share))  # /proc/stat counts in clock ticks (10 ms): short windows are coarse


def busy_warning(share: float, threads: int) -> str | None:
    """A warning line when others took more than `BUSY_SHARE` of the CPUs; None otherwise."""
    if share <= BUSY_SHARE:
        return None
    advice = (
        f" With {threads} threads each step waits for threads the other processes displace: try "
        "--num-threads 1 (or fewer threads than idle cores), or measure on a quiet machine"
        if threads > 1
        else " Measure on a quiet machine for numbers that compare"
    )
    return f"warning: other processes used {share:.0%} of the CPUs while timing: the times above are slowed.{advice}"

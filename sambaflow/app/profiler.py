"""`samba.profiler.Profiler`: time named events (one per iteration) on the host.

    profiler = Profiler(); profiler.start_profile()
    event = profiler.start_event('fwd'); ...; profiler.end_event(event)
    profiler.get_latencies(['fwd'], 1)          # {'fwd': mean seconds, skipping the first event}
    profiler.get_throughputs(['fwd'], 8, 1)     # {'fwd': 8 / that latency}

SambaNova's generation app times time-to-first-token (event 0) and the tokens after it this way.
With no events after skipping, a latency and a throughput are 0.0 (and said so nowhere else).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sambaflow.errors import SambaArgumentError


@dataclass
class ProfileEvent:
    """One timed event: its name and when it started (perf_counter seconds)."""

    name: str
    started: float


class Profiler:
    """Named event times, in the order they ended."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.running = False

    def start_profile(self) -> None:
        self.running = True

    def stop_profile(self) -> None:
        self.running = False

    def start_event(self, name: str) -> ProfileEvent:
        return ProfileEvent(name, time.perf_counter())

    def end_event(self, event: ProfileEvent) -> float:
        """Record `event`'s duration (seconds) and return it."""
        if not isinstance(event, ProfileEvent):
            raise SambaArgumentError(f"end_event: expected the event start_event returned, got {event!r}")
        elapsed = time.perf_counter() - event.started
        self.times.setdefault(event.name, []).append(elapsed)
        return elapsed

    def _get_iter_times(self, name: str, skip: int = 0) -> list[float]:
        """Durations of event `name`, leaving out the first `skip`."""
        return list(self.times.get(name, [])[skip:])

    def get_latencies(self, names: list[str], skip: int = 0) -> dict[str, float]:
        """Mean duration of each named event after the first `skip` (0.0 if none)."""
        result = {}
        for name in names:
            times = self._get_iter_times(name, skip)
            result[name] = sum(times) / len(times) if times else 0.0
        return result

    def get_throughputs(self, names: list[str], batch_size: int, skip: int = 0) -> dict[str, float]:
        """`batch_size` items per mean duration of each named event (0.0 if none)."""
        latencies = self.get_latencies(names, skip)
        return {name: (batch_size / value if value > 0 else 0.0) for name, value in latencies.items()}

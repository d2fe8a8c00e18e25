"""Compile progress, one program at a time: an Inductor compile takes seconds to tens of seconds.

On a terminal a live line counts the seconds of the program being compiled
(`[sambaflow]   program 'step' (1/4): compiling, 7 s`) and is replaced by the program's result;
when output is not a terminal (a log, a pipe) only that result appears, one plain line per
program: its time and the backend's report (cache hit or miss and why).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, TextIO


class ProgramProgress:
    """`start(name)` before each program compiles, `finish()` after the last."""

    def __init__(
        self,
        note: Callable[[str], None],
        total: int,
        reports: list[Any] | None,
        stream: TextIO | None = None,
        live: bool | None = None,
    ) -> None:
        self.note, self.total, self.reports = note, total, reports
        self.stream = stream or sys.stdout
        self.live = _is_terminal(self.stream) if live is None else live
        self.seen = len(reports) if reports is not None else 0
        self.count = 0
        self.current: str | None = None
        self.started = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._drawn = False

    def start(self, name: str) -> None:
        self.finish()
        self.count += 1
        self.current, self.started = name, time.perf_counter()
        if self.live:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def finish(self) -> None:
        """End the program being compiled (if any) with its result line."""
        if self.current is None:
            return
        self._stop_ticker()
        elapsed = time.perf_counter() - self.started
        self.note(f"  {self._label()}: {elapsed:.1f} s{self._new_reports()}")
        self.current = None

    def _label(self) -> str:
        return f"program '{self.current}' ({self.count}/{self.total})"

    def _new_reports(self) -> str:
        if self.reports is None:
            return ""
        fresh = self.reports[self.seen :]
        self.seen = len(self.reports)
        return "".join(_result(report) for report in fresh)

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            elapsed = time.perf_counter() - self.started
            self._write(f"\r[sambaflow]   {self._label()}: compiling, {elapsed:.0f} s")
            self._drawn = True

    def _stop_ticker(self) -> None:
        if self._ticker is None:
            return
        self._stop.set()
        self._ticker.join()
        self._ticker = None
        if self._drawn:
            self._write("\r\033[K")  # clear the live line; the result line replaces it
            self._drawn = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _result(report: Any) -> str:
    """`, cache miss (why), package 1.9 MB` from an Inductor report; its own text from another kind."""
    if all(hasattr(report, field) for field in ("cache", "reason", "size")):
        return f", cache {report.cache} ({report.reason}), package {report.size / 1e6:.1f} MB"
    return f"; {report.as_text()}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

"""What one `export` did: cache hit or miss and why, time spent, package size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompileReport:
    """One `export`: cache hit or miss and why, time spent, package size."""

    program: str
    fingerprint: str
    cache: str  # "hit", "miss" or "off" (turned off, or the cache folder was refused)
    reason: str
    seconds: float
    size: int

    def as_text(self) -> str:
        return (
            f"inductor '{self.program}': cache {self.cache} ({self.reason}); "
            f"{self.seconds:.2f} s, package {self.size / 1e6:.1f} MB, fingerprint {self.fingerprint}"
        )

"""Which replica was lost: heartbeats and exit notes in the process group's key-value store.

gloo says only that a connection closed ("Connection reset by peer [10.0.0.2]:6023"). To name the
rank, every replica bumps a counter `beat/<rank>` from a daemon thread, and leaves a note
`left/<rank>` when it exits (how: normally, or the exception that ended it). A peer whose counter
stopped is lost: killed, or stopped entirely (a busy replica's thread still beats).
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from typing import Any

HEARTBEAT_S = 0.5
# A counter that did not move for this long belongs to a lost replica: while a collective merely
# waits (a peer may be slow, its beat thread starved on a busy machine), and once gloo already
# reported a closed connection (only the name is missing).
SILENT_AFTER_S = 15.0
SILENT_AFTER_ERROR_S = 2.0


class Liveness:
    """Heartbeats of this rank, and the other ranks' state as the store sees it."""

    def __init__(self, store: Any, rank: int, world_size: int) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self._lock = threading.Lock()  # the store client is shared by this thread and the beat thread
        self._stop = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (counter, when it last moved)
        self._op("add", f"beat/{rank}", 1)
        threading.Thread(target=self._beat, name="sambaflow-heartbeat", daemon=True).start()
        atexit.register(self._leave)

    def _op(self, name: str, *args: Any) -> Any:
        with self._lock:
            return getattr(self.store, name)(*args)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._op("add", f"beat/{self.rank}", 1)
            except Exception:  # the store is gone; the replicas' own checks report it
                return

    def _leave(self) -> None:
        """atexit: tell the others how this replica ended (CPython sets `sys.last_value` before
        the excepthook runs, so an uncaught exception is known here)."""
        self._stop.set()
        error = getattr(sys, "last_value", None)
        how = "finished (exited normally)" if error is None else f"ended with {type(error).__name__}: {error}"
        try:
            self._op("set", f"left/{self.rank}", how[:400])
            self._op("add", "left_count", 1)
        except Exception:
            pass

    # --- the others -----------------------------------------------------------------------------
    def left(self) -> dict[int, str]:
        """Peers that exited, and how (from their notes)."""
        if self._op("add", "left_count", 0) == 0:
            return {}
        peers = [r for r in range(self.world_size) if r != self.rank]
        return {r: self._op("get", f"left/{r}").decode() for r in peers if self._op("check", [f"left/{r}"])}

    def silent(self, after_s: float = SILENT_AFTER_S) -> dict[int, str]:
        """Peers whose heartbeat has not moved for `after_s` (as seen over the calls so far)."""
        now, lost = time.monotonic(), {}
        for peer in (r for r in range(self.world_size) if r != self.rank):
            count = self._op("add", f"beat/{peer}", 0)
            last, since = self._seen.get(peer, (-1, now))
            if count != last:
                self._seen[peer] = (count, now)
            elif now - since >= after_s:
                lost[peer] = f"sent no heartbeat for {now - since:.0f} s: killed, or stopped"
        return lost

    def lost(self, patience_s: float = SILENT_AFTER_ERROR_S + 2.0) -> dict[int, str]:
        """After a failed collective: the peers that left or went silent, waiting up to
        `patience_s` for the evidence. {} when every peer still looks alive."""
        deadline = time.monotonic() + patience_s
        self._seen.clear()  # silence counts from now: an old sample would make it look longer
        while True:
            found = self.left() or self.silent(SILENT_AFTER_ERROR_S)
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(HEARTBEAT_S / 2)

    def stop(self) -> None:
        self._stop.set()

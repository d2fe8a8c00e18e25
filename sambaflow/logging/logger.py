"""The "sambaflow" logger: stderr by default, levels by name, and per-message `log_limit`."""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter
from typing import Any

from sambaflow.errors import SambaArgumentError

LOGGER_NAME = "sambaflow"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
FORMAT = "[sambaflow] %(levelname)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment, so redirection and test capture see the output."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class SambaLogger:
    """A stdlib logger whose methods also take `log_limit=N` (log that text at most N times)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def debug(self, msg: object, *args: Any, log_limit: int | None = None, **kwargs: Any) -> None:
        self._log(logging.DEBUG, msg, args, log_limit, kwargs)

    def info(self, msg: object, *args: Any, log_limit: int | None = None, **kwargs: Any) -> None:
        self._log(logging.INFO, msg, args, log_limit, kwargs)

    def warning(self, msg: object, *args: Any, log_limit: int | None = None, **kwargs: Any) -> None:
        self._log(logging.WARNING, msg, args, log_limit, kwargs)

    def error(self, msg: object, *args: Any, log_limit: int | None = None, **kwargs: Any) -> None:
        self._log(logging.ERROR, msg, args, log_limit, kwargs)

    def critical(self, msg: object, *args: Any, log_limit: int | None = None, **kwargs: Any) -> None:
        self._log(logging.CRITICAL, msg, args, log_limit, kwargs)

    def reset_limits(self) -> None:
        """Forget how often each message was logged (every `log_limit` starts again)."""
        with self._lock:
            self._counts.clear()

    def __getattr__(self, attr: str) -> Any:
        # Everything else (setLevel, isEnabledFor, handlers, ...) is the stdlib logger's.
        if attr == "logger":
            raise AttributeError(attr)
        return getattr(self.logger, attr)

    def _log(self, level: int, msg: object, args: tuple, log_limit: int | None, kwargs: dict) -> None:
        _check_limit(log_limit)
        if not self.logger.isEnabledFor(level) or not self._take(str(msg), log_limit):
            return
        # Attribute the record to the caller of debug/info/... rather than to this module.
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 2
        self.logger.log(level, msg, *args, **kwargs)

    def _take(self, text: str, log_limit: int | None) -> bool:
        """Count one more logging of `text`; False once it was logged `log_limit` times."""
        if log_limit is None:
            return True
        with self._lock:
            if self._counts[text] >= log_limit:
                return False
            self._counts[text] += 1
            return True


def set_log_level(level: str) -> None:
    """Set the level of every sambaflow logger: "debug", "info", "warning", "error" or "critical"."""
    name = level.lower() if isinstance(level, str) else level
    if name not in LOG_LEVELS:
        raise SambaArgumentError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    logging.getLogger(LOGGER_NAME).setLevel(name.upper())


def _check_limit(log_limit: int | None) -> None:
    if log_limit is None:
        return
    if isinstance(log_limit, bool) or not isinstance(log_limit, int) or log_limit < 0:
        raise SambaArgumentError(
            f"log_limit must be None or a non-negative int (times to log a message), got {log_limit!r}"
        )


def _root_logger() -> logging.Logger:
    """The "sambaflow" logger, with a stderr handler and level warning unless already configured."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        logger.addHandler(_StderrHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    return logger


samba_logger = SambaLogger(_root_logger())

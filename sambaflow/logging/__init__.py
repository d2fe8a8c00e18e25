"""`sambaflow.logging`: SambaFlow's logger (`from sambaflow.logging import samba_logger`).

`samba_logger` wraps the stdlib `logging.Logger` named "sambaflow" (the parent of every
`sambaflow.*` logger). Its `debug`/`info`/`warning`/`error`/`critical(msg, *args, log_limit=None)`
take the stdlib arguments plus `log_limit=N`: that message text is logged at most N times per
process (`samba_logger.warning("Patched function used", log_limit=1)`).

By default the level is "warning" and messages go to stderr as `[sambaflow] WARNING: msg`.
Records also propagate to the root logger, so an app's own logging setup (or pytest's `caplog`)
sees them too; set `logging.getLogger("sambaflow").propagate = False` if that prints them twice.

`set_log_level(level)` sets the level of every sambaflow logger from one of "debug", "info",
"warning", "error", "critical"; the app argument parser calls it with `--log-level`.
"""

from sambaflow.logging.logger import LOG_LEVELS, SambaLogger, samba_logger, set_log_level

__all__ = ["LOG_LEVELS", "SambaLogger", "samba_logger", "set_log_level"]

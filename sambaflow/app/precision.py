"""Which GraphAMP preset an app's step is traced with, and what the compile log says about it.

`compile` takes the preset from `graphamp_preset=` (for apps that do not parse arguments), else
the parsed `--graphamp-preset`, else mp0. A PEF fixes its precision: `run`/`test`/`measure-*`
trace with the PEF's preset unless the app asks for one, and a PEF whose precision differs from
what the app traces is refused (pef/check.py `check_precision`).
"""

from __future__ import annotations

from typing import Any

from sambaflow.app.args import parsed_args
from sambaflow.pef.file import PefFile
from sambaflow.trace.precision import check_preset, describe, preset_of


def requested_preset(explicit: str | None, config: dict[str, Any] | None = None) -> str | None:
    """`explicit`, else `config`'s (default: the parsed args') --graphamp-preset; None if not asked."""
    if explicit is not None:
        return check_preset(explicit)
    if config is None:
        args = parsed_args()
        config = vars(args) if args is not None else {}
    given = config.get("graphamp_preset")
    return None if given is None else check_preset(given)


def preset_for_run(requested: str | None, pef: PefFile | None) -> str:
    """The preset asked for, else the PEF's, else mp0."""
    if requested is not None:
        return requested
    return preset_of(pef.manifest["precision"]) if pef is not None else "mp0"


def compile_notes(precision: str) -> list[str]:
    """Compile-log lines about the precision (`--enable-mixed-precision-ops` is listed with the
    arguments that had no effect, app/args.py)."""
    return [f"precision: {describe(precision)}"]

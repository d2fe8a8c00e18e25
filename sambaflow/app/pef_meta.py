"""PEF metadata the way SambaNova's modelzoo writes and reads it (`samba.utils.pef_utils`).

At compile the modelzoo embeds its arguments with `session.compile(..., pef_metadata=
get_pefmeta_dict(meta, model))`; at run it reads single keys back with `get_pef_info(pef,
{key: PefInfoStruct(value)})`, which raises ValueError for a key the PEF does not hold (the value in
`PefInfoStruct` is what SambaFlow's mock runtime would return instead; here the PEF is always read).
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from sambaflow.app.compile import jsonable
from sambaflow.errors import SambaPefError
from sambaflow.pef.file import PefFile


@dataclass
class PefInfoStruct:
    """A key's stand-in value, used by SambaFlow's mock runtime; here only carried along."""

    value: Any = None


def get_pefmeta_dict(metadata: Mapping[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
    """`metadata` (JSON-able: containers kept, anything else as its str()) plus the model's class and
    parameter count, for `session.compile(pef_metadata=...)`."""
    if not isinstance(metadata, Mapping):
        raise SambaPefError(f"get_pefmeta_dict: metadata must be a dict, got {type(metadata).__name__}")
    meta = jsonable(dict(metadata))
    if model is not None:
        meta.setdefault("model", type(model).__name__)
        meta.setdefault("num_parameters", sum(p.numel() for p in model.parameters()))
    return meta


def pef_metadata(pef: str) -> dict[str, Any]:
    """The metadata a PEF was compiled with (checked: a damaged or foreign file says so). Read once
    per file version: the modelzoo asks for one key at a time."""
    if not pef:
        raise SambaPefError("get_pef_info: no PEF path given (samba_run.pef): pass the compiled PEF")
    try:
        stat = os.stat(pef)
    except OSError as exc:
        raise SambaPefError(f"get_pef_info: cannot read PEF {pef!r}: {exc.strerror}") from None
    return copy.deepcopy(_metadata(os.path.abspath(pef), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _metadata(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    return PefFile(path).manifest.get("pef_metadata", {})


def get_pef_info(pef: str, keys: Mapping[str, PefInfoStruct] | list[str]) -> dict[str, Any]:
    """`{key: value}` as recorded in `pef`'s metadata; ValueError naming a key it does not hold."""
    recorded = pef_metadata(pef)
    missing = [k for k in keys if k not in recorded]
    if missing:
        raise ValueError(f"PEF {pef} holds no metadata {missing}; it holds {sorted(recorded)}")
    return {k: recorded[k] for k in keys}


__all__ = ["PefInfoStruct", "get_pef_info", "get_pefmeta_dict", "pef_metadata"]

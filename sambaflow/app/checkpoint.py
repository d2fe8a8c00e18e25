"""Checkpoints for apps: `samba.save(obj, path)` and `samba.load(path, model, optimizer)`; `save_json`.

`save` writes torch's format (`torch.save`) to a temporary file in the target's folder, fsyncs it
and renames it over the target, as Lightning does: a kill or a full disk mid-save leaves the
previous checkpoint whole. `load` reads with `weights_only=True` (no code runs from the file) and
turns what a user meets on resume (a missing, truncated or foreign file; another model's shapes)
into one `SambaIOError` naming the file. `check_output_path` lets an app refuse, before its first
step, an output path it could not write after training.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from sambaflow.atomic import atomic_write, check_writable, reported_as, write_error_message
from sambaflow.errors import SambaIOError, SambaOptimizerError


def save(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save(obj, path)`, atomically: `path` holds the old checkpoint or the new one, whole."""
    path = os.fspath(path)
    check_writable(path, "the checkpoint")
    with reported_as(path, "the checkpoint"):
        with atomic_write(path) as handle:
            try:
                torch.save(obj, handle)
            except RuntimeError as exc:  # torch's writer wraps the file's OSError (ENOSPC ...)
                if isinstance(exc.__context__, OSError):
                    raise SambaIOError(write_error_message(path, "the checkpoint", exc.__context__)) from None
                raise


def save_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """`json.dump(obj)` to `path`, atomically (loss logs, inference results)."""
    path = os.fspath(path)
    check_writable(path, "the JSON file")
    with reported_as(path, "the JSON file"), atomic_write(path) as handle:
        handle.write(json.dumps(obj).encode())


def check_output_path(path: str | os.PathLike[str] | None, option: str) -> None:
    """Raise `SambaIOError` now if the file an app will write after training (given by `option`,
    e.g. '--save-checkpoint') could not be written: a folder, or a read-only place."""
    if path:
        check_writable(os.fspath(path), f"{option}")


def load(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_key: str | None = "model",
) -> Any:
    """The object `save` wrote; with `model` / `optimizer`, also load its 'model' / 'optimizer'
    entries into them (as `load_state_dict`), checking names and shapes first. `model_key=None`:
    the whole file is the model's state_dict."""
    path = os.fspath(path)
    checkpoint = _read(path)
    if model is not None:
        state = checkpoint if model_key is None else _entry(path, checkpoint, model_key)
        _load_model(path, model, state)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(_entry(path, checkpoint, "optimizer"))
        except SambaOptimizerError as exc:
            raise SambaIOError(f"checkpoint {path!r} does not fit the optimizer: {exc}") from None
    return checkpoint


def _read(path: str) -> Any:
    if not os.path.exists(path):
        raise SambaIOError(f"checkpoint {path!r} does not exist: check the path, or start without it")
    if os.path.isdir(path):
        raise SambaIOError(f"checkpoint {path!r} is a folder: give the checkpoint file inside it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise SambaIOError(f"could not read checkpoint {path!r}: {exc.strerror or exc}") from None
    except Exception as exc:  # only torch.load of the user's file is in here: its content is bad
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SambaIOError(
            f"checkpoint {path!r} is damaged or not a checkpoint ({os.path.getsize(path)} bytes; "
            f"torch.load: {why}): use another checkpoint, or start without one"
        ) from None


def _entry(path: str, checkpoint: Any, key: str) -> Any:
    if not isinstance(checkpoint, dict) or key not in checkpoint:
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise SambaIOError(
            f"checkpoint {path!r} has no {key!r} entry (it holds {found}): was it saved by this app?"
        )
    return checkpoint[key]


def _load_model(path: str, model: nn.Module, state: Any) -> None:
    if not isinstance(state, dict):
        raise SambaIOError(f"checkpoint {path!r} holds a {type(state).__name__} where a state_dict belongs")
    problems = state_mismatches(model.state_dict(), state)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise SambaIOError(
            f"checkpoint {path!r} was saved from another model: {shown}. Resume with the sizes it "
            "was trained with, or start without it"
        )
    model.load_state_dict(state)


def state_mismatches(expected: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """What differs between the model's state_dict and a saved one: missing, extra, other shapes."""
    problems = [f"{name} missing" for name in expected if name not in saved]
    problems += [f"{name} not in the model" for name in saved if name not in expected]
    for name, tensor in expected.items():
        other = saved.get(name)
        if isinstance(other, torch.Tensor) and tuple(other.shape) != tuple(tensor.shape):
            problems.append(f"{name} has shape {list(other.shape)}, the model {list(tensor.shape)}")
    return problems

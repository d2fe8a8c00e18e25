"""Compare the graph an app traces now with the one a PEF was compiled from; explain every difference."""

from __future__ import annotations

from typing import Any

from sambaflow.errors import SambaPefError
from sambaflow.pef.manifest import fingerprint, spec_from_json
from sambaflow.trace.graph import HYPER, INPUT, OUTPUT, PARAM, STATE, TensorSpec, TracedGraph
from sambaflow.trace.precision import MIXED, describe


def check_matches(
    traced: TracedGraph, entry: dict[str, Any], path: str, compile_args: dict[str, Any]
) -> None:
    """Raise SambaPefError listing every way `traced` differs from the PEF's graph `entry`."""
    compiled = [spec_from_json(s) for s in entry["inputs"]] + [spec_from_json(s) for s in entry["outputs"]]
    current = traced.inputs + traced.outputs
    problems = _batch_size(compiled, current, compile_args)
    problems += _role_differences(compiled, current, INPUT, "input tensors")
    problems += _role_differences(compiled, current, PARAM, "model parameters (model structure)")
    problems += _role_differences(compiled, current, STATE, "optimizer state (optimizer type or settings)")
    problems += _role_differences(compiled, current, HYPER, "run-time hyperparameters (optimizer or dropout)")
    problems += _role_differences(compiled, current, OUTPUT, "model outputs")
    if traced.baked != entry["baked"]:
        problems.append(
            f"optimizer settings fixed at compile time differ: PEF {entry['baked']}, app {traced.baked}"
        )
    problems += _structure_differences(traced, entry)
    if not problems and fingerprint(traced) != entry["fingerprint"]:
        problems.append(
            "the model's computation differs from the compiled one (forward() or a module "
            "changed, or a different torch version traces it differently)"
        )
    if problems:
        raise SambaPefError(
            f"'{path}' does not match the app:\n  - "
            + "\n  - ".join(problems)
            + "\nRecompile the PEF with the app as it is now, or run it with the "
            "arguments it was compiled with."
        )


def _structure_differences(traced: TracedGraph, entry: dict[str, Any]) -> list[str]:
    problems = []
    if list(traced.sections) != entry["sections"]:
        problems.append(f"sections differ: PEF {entry['sections']}, app {list(traced.sections)}")
    if list(traced.loss_names) != entry["loss_names"]:
        problems.append(
            f"loss outputs differ: PEF {entry['loss_names']}, app {list(traced.loss_names)} (loss_indices)"
        )
    for what, old, new in (
        ("inputs", entry["inputs"], traced.inputs),
        ("outputs", entry["outputs"], traced.outputs),
    ):
        old_names, new_names = [s["name"] for s in old], [s.name for s in new]
        if old_names != new_names and sorted(old_names) == sorted(new_names):
            problems.append(f"the graph's {what} are in another order in the PEF than in the app")
    return problems


def _batch_size(compiled: list[TensorSpec], current: list[TensorSpec], args: dict[str, Any]) -> list[str]:
    now = {s.name: s for s in current if s.role == INPUT}
    for old in compiled:
        new = now.get(old.name)
        if old.role != INPUT or new is None or old.batch_dim is None or old.shape == new.shape:
            continue
        if _only_batch_differs(old, new):
            dim = old.batch_dim
            return [
                f"compiled with batch size {old.shape[dim]}, the app now traces {new.shape[dim]} "
                f"(input '{old.name}'): recompile, or pass -b {old.shape[dim]}"
            ]
    return []


def _only_batch_differs(old: TensorSpec, new: TensorSpec) -> bool:
    dim = old.batch_dim
    if dim is None or len(old.shape) != len(new.shape) or not 0 <= dim < len(old.shape):
        return False
    return all(a == b for i, (a, b) in enumerate(zip(old.shape, new.shape)) if i != dim)


def _role_differences(
    compiled: list[TensorSpec], current: list[TensorSpec], role: str, what: str
) -> list[str]:
    old = {s.name: s for s in compiled if s.role == role}
    new = {s.name: s for s in current if s.role == role}
    problems = []
    only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    if only_old or only_new:
        problems.append(
            f"{what}: the PEF has {only_old or 'nothing'} that the app lacks; the app has "
            f"{only_new or 'nothing'} that the PEF lacks"
        )
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        if a.shape != b.shape and not _only_batch_differs(a, b):
            problems.append(
                f"{what}: '{name}' has shape {list(a.shape)} in the PEF, {list(b.shape)} in the app"
            )
        if a.dtype != b.dtype:
            problems.append(f"{what}: '{name}' is {a.dtype} in the PEF, {b.dtype} in the app")
    return problems


def check_precision(traced: TracedGraph, compiled: str, path: str) -> None:
    """Refuse a PEF compiled in another precision than the app traces now, saying how to match it.

    Checked before `check_matches`: a precision change alters every dtype and the fingerprint, and
    this one line says why.
    """
    if traced.precision == compiled:
        return
    if compiled == MIXED:
        hint = "drop --graphamp-preset mp0 / graphamp_preset='mp0' (the PEF's mp1 is then used)"
    elif traced.precision == MIXED:
        hint = "drop --graphamp-preset mp1 / graphamp_preset='mp1' (this PEF is not mixed precision)"
    else:
        hint = (
            f"give the model {compiled} parameters as at compile time (model.bfloat16() / "
            "model.float(), or the torch_dtype= of from_pretrained / from_config)"
        )
    raise SambaPefError(
        f"'{path}' was compiled in precision {describe(compiled)}; the app now traces "
        f"{describe(traced.precision)}. To run it, {hint}; or recompile the PEF from the app "
        "as it is now."
    )

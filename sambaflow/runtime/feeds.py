"""Check what a user hands to `session.run` against the compiled graph, before anything runs."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from sambaflow.errors import SambaRunError
from sambaflow.optim.base import hyper_problem
from sambaflow.trace.graph import SECTION_ORDER, TensorSpec


def resolve_sections(section_types: Sequence[str] | str | None, compiled: list[str]) -> list[str]:
    """Normalise section names (any case) and check they exist and come in compiled order."""
    if section_types is None:
        return list(compiled)
    if isinstance(section_types, str):
        section_types = [section_types]
    if len(section_types) == 0:
        raise SambaRunError(
            f"section_types=[] names no section, so the run would do nothing and return the last "
            f"outputs again: pass section_types=None (the whole step) or some of {compiled}"
        )
    chosen = []
    for raw in section_types:
        name = str(raw).lower()
        if name in ("bckwd", "gradnorm", "opt") and compiled == ["fwd"]:
            raise SambaRunError(
                f"section_types: {raw!r} asks to train, but this graph is forward-only "
                "(compiled with --inference, or traced without an optimizer): recompile "
                "without --inference and trace with an optimizer to train"
            )
        if name not in compiled:
            raise SambaRunError(
                f"section_types: unknown section {raw!r}; this graph has sections "
                f"{compiled} (upper or lower case)"
            )
        chosen.append(name)
    if chosen != [s for s in SECTION_ORDER if s in chosen] or len(set(chosen)) != len(chosen):
        raise SambaRunError(
            f"section_types {list(section_types)}: sections run in the order "
            f"{[s for s in SECTION_ORDER if s in compiled]}, each at most once"
        )
    return chosen


def match_inputs(given: Any, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """Inputs by name (SambaTensors or a dict), or by position for unnamed tensors.

    `None` entries of a list or tuple are skipped: they stand for forward arguments the app left
    at their defaults, as in the tuple it traced with.
    """
    if type(given) in (list, tuple) and any(value is None for value in given):
        given = [value for value in given if value is not None]
    fast = _in_compiled_order(given, specs)
    if fast is not None:
        return fast
    pairs = _pairs(given, specs)
    expected = {spec.name: spec for spec in specs}
    unknown = [name for name, _ in pairs if name not in expected]
    missing = [name for name in expected if name not in dict(pairs)]
    if unknown or missing:
        raise SambaRunError(
            f"input_tensors: unknown {unknown}, missing {missing}. The graph expects "
            f"{[s.describe() for s in specs]}; given {[n for n, _ in pairs]}"
        )
    feeds = {}
    for name, value in pairs:
        feeds[name] = _checked(value, expected[name], "input")
    return feeds


def _in_compiled_order(given: Any, specs: list[TensorSpec]) -> dict[str, torch.Tensor] | None:
    """The common case, checked in one pass: the compiled inputs, named, in order, as compiled."""
    if type(given) not in (list, tuple) or len(given) != len(specs):
        return None
    feeds = {}
    for value, spec in zip(given, specs):
        if (
            getattr(value, "sn_name", None) != spec.name
            or value.shape != spec.shape
            or value.dtype != spec.dtype
            or value.requires_grad
        ):
            return None
        feeds[spec.name] = value
    return feeds


def _pairs(given: Any, specs: list[TensorSpec]) -> list[tuple[str, Any]]:
    if isinstance(given, dict) or (not isinstance(given, (list, tuple)) and isinstance(given, Mapping)):
        return _keyword_pairs(given)
    if isinstance(given, torch.Tensor):
        given = [given]
    if not isinstance(given, (list, tuple)):
        raise SambaRunError(
            f"input_tensors must be a list, tuple or dict of tensors, got {type(given).__name__}"
        )
    pairs = []
    for i, value in enumerate(given):
        name = getattr(value, "sn_name", None)
        if name is None:
            name = specs[i].name if i < len(specs) else f"<unnamed input {i}>"
        pairs.append((name, value))
    return pairs


def _keyword_pairs(given: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """`{name: tensor}`, or forward's keyword arguments as traced (`forward(**inputs)`): a tuple or
    list value holds tensors named by their own names; Python constants were fixed at trace time."""
    pairs: list[tuple[str, Any]] = []
    for key, value in given.items():
        if isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    name = getattr(item, "sn_name", None)
                    if name is None:
                        raise SambaRunError(
                            f"input_tensors['{key}'][{i}] has no name: make it with "
                            "samba.from_torch_tensor(t, name=...) using the name it was traced with"
                        )
                    pairs.append((name, item))
        elif isinstance(value, torch.Tensor) or value is None or not _constant(value):
            pairs.append((key, value))
    return pairs


def _constant(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _checked(value: Any, spec: TensorSpec, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise SambaRunError(f"{what} '{spec.name}': expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) == spec.shape and value.dtype != spec.dtype:
        # Not cast silently: a bf16 graph fed fp32 (or the reverse) is a precision the app did not
        # compile, and casting would hide it.
        raise SambaRunError(
            f"{what} '{spec.name}': the graph was compiled for {spec.dtype}, given {value.dtype} "
            f"(shape {list(spec.shape)} matches). Feed {spec.dtype} tensors, e.g. "
            f"{_cast_hint(spec.dtype)}, or recompile with inputs of this dtype."
        )
    if tuple(value.shape) != spec.shape or value.dtype != spec.dtype:
        raise SambaRunError(
            f"{what} '{spec.name}': the graph was compiled for shape {list(spec.shape)} {spec.dtype}, "
            f"given {list(value.shape)} {value.dtype}. Feed tensors of the compiled shape (pad or "
            f"drop the last batch), or retrace / recompile for the new shape."
        )
    # SambaTensors go to the backends as they are: their torch-function override is disabled.
    return value.detach() if value.requires_grad else value


_CASTS = {
    torch.bfloat16: "bfloat16",
    torch.float32: "float",
    torch.float16: "half",
    torch.int64: "long",
    torch.int32: "int",
}


def _cast_hint(dtype: torch.dtype) -> str:
    method = _CASTS.get(dtype)
    return f"x.{method}()" if method else f"x.to({dtype})"


def check_seed(value: Any, spec: TensorSpec) -> torch.Tensor:
    return _checked(value, spec, "gradient of output")


def expand_hyperparams(
    given: Mapping[str, Any] | None, names: list[str], compiled: Mapping[str, float]
) -> dict[str, float]:
    """Map user keys (`lr`, `p`, `betas`, or exact input names) onto the graph's inputs."""
    if not given:
        return {}
    if not isinstance(given, Mapping):
        raise SambaRunError(f"hyperparam_dict must be a dict, got {type(given).__name__}")
    result: dict[str, float] = {}
    for key, value in given.items():
        if key == "betas":
            result |= expand_hyperparams(_betas(value, names), names, compiled)
            continue
        number = hyper_value(key, value)
        targets = [n for n in names if n == key or _family(n) == key]
        if not targets and not _absent_and_zero(key, number):
            raise SambaRunError(_not_an_input(key, names))
        result |= {n: number for n in targets}
    return result


def hyper_value(key: str, value: Any) -> float:
    """`value` as a float, refused (naming `key`) when it is not a number or is out of range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SambaRunError(
            f"hyperparam_dict['{key}'] = {value!r} is not a number: pass a float, e.g. "
            f"{{'{key}': {_EXAMPLE.get(_family(key), 0.1)}}}"
        ) from None
    problem = hyper_problem(_family(key), number)
    if problem:
        raise SambaRunError(f"hyperparam_dict['{key}'] = {value!r}: {problem}")
    return number


def _betas(value: Any, names: list[str]) -> dict[str, Any]:
    if "beta1" not in names:
        raise SambaRunError(_not_an_input("betas", names))
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise SambaRunError(
            f"hyperparam_dict['betas'] = {value!r}: betas is a pair (beta1, beta2), e.g. "
            "{'betas': (0.9, 0.997)}; or set one alone with {'beta1': 0.9}"
        )
    return {"beta1": value[0], "beta2": value[1]}


_OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay", "beta1", "beta2", "betas", "eps")
_EXAMPLE = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "beta1": 0.9, "beta2": 0.997, "eps": 1e-8}


def _not_an_input(key: str, names: list[str]) -> str:
    if key in _OPTIMIZER_KEYS and not any(_family(n) == "lr" for n in names):
        return (
            f"hyperparam_dict: '{key}' sets an optimizer, and this graph has none: it is forward-only "
            "(a PEF compiled with --inference, or traced without an optimizer), so it cannot train. "
            "To train, recompile without --inference and trace with the optimizer; for inference, "
            "run section_types=['fwd'] without optimizer settings"
            + (f" (its run-time inputs: {names})" if names else "")
        )
    return f"hyperparam_dict: '{key}' is not a run-time input of this graph; it has {names}. " + _hint(key)


def _family(name: str) -> str:
    """`lr__1` -> `lr`, `drop1__p` -> `p`, `lr` -> `lr`."""
    head, _, tail = name.rpartition("__")
    if tail == "p":
        return "p"
    return head if tail.isdigit() else name


def _absent_and_zero(key: str, value: float) -> bool:
    # Apps pass {'momentum': 0} or {'p': 0} to graphs with no momentum or no dropout: a no-op.
    return key in ("momentum", "p", "weight_decay") and value == 0.0


def _hint(key: str) -> str:
    if key == "momentum":
        return "Build SGD with momentum > 0 to tune momentum at run time."
    if key in ("beta1", "beta2", "betas", "eps"):
        return "These are AdamW settings; this graph's optimizer has none of them."
    if key == "p":
        return "The model has no active dropout (nn.Dropout in train mode)."
    return "Check the spelling, or the optimizer the graph was traced with."

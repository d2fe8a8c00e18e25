"""The contract every Samba optimizer follows, and its torch-format checkpoints.

An optimizer holds its parameters, its constructor settings and a host copy of its state. The
update itself is a pure function, `update(params, grads, states, hyper)`, that the tracer records
into the graph; hyperparameters arrive there as 0-d float64 tensors (graph inputs), so changing
them at run time never retraces. float64 scalars keep the scalar arithmetic (bias corrections,
`1 - dampening`) as exact as torch's Python floats, while tensor math stays in the tensor's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from sambaflow.errors import SambaOptimizerError
from sambaflow.tensors.meta import on_host

Hyper = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


def state_name(param_name: str, key: str) -> str:
    """Device-store name of a parameter's optimizer state: `gemm1__weight__momentum_buffer`."""
    return f"{param_name}__{key}"


# A hyperparameter's family (`lr` for `lr__1`) -> (lowest, highest, whether highest is allowed,
# what a good value looks like). As torch.optim refuses them at construction; nan and inf too.
_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "lr": (0.0, math.inf, False, "a learning rate >= 0, e.g. 0.01"),
    "momentum": (0.0, math.inf, False, "a momentum >= 0, e.g. 0.9"),
    "dampening": (0.0, math.inf, False, "a dampening >= 0"),
    "weight_decay": (0.0, math.inf, False, "a weight decay >= 0, e.g. 1e-4"),
    "eps": (0.0, math.inf, False, "an epsilon >= 0, e.g. 1e-8"),
    "beta1": (0.0, 1.0, False, "a beta in [0, 1), e.g. 0.9"),
    "beta2": (0.0, 1.0, False, "a beta in [0, 1), e.g. 0.997"),
    "p": (0.0, 1.0, True, "a dropout probability in [0, 1]"),
}


def hyper_problem(family: str, value: float) -> str | None:
    """Why `value` cannot be the hyperparameter `family` (None when it can)."""
    if family not in _RANGES:
        return None if math.isfinite(value) else "it must be a finite number"
    low, high, high_ok, wanted = _RANGES[family]
    if math.isfinite(value) and low <= value and (value < high or (high_ok and value == high)):
        return None
    return f"{family} must be {wanted} (nan or a value out of range would poison the weights)"


def check_settings(owner: str, settings: dict[str, Any]) -> dict[str, float]:
    """Constructor settings as floats, each refused (naming it and its fix) when out of range."""
    checked = {}
    for key, value in settings.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SambaOptimizerError(
                f"{owner}: {key}={value!r} is not a number: pass {_RANGES[key][3]}"
            ) from None
        problem = hyper_problem(key, number)
        if problem:
            raise SambaOptimizerError(f"{owner}: {key}={value!r} is invalid: {problem}")
        checked[key] = number
    return checked


def hyper_name(key: str, optimizer_index: int) -> str:
    """Graph-input name of a hyperparameter: `lr` for the first optimizer, `lr__1` for the second."""
    return key if optimizer_index == 0 else f"{key}__{optimizer_index}"


class SambaOptimizer:
    """Base class: parameters, settings, host state, and the torch checkpoint format."""

    #: settings that become run-time graph inputs (names as in `hyperparam_dict`)
    hyper_names: tuple[str, ...] = ()
    #: per-parameter state tensors, in torch's naming
    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[torch.Tensor], defaults: dict[str, Any]) -> None:
        self.params = _parameter_list(params, type(self).__name__)
        self.defaults = dict(defaults)
        self.hyper = {name: float(defaults[name]) for name in self.hyper_names}
        self.state: dict[int, State] = {}

    # --- functional rule, traced into the graph ------------------------------------------
    def update(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[State], hyper: Hyper
    ) -> tuple[list[torch.Tensor], list[State]]:
        raise NotImplementedError

    def clip_gradients(self, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Gradient transformation run in the `gradnorm` section; None when there is none."""
        return None

    # --- state ------------------------------------------------------------------------------
    def initial_state(self, param: torch.Tensor) -> State:
        return {name: torch.zeros_like(param) for name in self.state_names}

    def state_of(self, index: int) -> State:
        """Host state of parameter `index`, created (as at step 0) when missing."""
        if index not in self.state:
            self.state[index] = self.initial_state(self.params[index].detach())
        return self.state[index]

    def current_state(self, index: int) -> State:
        """Host state of parameter `index`, or a fresh one (as at step 0) that is not kept: a
        fresh optimizer holds no host copy of its state until `to_cpu` brings one back."""
        if index in self.state:
            return self.state[index]
        return self.initial_state(on_host(self.params[index].detach()))  # meta: zeros on the host

    def param_name(self, index: int) -> str:
        return self.params[index].sn_name

    # --- torch-format checkpoints -----------------------------------------------------------
    def torch_group_settings(self) -> dict[str, Any]:
        return dict(self.defaults)

    def state_dict(self) -> dict[str, Any]:
        """`torch.optim`'s format: {'state': {i: {...}}, 'param_groups': [{..., 'params': [...]}]}."""
        state = {i: {k: v.clone() for k, v in self.state[i].items()} for i in sorted(self.state)}
        group = self.torch_group_settings() | {"params": list(range(len(self.params)))}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not groups or len(groups) != 1 or len(groups[0].get("params", [])) != len(self.params):
            raise SambaOptimizerError(
                f"{type(self).__name__}.load_state_dict: expected one parameter group with "
                f"{len(self.params)} parameters (torch.optim format); got "
                f"{_describe_groups(groups)}. Save with optimizer.state_dict() from the same model."
            )
        saved = dict(groups[0])
        if "betas" in saved:  # torch's Adam family keeps the betas as one pair
            saved["beta1"], saved["beta2"] = saved["betas"]
        for key in self.hyper_names:
            if key in saved:
                self.hyper[key] = float(saved[key])
        self.state = {int(i): self._loaded_state(int(i), s) for i, s in state_dict["state"].items()}

    def _loaded_state(self, index: int, saved: dict[str, Any]) -> State:
        state = self.initial_state(self.params[index].detach())
        for key in state:
            if key in saved:
                state[key] = saved[key].detach().clone().to(state[key].dtype)
        return state


def _parameter_list(params: Iterable[torch.Tensor], owner: str) -> list[torch.Tensor]:
    params = list(params)
    if params and isinstance(params[0], dict):
        raise SambaOptimizerError(
            f"{owner}: parameter-group dicts are not supported; pass a list of optimizers, one per "
            "group, to trace_graph / session.compile instead"
        )
    if not params:
        raise SambaOptimizerError(f"{owner} got an empty parameter list")
    for i, param in enumerate(params):
        if getattr(param, "sn_name", None) is None:
            raise SambaOptimizerError(
                f"{owner}: parameter {i} (shape {tuple(param.shape)}) has no Samba name. Call "
                "samba.from_torch_model_(model) before building the optimizer."
            )
    return params


def _describe_groups(groups: Any) -> str:
    if not groups:
        return "no parameter groups"
    return f"{len(groups)} group(s) with {[len(g.get('params', [])) for g in groups]} parameters"

"""What a step reads and writes, by name: inputs, parameters, buffers, optimizer state, hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from sambaflow.errors import SambaTraceError
from sambaflow.optim.base import SambaOptimizer, hyper_name, state_name
from sambaflow.tensors.model import buffer_name
from sambaflow.trace.precision import check_preset


@dataclass
class StepPlan:
    """Named tensors of one step; `optimizers[i]` owns parameter names `owned[i]`."""

    inputs: list[tuple[str, torch.Tensor]]
    params: list[tuple[str, torch.Tensor]]
    buffers: list[tuple[str, torch.Tensor]]
    paths: dict[str, str]  # samba name -> module path used by functional_call
    optimizers: list[SambaOptimizer]
    backward: bool
    #: forward's positional arguments: an input's name, or None where the app passed None
    slots: list[str | None] = field(default_factory=list)
    #: GraphAMP preset the forward is traced with (trace/precision.py)
    graphamp: str = "mp0"
    states: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    unused: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.owned = [[p.sn_name for p in opt.params] for opt in self.optimizers]
        self._values = dict(self.inputs + self.params + self.buffers)
        for i, opt in enumerate(self.optimizers):
            for j, name in enumerate(self.owned[i]):
                for key, value in opt.current_state(j).items():
                    self.states.append((state_name(name, key), value))
        self._values.update(self.states)

    # --- lookups ---------------------------------------------------------------------------
    def named_state(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters and buffers keyed by their module path, for functional_call."""
        return [(self.paths[n], t) for n, t in self.params + self.buffers]

    def call_args(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """forward's positional arguments: the named values, None where the app passed None."""
        return tuple(None if name is None else values[name] for name in self.slots)

    def value_of(self, name: str) -> torch.Tensor | None:
        return self._values.get(name)

    def is_input(self, name: str) -> bool:
        return any(n == name for n, _ in self.inputs)

    def wants_grad(self, name: str) -> bool:
        return name in self.grad_names()

    def grad_names(self) -> list[str]:
        if not self.backward:
            return []
        params = [n for n, t in self.params if t.requires_grad]
        return params + [n for n, t in self.inputs if t.requires_grad and t.is_floating_point()]

    def record_unused(self, names: list[str]) -> None:
        self.unused = set(names)

    def hyper_defaults(self) -> dict[str, float]:
        return {hyper_name(k, i): v for i, opt in enumerate(self.optimizers) for k, v in opt.hyper.items()}

    def updated_params(self) -> list[str]:
        return [n for names in self.owned for n in names if n not in self.unused]

    def updated_states(self) -> list[str]:
        return [
            state_name(n, k)
            for i, names in enumerate(self.owned)
            for n in names
            if n not in self.unused
            for k in self.optimizers[i].state_names
        ]

    def baked(self) -> list[str]:
        """Settings fixed at trace time (not run-time inputs), for the compile report."""
        notes = []
        for i, opt in enumerate(self.optimizers):
            fixed = {k: v for k, v in opt.defaults.items() if k not in opt.hyper_names}
            notes.append(f"{type(opt).__name__}[{i}] {fixed}")
        return notes

    # --- traced computation ------------------------------------------------------------------
    def clip(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        clipped = dict(grads)
        for i, opt in enumerate(self.optimizers):
            names = [n for n in self.owned[i] if n in grads]
            result = opt.clip_gradients([grads[n] for n in names]) if names else None
            if result is not None:
                clipped.update(zip(names, result))
        return clipped

    def update(self, named: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        new_params: list[torch.Tensor] = []
        new_states: list[torch.Tensor] = []
        for i, opt in enumerate(self.optimizers):
            names = [n for n in self.owned[i] if n in grads]
            hyper = {k: named[hyper_name(k, i)] for k in opt.hyper_names}
            states = [{k: named[state_name(n, k)] for k in opt.state_names} for n in names]
            params, states = opt.update([named[n] for n in names], [grads[n] for n in names], states, hyper)
            new_params += params
            new_states += [s[k] for s in states for k in opt.state_names]
        return new_params + new_states


def make_plan(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    optimizers: Sequence[SambaOptimizer],
    backward: bool,
    graphamp: str | None = None,
) -> StepPlan:
    if not isinstance(model, nn.Module):
        raise SambaTraceError(f"trace_graph expects an nn.Module as model, got {type(model).__name__}")
    params, paths = _named_parameters(model)
    buffers = []
    for path, buffer in model.named_buffers():
        name = buffer_name(path)
        paths[name] = path
        buffers.append((name, buffer.detach()))
    _check_optimizers(optimizers, params)
    named, slots = _named_inputs(inputs)
    preset = check_preset(graphamp)
    return StepPlan(named, params, buffers, paths, list(optimizers), backward, slots, graphamp=preset)


def _named_parameters(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    params, paths = [], {}
    for path, param in model.named_parameters():
        if getattr(param, "sn_name", None) is None:
            raise SambaTraceError(
                f"parameter '{path}' of {type(model).__name__} is a plain torch parameter. Call "
                "samba.from_torch_model_(model) before tracing (and before building the optimizer)."
            )
        paths[param.sn_name] = path
        params.append((param.sn_name, param.torch().detach().requires_grad_(param.requires_grad)))
    return params, paths


def _named_inputs(
    inputs: Sequence[torch.Tensor | None],
) -> tuple[list[tuple[str, torch.Tensor]], list[str | None]]:
    """The named inputs, and forward's positional slots (None entries stay None: the defaults).

    Inputs are traced contiguous: the compiled graph expects dense inputs whatever view the app
    traced with (an expanded position-ids tensor, say), and the runtime lays feeds out to match.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    named: list[tuple[str, torch.Tensor]] = []
    slots: list[str | None] = []
    for i, value in enumerate(inputs):
        if value is None:
            slots.append(None)
            continue
        name = getattr(value, "sn_name", None)
        if not isinstance(value, torch.Tensor) or name is None:
            raise SambaTraceError(
                f"input {i} ({type(value).__name__}) has no name: create inputs with "
                "samba.randn(..., name='x', batch_dim=0) or samba.from_torch_tensor(t, name='x'); "
                "pass None for a forward argument left at its default"
            )
        if any(n == name for n, _ in named):
            raise SambaTraceError(f"two inputs are named '{name}': input names must be unique")
        plain = value.as_subclass(torch.Tensor).detach().contiguous().requires_grad_(value.requires_grad)
        plain.batch_dim = getattr(value, "batch_dim", None)
        named.append((name, plain))
        slots.append(name)
    return named, slots


def _check_optimizers(optimizers: Sequence[SambaOptimizer], params: list[tuple[str, torch.Tensor]]) -> None:
    known = {n for n, _ in params}
    seen: dict[str, int] = {}
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, SambaOptimizer):
            raise SambaTraceError(
                f"optimizer {i} is a {type(opt).__name__}; use samba.optim.SGD or samba.optim.AdamW "
                "(torch.optim optimizers cannot be traced into the graph)"
            )
        for p in opt.params:
            if p.sn_name not in known:
                raise SambaTraceError(
                    f"optimizer {i} updates '{p.sn_name}', which is not a parameter of the model"
                )
            if p.sn_name in seen:
                raise SambaTraceError(
                    f"parameter '{p.sn_name}' is in optimizers {seen[p.sn_name]} and {i}: "
                    "parameter sets must be disjoint"
                )
            seen[p.sn_name] = i

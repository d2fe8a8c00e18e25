"""What a step reads and writes, by name: inputs, parameters, buffers, optimizer state, hyperparameters."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from sambaflow.errors import SambaTraceError
from sambaflow.optim.base import SambaOptimizer, hyper_name, state_name
from sambaflow.tensors.meta import on_host
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
    #: forward's keyword arguments when the app traced `forward(**inputs)`: the same structure with
    #: each input tensor replaced by its `InputSlot` (tuples nest; Python constants stay as given)
    keywords: dict[str, Any] = field(default_factory=dict)

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

    def call_kwargs(self, values: dict[str, torch.Tensor]) -> dict[str, Any]:
        """forward's keyword arguments: each `InputSlot` replaced by its named value."""
        return {key: _fill(template, values) for key, template in self.keywords.items()}

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
        buffers.append((name, on_host(buffer.detach())))
    _check_optimizers(optimizers, params)
    keywords: dict[str, Any] = {}
    if isinstance(inputs, Mapping):
        named, slots, keywords = _keyword_inputs(model, inputs)
    else:
        named, slots = _named_inputs(inputs)
    preset = check_preset(graphamp)
    plan = StepPlan(named, params, buffers, paths, list(optimizers), backward, slots, graphamp=preset)
    plan.keywords = keywords
    return plan


@dataclass(frozen=True)
class InputSlot:
    """Where a named input tensor goes in forward's keyword arguments."""

    name: str


def _fill(template: Any, values: dict[str, torch.Tensor]) -> Any:
    if isinstance(template, InputSlot):
        return values[template.name]
    if isinstance(template, (tuple, list)):
        return type(template)(_fill(t, values) for t in template)
    return template


def takes_keywords(model: nn.Module, inputs: Any) -> bool:
    """Whether `inputs` is a dict of forward's keyword arguments rather than `{graph name: inputs}`:
    some key names a parameter of `model.forward` (or forward takes **kwargs and no value is a
    tuple or list of inputs, which a graph's inputs would be)."""
    if not isinstance(inputs, Mapping) or not inputs:
        return False
    params = inspect.signature(model.forward).parameters
    if any(k in params for k in inputs):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return not any(isinstance(v, (tuple, list)) for v in inputs.values())
    return False


def _keyword_inputs(
    model: nn.Module, inputs: Mapping[str, Any]
) -> tuple[list[tuple[str, torch.Tensor]], list[str | None], dict[str, Any]]:
    """`forward(**inputs)`: named tensors (also inside tuples) become inputs, the rest constants."""
    params = inspect.signature(model.forward).parameters
    unknown = [k for k in inputs if k not in params]
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        params = list(params)
        raise SambaTraceError(
            f"inputs dict keys {unknown} are not parameters of {type(model).__name__}.forward "
            f"({params}): a dict of inputs is traced as forward(**inputs)"
        )
    named: list[tuple[str, torch.Tensor]] = []
    keywords = {key: _slot_tree(value, key, named) for key, value in inputs.items()}
    return named, [], keywords


def _slot_tree(value: Any, where: str, named: list[tuple[str, torch.Tensor]]) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_slot_tree(v, f"{where}[{i}]", named) for i, v in enumerate(value))
    if isinstance(value, Mapping):
        raise SambaTraceError(
            f"input '{where}' is a dict: forward's keyword arguments may hold tensors, tuples or lists "
            "of them and Python constants; pass its entries as separate arguments"
        )
    if not isinstance(value, torch.Tensor):
        return value  # a Python constant (use_cache=True, return_dict=False): fixed in the graph
    name = getattr(value, "sn_name", None)
    if name is None:
        raise SambaTraceError(
            f"input '{where}' is a tensor with no name: make it with samba.from_torch_tensor(t, name=...)"
        )
    if any(n == name for n, _ in named):
        raise SambaTraceError(f"two inputs are named '{name}' (at '{where}'): input names must be unique")
    named.append((name, _plain_input(value)))
    return InputSlot(name)


def _plain_input(value: torch.Tensor) -> torch.Tensor:
    plain = value.as_subclass(torch.Tensor).detach().contiguous().requires_grad_(value.requires_grad)
    plain.batch_dim = getattr(value, "batch_dim", None)
    return plain


def _named_parameters(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    params, paths = [], {}
    for path, param in model.named_parameters():
        if getattr(param, "sn_name", None) is None:
            raise SambaTraceError(
                f"parameter '{path}' of {type(model).__name__} is a plain torch parameter. Call "
                "samba.from_torch_model_(model) before tracing (and before building the optimizer)."
            )
        paths[param.sn_name] = path
        params.append((param.sn_name, on_host(param.torch().detach()).requires_grad_(param.requires_grad)))
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
        named.append((name, _plain_input(value)))
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

"""Trace forward, backward and the optimizer update of a model into one ATen graph.

The step is a pure function of named tensors: (inputs, parameters, buffers, optimizer state,
hyperparameters, output-gradient seeds) -> (outputs, gradients, new parameters, new state).
`make_fx` records it on fake tensors, so tracing needs no memory for activations and a
data-dependent branch fails instead of being baked in. Sections are cut where the step moves
from forward to backward to optimizer; every node is tagged with its section.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.utils import _pytree as pytree

from sambaflow.errors import SambaTraceError
from sambaflow.optim.base import SambaOptimizer
from sambaflow.trace.casts import IndexCasts, looks_compiled
from sambaflow.trace.constants import RealConstants, prime_caches
from sambaflow.trace.graph import (
    BUFFER,
    GRAD,
    HYPER,
    INPUT,
    INPUT_GRAD,
    OUTPUT,
    OUTPUT_GRAD,
    PARAM,
    PARAM_UPDATE,
    STATE,
    STATE_UPDATE,
    TensorSpec,
    TracedGraph,
)
from sambaflow.trace.hooks import DropoutAsInput, DropoutSite, ModuleWatch, watching_modules
from sambaflow.trace.locate import records_sources, trace_error
from sambaflow.trace.plan import StepPlan, make_plan
from sambaflow.trace.precision import autocast_for, precision_name


@dataclass
class ForwardProbe:
    """What one fake forward pass tells before the real trace: outputs and dropout sites."""

    outputs: list[torch.Tensor]
    output_names: list[str]
    dropout_sites: list[DropoutSite]
    #: per output: whether a loss module (nn.CrossEntropyLoss, ...) returned it
    from_loss_module: list[bool]


def trace_step(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    optimizers: Sequence[SambaOptimizer],
    *,
    loss_indices: Sequence[int] | None = None,
    backward: bool = True,
    graphamp: str | None = None,
) -> TracedGraph:
    """Trace one whole step of `model` on `inputs`; forward only when `backward` is False.

    `graphamp` "mp1" traces the forward under bf16 autocast (trace/precision.py); backward and
    the optimizer update run outside it, as in eager autocast training.
    """
    plan = make_plan(model, inputs, optimizers, backward, graphamp)
    if plan.keywords:  # forward(**inputs), as SambaNova's modelzoo traces: caches get real values first
        _prime(model, plan)
    probe = _probe_forward(model, plan)
    loss_names = _loss_names(probe, loss_indices)
    specs = _input_specs(plan, probe, backward)
    marks: list[int] = []
    step = _step_function(model, plan, probe, specs, marks)
    examples = [_example(plan, spec) for spec in specs]
    try:
        module = make_fx(
            step, tracing_mode="fake", record_stack_traces=records_sources(), _allow_non_fake_inputs=True
        )(*examples)
    except SambaTraceError:
        raise
    except Exception as exc:
        raise trace_error(exc, type(model).__name__) from None
    _refuse_fake_constants(module, model)
    outputs = _output_specs(plan, probe, module)
    sections = _tag_sections(module, marks, plan)
    _drop_detaches(module.graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    defaults = {s.name: s.p for s in probe.dropout_sites} | plan.hyper_defaults()
    precision = precision_name(plan.graphamp, [t for _, t in plan.params], [t for _, t in plan.inputs])
    return TracedGraph(module, specs, outputs, sections, loss_names, defaults, plan.baked(), precision)


def _refuse_fake_constants(module: fx.GraphModule, model: nn.Module) -> None:
    """A constant of the graph that holds no data: the model made a tensor during an earlier fake
    pass and kept it (a cache set in forward()). Named here, not later where it is used or stored."""
    for node in module.graph.nodes:
        value = getattr(module, node.target, None) if node.op == "get_attr" else None
        if isinstance(value, FakeTensor):
            where = _attribute_holding(model, value) or f"a tensor of shape {list(value.shape)}"
            raise SambaTraceError(
                f"{type(model).__name__}: forward() reads {where}, which it made during an earlier "
                "pass of this trace and kept between calls (a cache set in forward()): sambaflow "
                "traces with fake tensors, so it holds no data. Make it when the model is built "
                "(in __init__, e.g. as a buffer), or compute it in forward() on every call"
            )


def _attribute_holding(model: nn.Module, value: torch.Tensor) -> str | None:
    """`Class.attribute` (or `Class.attribute[key]`) of the module that keeps `value`."""
    for module in model.modules():
        for name, held in vars(module).items():
            entries = held.items() if isinstance(held, dict) else [(None, held)]
            for key, item in entries:
                if item is value:
                    return f"{type(module).__name__}.{name}" + (f"[{key!r}]" if key is not None else "")
    return None


def _prime(model: nn.Module, plan: StepPlan) -> None:
    """One real forward before the fake ones (trace/constants.py)."""
    values = dict(plan.inputs)
    try:
        with _autocast(plan):
            prime_caches(model, dict(plan.named_state()), plan.call_args(values), plan.call_kwargs(values))
    except Exception as exc:
        raise trace_error(exc, type(model).__name__) from None


def _probe_forward(model: nn.Module, plan: StepPlan) -> ForwardProbe:
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # real cached tensors become constants
    with mode:
        values = {n: mode.from_tensor(t).requires_grad_(t.requires_grad) for n, t in plan.named_state()}
        args = {n: mode.from_tensor(t).requires_grad_(t.requires_grad) for n, t in plan.inputs}
    try:
        with mode, library_calls(model, lambda s: s.p) as (watch, drop), _autocast(plan):
            result = functional_call(model, values, plan.call_args(args), plan.call_kwargs(args))
    except Exception as exc:
        raise trace_error(exc, type(model).__name__) from None
    outputs = _flatten_outputs(result, model)
    losses = [id(v) in watch.from_loss_module for v in outputs]
    return ForwardProbe(outputs, _output_names(outputs, watch, model), drop.sites, losses)


def _flatten_outputs(result: Any, model: nn.Module) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(result)
    if not leaves or not all(isinstance(v, torch.Tensor) for v in leaves):
        raise SambaTraceError(
            f"{type(model).__name__}.forward must return a tensor or a tuple/list of tensors; got "
            f"{type(result).__name__}. Return only tensors from forward()."
        )
    return leaves


def _output_names(outputs: list[torch.Tensor], watch: Any, model: nn.Module) -> list[str]:
    names: list[str] = []
    for i, value in enumerate(outputs):
        path, index, _ = watch.producer.get(id(value), (type(model).__name__.lower(), i, None))
        name = f"{path.replace('.', '__')}__outputs__{index}"
        names.append(name if name not in names else f"{name}__{i}")
    return names


def _loss_names(probe: ForwardProbe, loss_indices: Sequence[int] | None) -> list[str]:
    if loss_indices is None:  # scalars, and what a loss module returned (reduction='none' too)
        return [
            n
            for n, v, from_loss in zip(probe.output_names, probe.outputs, probe.from_loss_module)
            if v.is_floating_point() and (v.dim() == 0 or from_loss)
        ]
    bad = [i for i in loss_indices if not 0 <= i < len(probe.outputs)]
    if bad:
        raise SambaTraceError(
            f"loss_indices {bad} out of range: forward returns {len(probe.outputs)} outputs"
        )
    return [probe.output_names[i] for i in loss_indices]


def _differentiable(probe: ForwardProbe) -> list[int]:
    return [i for i, v in enumerate(probe.outputs) if v.requires_grad and v.is_floating_point()]


def _input_specs(plan: StepPlan, probe: ForwardProbe, backward: bool) -> list[TensorSpec]:
    specs = [TensorSpec.of(n, INPUT, t, getattr(t, "batch_dim", None)) for n, t in plan.inputs]
    specs += [TensorSpec.of(n, PARAM, t) for n, t in plan.params]
    specs += [TensorSpec.of(n, BUFFER, t) for n, t in plan.buffers]
    specs += [TensorSpec.of(n, STATE, t) for n, t in plan.states]
    scalar = torch.zeros((), dtype=torch.float64)
    hypers = [s.name for s in probe.dropout_sites] + (list(plan.hyper_defaults()) if backward else [])
    specs += [TensorSpec.of(n, HYPER, scalar) for n in dict.fromkeys(hypers)]
    if backward:
        specs += [
            TensorSpec.of(f"{probe.output_names[i]}__grad", OUTPUT_GRAD, probe.outputs[i])
            for i in _differentiable(probe)
        ]
    return specs


def _example(plan: StepPlan, spec: TensorSpec) -> torch.Tensor:
    value = plan.value_of(spec.name)
    if value is None:
        value = torch.zeros(spec.shape, dtype=spec.dtype)
    return value.detach().requires_grad_(spec.role in (PARAM, INPUT) and plan.wants_grad(spec.name))


def _step_function(
    model: nn.Module, plan: StepPlan, probe: ForwardProbe, specs: list[TensorSpec], marks: list[int]
) -> Any:
    def step(*flat: torch.Tensor) -> list[torch.Tensor]:
        named = {spec.name: value for spec, value in zip(specs, flat)}
        state = {plan.paths[n]: named[n] for n, _ in plan.params + plan.buffers}
        with library_calls(model, lambda s: named[s.name]), _autocast(plan):
            result = functional_call(model, state, plan.call_args(named), plan.call_kwargs(named))
            outputs = pytree.tree_leaves(result)
        marks.append(_node_count())
        if not plan.backward:
            return outputs
        return outputs + _backward_and_update(plan, probe, named, outputs, marks)

    return step


@contextlib.contextmanager
def library_calls(model: nn.Module, probability: Any) -> Iterator[tuple[ModuleWatch, DropoutAsInput]]:
    """While the model runs under the tracer: module paths, dropout as inputs, index casts, and
    `torch.compiler.is_compiling()` True (libraries then take their traceable paths)."""
    with looks_compiled(), watching_modules(model) as watch, DropoutAsInput(watch, probability) as drop:
        with IndexCasts(), RealConstants():
            yield watch, drop


def _autocast(plan: StepPlan) -> Any:
    return autocast_for(plan.graphamp, [t for _, t in plan.params + plan.inputs])


def _node_count() -> int:
    return len(get_proxy_mode().tracer.graph.nodes)


def _backward_and_update(
    plan: StepPlan,
    probe: ForwardProbe,
    named: dict[str, torch.Tensor],
    outputs: list[torch.Tensor],
    marks: list[int],
) -> list[torch.Tensor]:
    diff = _differentiable(probe)
    wrt = [named[n] for n in plan.grad_names()]
    seeds = [named[f"{probe.output_names[i]}__grad"] for i in diff]
    grads = torch.autograd.grad([outputs[i] for i in diff], wrt, seeds, allow_unused=True)
    plan.record_unused([n for n, g in zip(plan.grad_names(), grads) if g is None])
    grad_of = {n: g for n, g in zip(plan.grad_names(), grads) if g is not None}
    marks.append(_node_count())
    with torch.no_grad():
        clipped = plan.clip(grad_of)
        marks.append(_node_count())
        updates = plan.update(named, clipped)
    return list(grad_of.values()) + updates


def _output_specs(plan: StepPlan, probe: ForwardProbe, module: fx.GraphModule) -> list[TensorSpec]:
    specs = [TensorSpec.of(n, OUTPUT, v) for n, v in zip(probe.output_names, probe.outputs)]
    if plan.backward:
        for name in plan.grad_names():
            if name not in plan.unused:
                role = INPUT_GRAD if plan.is_input(name) else GRAD
                specs.append(TensorSpec.of(f"{name}__grad", role, plan.value_of(name)))
        specs += [TensorSpec.of(n, PARAM_UPDATE, plan.value_of(n)) for n in plan.updated_params()]
        specs += [TensorSpec.of(n, STATE_UPDATE, plan.value_of(n)) for n in plan.updated_states()]
    output_node = next(n for n in module.graph.nodes if n.op == "output")
    if len(output_node.args[0]) != len(specs):
        raise SambaTraceError(f"internal: traced {len(output_node.args[0])} outputs, expected {len(specs)}")
    return specs


def _drop_detaches(graph: fx.Graph) -> None:
    """`detach` only matters to autograd; the traced step runs without it."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _tag_sections(module: fx.GraphModule, marks: list[int], plan: StepPlan) -> list[str]:
    names = ["fwd"] if not plan.backward else ["fwd", "bckwd", "gradnorm", "opt"]
    bounds = marks + [len(module.graph.nodes) + 1]
    for index, node in enumerate(module.graph.nodes):
        if node.op not in ("placeholder", "output"):
            node.meta["section"] = names[next(k for k, b in enumerate(bounds) if index < b)]
    present = {n.meta.get("section") for n in module.graph.nodes}
    return [name for name in names if name in present or name == "fwd"]

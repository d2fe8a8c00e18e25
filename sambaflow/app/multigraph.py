"""SambaFlow's multigraph API, app side: trace graphs, compile them into one PEF, load them.

    outputs = samba.utils.trace_multigraph(model, {'input_ids': ids, 'use_cache': True},
                                           trace_prefix='cache_gen')      # outputs: named SambaTensors
    outputs[1].sn_region_name = ...                                        # connect graphs by region
    samba.session.add_graph(samba.graph.FwdGraph(inputs, outputs, name='cache_gen'))
    samba.session.compile_multigraph(name='textgen', config_dict=cfg)      # one PEF, a graph each
    ...                                                                    # run: trace and add again
    samba.session.init_multigraph_runtime(pef)

Each graph is a forward graph of its own model (the models may share weights: a weight is one
device tensor by its name). `trace_multigraph` traces `model(**inputs)` (or `model(*inputs)`),
where inputs may nest tuples, lists and dicts of named tensors beside Python constants, and
returns the flattened outputs as SambaTensors named `<trace_prefix>__outputs__<i>`. Region names
set on inputs and outputs before `compile_multigraph` / `init_multigraph_runtime` decide which
tensors the graphs share (trace/regions.py).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from sambaflow.app.backend_choice import choose_backend
from sambaflow.app.compile import CompileLog, _header, pef_path_for
from sambaflow.app.precision import requested_preset
from sambaflow.app.tracing import _from_pef, load_pef, progress
from sambaflow.atomic import check_writable, reported_as
from sambaflow.backends.base import export_many
from sambaflow.errors import SambaPefError, SambaRunError, SambaTraceError
from sambaflow.passes.forward_only import drop_gradient_only_arguments
from sambaflow.passes.inplace import update_inputs_in_place
from sambaflow.passes.sections import FULL_STEP, full_step_program
from sambaflow.pef.check import check_precision
from sambaflow.pef.file import CompiledGraph, PefFile, write_pef
from sambaflow.pef.schema import GRAPH_NAME
from sambaflow.pef.sign import key_path, load_key, user_key
from sambaflow.runtime.executable import Executable
from sambaflow.runtime.multigraph import FwdGraph, RegionGraph
from sambaflow.runtime.session import Session, session
from sambaflow.tensors.sambatensor import SambaTensor
from sambaflow.trace.calls import CallStructure, structured_call
from sambaflow.trace.graph import INPUT, OUTPUT, TensorSpec, TracedGraph
from sambaflow.trace.regions import GraphRegions, bind_regions, plan_regions, region_of
from sambaflow.trace.tracer import trace_step

#: pef_metadata key: each graph's own precision (a graph without weights, such as token_gen_init, is
#: fp32 in a bf16 model's PEF)
GRAPH_PRECISIONS = "multigraph_precisions"


@dataclass
class TracedMultigraph:
    """What `trace_multigraph` traced: the graph, its model, inputs and returned outputs."""

    name: str
    traced: TracedGraph
    model: nn.Module
    inputs: list[torch.Tensor]
    outputs: tuple[SambaTensor, ...]


def trace_multigraph(model: nn.Module, inputs: Any, trace_prefix: str, **_: Any) -> tuple[SambaTensor, ...]:
    """Trace the forward graph `trace_prefix` of `model` on `inputs`; return its outputs."""
    if not isinstance(trace_prefix, str) or re.fullmatch(GRAPH_NAME, trace_prefix) is None:
        raise SambaTraceError(
            f"trace_multigraph: trace_prefix {trace_prefix!r} names the graph: use letters, digits, "
            "'_' and '-', starting with a letter"
        )
    structure = CallStructure.of(inputs, f"trace_multigraph('{trace_prefix}')")
    call = structured_call(model, structure)
    traced = trace_step(call, structure.named(), [], backward=False, graphamp=requested_preset(None))
    session.trace_count += 1
    drop_gradient_only_arguments(traced.module)  # forward-only: the same graph with or without a pad token
    outputs = tuple(
        _placeholder(f"{trace_prefix}__outputs__{i}", spec.shape, spec.dtype)
        for i, spec in enumerate(traced.model_outputs)
    )
    traced.outputs = [
        TensorSpec(t.sn_name, OUTPUT, s.shape, s.dtype) for t, s in zip(outputs, traced.outputs)
    ]
    traced._by_role = {}
    session.traced_multigraphs[trace_prefix] = TracedMultigraph(
        trace_prefix, traced, model, list(structure.tensors), outputs
    )
    return outputs


def _placeholder(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> SambaTensor:
    """An output's host stand-in: right shape and dtype, no memory (read values from the device
    with get_tensors_by_name after a run)."""
    return SambaTensor(torch.zeros((), dtype=dtype).expand(shape), name=name)


def bound_graphs(current: Session) -> tuple[dict[str, TracedMultigraph], dict[str, TracedGraph], dict]:
    """The added graphs, each traced graph named by region, and the regions' specs."""
    if not current.added_graphs:
        raise SambaTraceError(
            "no graphs were added: trace each graph with trace_multigraph and add it with "
            "samba.session.add_graph(FwdGraph(inputs, outputs, name=...)) first"
        )
    found = {name: _traced_for(current, graph) for name, graph in current.added_graphs.items()}
    plans = [_graph_regions(name, found[name]) for name in found]
    regions = plan_regions(plans)
    return found, {plan.name: bind_regions(plan, regions) for plan in plans}, regions


def _traced_for(current: Session, graph: FwdGraph) -> TracedMultigraph:
    traced = current.traced_multigraphs.get(graph.name)
    if traced is None:
        raise SambaTraceError(
            f"graph '{graph.name}' was added but not traced: call trace_multigraph(model, inputs, "
            f"trace_prefix='{graph.name}') and add the outputs it returns; traced: {sorted(current.traced_multigraphs)}"
        )
    given = {id(t) for t in pytree.tree_leaves(graph.inputs) if isinstance(t, torch.Tensor)}
    if given != {id(t) for t in traced.inputs}:
        raise SambaTraceError(
            f"graph '{graph.name}': FwdGraph's inputs are not the tensors trace_multigraph traced it "
            f"with (trace_prefix='{graph.name}'); pass the same inputs"
        )
    outputs = tuple(graph.outputs) if isinstance(graph.outputs, (list, tuple)) else (graph.outputs,)
    if len(outputs) != len(traced.outputs) or any(a is not b for a, b in zip(outputs, traced.outputs)):
        raise SambaTraceError(
            f"graph '{graph.name}': FwdGraph's outputs are not the tensors trace_multigraph returned "
            f"for trace_prefix='{graph.name}'; pass those ({len(traced.outputs)} tensors)"
        )
    return traced


def _graph_regions(name: str, traced: TracedMultigraph) -> GraphRegions:
    inputs = {t.sn_name: region_of(t) for t in traced.inputs}
    return GraphRegions(name, traced.traced, inputs, [region_of(t) for t in traced.outputs])


def _programs(graph: TracedGraph) -> tuple[dict[str, Any], list[str]]:
    """The graph's one program, writing outputs whose region is one of its inputs in place."""
    result = update_inputs_in_place(full_step_program(graph))
    return {FULL_STEP: result.program, "fwd": result.program}, result.updated


def compile_multigraph(
    current: Session,
    name: str | None = None,
    config_dict: dict[str, Any] | None = None,
    pef_metadata: dict[str, Any] | None = None,
    backend: str | None = None,
    **_: Any,
) -> str:
    """Trace-checked, compiled and written: every added graph into one PEF; returns its path.
    `enable_hypersection` and other RDU compiler options are accepted and have no effect."""
    config = dict(config_dict or {})
    name = name or "multigraph"
    path = pef_path_for(name, config, True)
    check_writable(path, "the PEF")
    key = load_key(key_path(config.get("sign_key"))) or user_key(create=True)
    log = CompileLog(path)
    chosen = choose_backend(backend or config.get("backend"), log.note)
    started = time.perf_counter()
    found, bound, regions = bound_graphs(current)
    log.note(f"multigraph '{name}': graphs {list(bound)} sharing {len(regions)} input/output regions")
    compiled = _compiled_graphs(bound, found, chosen, log)
    metadata = {**(pef_metadata or {}), GRAPH_PRECISIONS: {n: g.precision for n, g in bound.items()}}
    header = _header(name, chosen, config, metadata, True, False, None)
    main = next(iter(bound.values()))
    header["precision"] = main.precision
    text = "\n\n".join(f"# graph {n}\n{g.as_text()}" for n, g in bound.items())
    with reported_as(path, "the PEF"):
        write_pef(path, header, compiled, text, key)
    seconds = time.perf_counter() - started
    log.note(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB) in {seconds:.1f} s")
    log.finish({k: v for k, v in config.items() if v is not None}, main)  # unset options had no say
    return path


def _compiled_graphs(
    bound: dict[str, TracedGraph], found: dict[str, TracedMultigraph], backend: Any, log: CompileLog
) -> dict[str, CompiledGraph]:
    """Every graph's program compiled, all in one batch (a backend such as inductor compiles
    several at once, in worker processes)."""
    programs = {}
    for name, graph in bound.items():
        programs[name], updated = _programs(graph)
        in_place = f" (in place: {', '.join(updated)})" if updated else ""
        model = type(found[name].model).__name__
        log.note(f"graph '{name}' of {model}: compiling with the {backend.name} backend{in_place}")
    batch = {f"{name}.{FULL_STEP}": p[FULL_STEP] for name, p in programs.items()}
    binaries = export_many(backend, batch)
    return {
        name: CompiledGraph(bound[name], p, {k: binaries[f"{name}.{FULL_STEP}"] for k in p})
        for name, p in programs.items()
    }


def init_multigraph_runtime(current: Session, pef: str, **_: Any) -> None:
    """Check the added graphs (traced again by the app) against `pef`, load its programs, and put
    every graph's model weights on the device."""
    if not isinstance(pef, str) or not pef:
        raise SambaRunError(f"init_multigraph_runtime: pef must be the path of a compiled PEF, got {pef!r}")
    pef_file = load_pef(pef)
    found, bound, regions = bound_graphs(current)
    missing = [n for n in bound if n not in pef_file.kinds]
    if missing:
        raise SambaRunError(
            f"init_multigraph_runtime: '{pef}' has no graph(s) {missing}; it holds "
            f"{sorted(pef_file.kinds)}: recompile it with the graphs this app adds"
        )
    loaded = {
        n: RegionGraph(_loaded(pef_file, n, g), found[n].model, _programs(g)[1], _aliases(found[n]))
        for n, g in bound.items()
    }
    inputs = {s.name for g in bound.values() for s in g.inputs_with_role(INPUT)}
    current.load_region_graphs(loaded, {r: s for r, s in regions.items() if r in inputs})
    progress(f"loaded multigraph PEF {pef}: graphs {list(loaded)}")


def _aliases(traced: TracedMultigraph) -> dict[str, str]:
    return {t.sn_name: region_of(t) for t in traced.inputs if region_of(t) != t.sn_name}


def _loaded(pef_file: PefFile, name: str, graph: TracedGraph) -> Executable:
    """Graph `name` of the PEF, checked against the app's trace: its own recorded precision first
    (a bf16 model's PEF has fp32 graphs without weights), then names, shapes and computation."""
    recorded = pef_file.manifest.get("pef_metadata", {}).get(GRAPH_PRECISIONS, {})
    check_precision(graph, recorded.get(name, pef_file.manifest["precision"]), pef_file.path)
    graph.precision = pef_file.manifest["precision"]  # checked above; _from_pef checks the PEF-wide one
    try:
        return _from_pef(pef_file, graph, False, kind=name)
    except SambaPefError as exc:
        raise SambaPefError(f"graph '{name}': {exc}") from None


__all__ = ["compile_multigraph", "init_multigraph_runtime", "trace_multigraph"]

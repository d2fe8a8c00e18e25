"""SambaFlow's multigraph runtime: several graphs of one PEF sharing device tensors by region.

    samba.session.add_graph(FwdGraph(inputs, outputs, name='token_gen'))   # after trace_multigraph
    samba.session.compile_multigraph(name=..., config_dict=...)            # every added graph, one PEF
    samba.session.init_multigraph_runtime(pef)                             # at run, after tracing again
    samba.session.run(input_tensors={'input_ids': ids}, graph_name='token_gen')
    logits = samba.session.get_tensors_by_name(['logits'])[0]

The store is keyed by region (trace/regions.py). A run of one graph takes the inputs it is given
(by tensor name or region name) and reads every other input from its region: what an earlier run
fed or wrote there. Its outputs are written into their regions; one whose region is one of its
inputs updates that tensor in place. An input whose region nothing has written yet must be fed.
A mixin of `Session`; the app layer installs the tracing and compiling side (`set_multigraph_hooks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from sambaflow.errors import SambaRunError
from sambaflow.passes.sections import FULL_STEP
from sambaflow.runtime.executable import Executable
from sambaflow.runtime.store_placement import device_tensor, runs_on_cpu
from sambaflow.tensors.model import buffer_name
from sambaflow.tensors.sambatensor import SambaTensor, named_view
from sambaflow.trace.graph import BUFFER, INPUT, PARAM, TensorSpec


class FwdGraph:
    """A forward graph to compile into a multigraph PEF: the inputs `trace_multigraph` was given,
    the outputs it returned, and the graph's name (`samba.graph.FwdGraph`)."""

    def __init__(self, inputs: Any, outputs: Any, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise SambaRunError(f"FwdGraph: name must be a non-empty string, got {name!r}")
        self.inputs, self.outputs, self.name = inputs, outputs, name

    def __repr__(self) -> str:
        return f"FwdGraph(name={self.name!r})"


@dataclass
class RegionGraph:
    """A loaded graph: its executable (named by region), its model, and the regions the program
    updates in place (not among its returned outputs)."""

    executable: Executable
    model: nn.Module
    updated: list[str]
    #: an input's tensor name -> its region, where they differ (feeds may use either)
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.executable.graph.inputs_with_role(INPUT)


class MultigraphSession:
    """Multigraph state and runs of a session (`Session` inherits it)."""

    def _reset_multigraph(self) -> None:
        self._multigraph_hooks: dict[str, Callable[..., Any]] = {}
        self.clear_graphs()

    def clear_graphs(self) -> None:
        """Forget the traced and added multigraph graphs and the loaded ones."""
        #: graphs traced by trace_multigraph, by trace prefix (the app layer fills it)
        self.traced_multigraphs: dict[str, Any] = {}
        #: graphs added for the next compile_multigraph / init_multigraph_runtime, in order
        self.added_graphs: dict[str, FwdGraph] = {}
        self._reset_region_runtime()

    def _reset_region_runtime(self) -> None:
        self.region_graphs: dict[str, RegionGraph] = {}
        self._written: set[str] = set()

    def set_multigraph_hooks(self, compile: Callable[..., str], init: Callable[..., None]) -> None:
        self._multigraph_hooks = {"compile": compile, "init": init}

    def add_graph(self, graph: FwdGraph) -> None:
        """Add a traced graph to the multigraph PEF; a second graph of the same name replaces it."""
        if not isinstance(graph, FwdGraph):
            raise SambaRunError(f"add_graph expects a samba.graph.FwdGraph, got {type(graph).__name__}")
        self.added_graphs[graph.name] = graph

    def compile_multigraph(self, name: str | None = None, **kwargs: Any) -> str:
        """Compile every added graph into one PEF; return its path (see app/multigraph.py)."""
        return self._hook("compile")(self, name=name, **kwargs)

    def init_multigraph_runtime(self, pef: str, **kwargs: Any) -> None:
        """Load the added graphs (traced again by the app) from `pef` and put their models'
        weights on the device."""
        self._hook("init")(self, pef, **kwargs)

    def _hook(self, which: str) -> Callable[..., Any]:
        if which not in self._multigraph_hooks:
            raise SambaRunError(
                "session: multigraph compile/load is not installed; import sambaflow.samba first"
            )
        return self._multigraph_hooks[which]

    # --- loading ------------------------------------------------------------------------------
    def load_region_graphs(
        self, graphs: Mapping[str, RegionGraph], regions: Mapping[str, TensorSpec]
    ) -> None:
        """Make `graphs` the session's graphs: weights of their models on the device, every input
        region present (zeros until fed or written)."""
        self.reset()
        self.region_graphs = dict(graphs)
        first = next(iter(graphs.values()))
        self.executable = first.executable
        shared = set() if runs_on_cpu(first.executable.graph) else None
        for graph_name, graph in graphs.items():
            specs = {s.name: s for s in graph.executable.graph.inputs_with_role(PARAM, BUFFER)}
            for name, tensor in _weights(graph.model):
                if name in specs and name not in self.store:
                    self.store[name] = device_tensor(tensor, specs[name], shared)
            missing = [n for n in specs if n not in self.store]
            if missing:
                raise SambaRunError(
                    f"graph '{graph_name}': weight(s) {missing[:5]} are not tensors of its model "
                    f"{type(graph.model).__name__}: trace it again with the model it was compiled from"
                )
        for region, spec in regions.items():
            self.store[region] = torch.zeros(spec.shape, dtype=spec.dtype)

    # --- running ------------------------------------------------------------------------------
    def run_region_graph(self, graph_name: str, input_tensors: Any) -> list[SambaTensor]:
        """Run one loaded graph on the given feeds; return its outputs (views of the store)."""
        graph = self._region_graph(graph_name)
        feeds = region_feeds(graph_name, input_tensors, graph.inputs, graph.aliases)
        unwritten = [s.name for s in graph.inputs if s.name not in feeds and s.name not in self._written]
        if unwritten:
            raise SambaRunError(
                f"session.run(graph_name='{graph_name}'): input region(s) {unwritten} were never fed "
                f"nor written by an earlier graph: feed them (input_tensors={{name: tensor}}); "
                f"this graph reads {[s.describe() for s in graph.inputs]}"
            )
        for region, value in feeds.items():
            self._store_feed(region, value)
        self.executable = graph.executable
        staged: dict[str, torch.Tensor] = {}
        graph.executable.run(FULL_STEP, self.store, staged)
        self._keep_outputs(staged)
        self._written.update(staged)
        self._written.update(graph.updated)
        specs = graph.executable.graph.model_outputs
        return [named_view(self.store[s.name], s.name) for s in specs]

    def _region_graph(self, graph_name: str) -> RegionGraph:
        if graph_name not in self.region_graphs:
            raise SambaRunError(
                f"session.run: no graph named '{graph_name}'; the multigraph PEF loaded by "
                f"init_multigraph_runtime has {sorted(self.region_graphs)}"
            )
        return self.region_graphs[graph_name]

    def _store_feed(self, region: str, value: torch.Tensor) -> None:
        """Copy a feed into its region's device tensor: programs update regions in place, and must
        never write into the app's own tensor."""
        stored = self.store.get(region)
        if stored is not None and stored.shape == value.shape and stored.dtype == value.dtype:
            stored.copy_(value)
        else:
            self.store[region] = value.detach().clone(memory_format=torch.contiguous_format)
        self._written.add(region)

    def _keep_outputs(self, staged: dict[str, torch.Tensor]) -> None:
        """Store the outputs dense (graphs read their inputs with the traced contiguous layout),
        each in its own memory (a program may return one tensor twice, or a view of an input;
        later in-place updates of one region must not reach another)."""
        held = {t.untyped_storage().data_ptr() for n, t in self.store.items() if n not in staged}
        for name, value in staged.items():
            pointer = value.untyped_storage().data_ptr()
            if pointer in held or not value.is_contiguous():
                value = value.clone(memory_format=torch.contiguous_format)
            held.add(value.untyped_storage().data_ptr())
            self.store[name] = value


def region_feeds(
    graph_name: str, given: Any, specs: list[TensorSpec], aliases: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The given feeds by region: a dict {name: tensor} or named SambaTensors; names are a graph
    input's region or its tensor name (`aliases`: name -> region). Integers are cast to the
    compiled integer dtype when the values fit (int64 index tensors to int32 inputs)."""
    by_region = {s.name: s for s in specs}
    feeds: dict[str, torch.Tensor] = {}
    for name, value in _named(given):
        spec = by_region.get(name) or by_region.get((aliases or {}).get(name, ""))
        if spec is None:
            raise SambaRunError(
                f"session.run(graph_name='{graph_name}'): '{name}' is not an input of this graph; "
                f"it reads {[s.describe() for s in specs]}"
            )
        if spec.name in feeds:
            raise SambaRunError(f"session.run(graph_name='{graph_name}'): input '{spec.name}' is fed twice")
        feeds[spec.name] = _fitted(graph_name, value, spec)
    return feeds


def _named(given: Any) -> list[tuple[str, Any]]:
    if given is None:
        return []
    if isinstance(given, Mapping):
        return [(str(k), v) for k, v in given.items()]
    values = [given] if isinstance(given, torch.Tensor) else given
    if not isinstance(values, (list, tuple)):
        raise SambaRunError(
            f"input_tensors must be a dict or a list of named tensors, got {type(given).__name__}"
        )
    named = []
    for i, value in enumerate(values):
        name = getattr(value, "sn_region_name", None) or getattr(value, "sn_name", None)
        if name is None:
            raise SambaRunError(
                f"input_tensors[{i}] has no name: pass a dict {{name: tensor}} or named SambaTensors "
                "(samba.from_named_dict)"
            )
        named.append((name, value))
    return named


def _fitted(graph_name: str, value: Any, spec: TensorSpec) -> torch.Tensor:
    where = f"session.run(graph_name='{graph_name}'): input '{spec.name}'"
    if not isinstance(value, torch.Tensor):
        raise SambaRunError(f"{where}: expected a tensor, got {type(value).__name__}")
    value = value.detach().as_subclass(torch.Tensor)
    if tuple(value.shape) != spec.shape:
        raise SambaRunError(
            f"{where} was compiled for shape {list(spec.shape)}, given {list(value.shape)}: pad the "
            f"input to the compiled shape, or recompile"
        )
    if value.dtype == spec.dtype:
        return value
    if _is_integer(value.dtype) and _is_integer(spec.dtype) and _fits(value, spec.dtype):
        return value.to(spec.dtype)
    raise SambaRunError(
        f"{where} was compiled for {spec.dtype}, given {value.dtype}: feed {spec.dtype} "
        f"(x.to({spec.dtype})), or recompile with inputs of this dtype"
    )


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _fits(value: torch.Tensor, dtype: torch.dtype) -> bool:
    if value.numel() == 0:
        return True
    info = torch.iinfo(dtype)
    return bool(value.min() >= info.min and value.max() <= info.max)


def _weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    tensors = [(p.sn_name, p) for p in model.parameters() if getattr(p, "sn_name", None)]
    return tensors + [(buffer_name(path), b) for path, b in model.named_buffers()]


__all__ = ["FwdGraph", "MultigraphSession", "RegionGraph", "region_feeds"]

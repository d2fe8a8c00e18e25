"""The session: a device tensor store by name, and runs of whole steps or single sections.

The store is the "device memory": weights, optimizer state, hyperparameters, gradients and the
activations one section leaves for the next. Where the device is the CPU it holds the host
model's weights as their own memory, not a copy (`to_rdu`), and the programs update them in
place: between `to_rdu` and `to_cpu` the host tensors may already show the device's values. Apps
still read host weights after `to_cpu` and push changed ones with `to_rdu` (a GPU keeps copies).
A run checks every argument before it touches the store, and stages results so an error cannot
leave the store half-updated.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from sambaflow.errors import SambaRunError
from sambaflow.optim.base import SambaOptimizer, hyper_name, state_name
from sambaflow.passes.sections import FULL_STEP, SAVED_PREFIX
from sambaflow.runtime.directives import SessionDirectives
from sambaflow.runtime.executable import Executable
from sambaflow.runtime.feeds import check_seed, expand_hyperparams, match_inputs, resolve_sections
from sambaflow.runtime.index_check import explained_failures
from sambaflow.runtime.multigraph import MultigraphSession
from sambaflow.runtime.store_placement import device_tensor, runs_on_cpu, same_memory
from sambaflow.runtime.transfers import Transfers, check_has_values
from sambaflow.tensors.current import set_current_session
from sambaflow.tensors.model import buffer_name
from sambaflow.tensors.sambatensor import SambaTensor, named_view
from sambaflow.trace.graph import (
    BUFFER,
    GRAD,
    HYPER,
    INPUT,
    INPUT_GRAD,
    OUTPUT_GRAD,
    PARAM,
    STATE,
    TensorSpec,
)


class Session(SessionDirectives, MultigraphSession, Transfers):
    """What `samba.session` is: one per process (directives: runtime/directives.py; SambaFlow's
    multigraph API: runtime/multigraph.py; the modelzoo's host/device transfers: runtime/transfers.py)."""

    def __init__(self) -> None:
        self.tracing = True
        self.pinned_memory = False
        self.trace_count = 0
        self._compiler: Callable[..., str] | None = None
        #: what the app gave `setup` (SambaNova's modelzoo: its CompileArgs / RunArgs), as a dict
        self.setup_args: dict[str, Any] = {}
        self._reset_directives()
        self._reset_multigraph()
        self.reset()

    def setup(self, args: Any = None, **kwargs: Any) -> None:
        """Prepare for compile or run with the app's SambaFlow arguments (a pydantic model such as
        `samba.argconf.args.CompileArgs`, a dict or an argparse namespace). They are recorded:
        compile lists the RDU compiler settings among them as having no effect. Nothing else
        needs preparing here (no device discovery, no runtime environment)."""
        if args is None:
            given: dict[str, Any] = {}
        elif hasattr(args, "model_dump"):
            given = args.model_dump()
        elif isinstance(args, Mapping):
            given = dict(args)
        elif hasattr(args, "__dict__"):
            given = dict(vars(args))
        else:
            raise SambaRunError(
                f"session.setup: expected the app's arguments (a pydantic model, dict or namespace), "
                f"got {type(args).__name__}"
            )
        self.setup_args = {**given, **kwargs}

    # --- lifecycle ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the traced graph and the device tensor store."""
        self.executable: Executable | None = None
        self.host_model = None
        #: named graphs sharing the store (`load_graphs`); `run(graph_name=)` makes one current
        self.graphs: dict[str, Executable] = {}
        self.store: dict[str, torch.Tensor] = {}
        self.optimizers: list[SambaOptimizer] = []
        self.init_output_grads = True
        self._seed_defaults: dict[str, torch.Tensor] = {}
        self._replaced: dict[tuple[Any, ...], list[str]] = {}
        self._saved: set[str] = set()
        self.grad_accumulation_steps = 1
        self._accumulated: dict[str, torch.Tensor] = {}  # gradients summed over the runs so far
        self._accumulated_runs = 0
        self._replicas_checked = False
        self._reset_region_runtime()

    def load(
        self,
        executable: Executable,
        model: nn.Module,
        optimizers: Sequence[SambaOptimizer],
        init_output_grads: bool = True,
        grad_accumulation_steps: int = 1,
        transfer_device: bool = True,
    ) -> list[SambaTensor]:
        """Make `executable` current and move the host model and optimizer state to the device.

        With `grad_accumulation_steps` k > 1, each run of the whole step adds its gradients to the
        previous runs' and the k-th run updates the weights: k runs equal one step on the k
        batches together (a loss that averages over the batch is seeded with 1/k)."""
        self.reset()
        self.executable, self.optimizers = executable, list(optimizers)
        self.init_output_grads = init_output_grads
        self.grad_accumulation_steps = grad_accumulation_steps
        graph = executable.graph
        self.store.update((n, torch.tensor(v, dtype=torch.float64)) for n, v in graph.hyper_defaults.items())
        for spec in graph.inputs_with_role(INPUT):
            self.store[spec.name] = torch.zeros(spec.shape, dtype=spec.dtype)
        self.host_model = model
        if transfer_device:  # else the app calls to_device() (SambaNova's data-parallel modelzoo app)
            check_has_values(model, "trace_graph")
            self.to_rdu(model, self.optimizers)
        return self._outputs()

    def load_graphs(
        self, executables: Mapping[str, Executable], model: nn.Module
    ) -> dict[str, list[SambaTensor]]:
        """Load several forward graphs of `model` (cached generation's prompt and token graphs) into
        one device store: a tensor two graphs name alike (a weight, a KV cache buffer) is held once,
        and what one graph writes into it in place the next reads. The first graph is current;
        `run(..., graph_name=)` runs another. Returns each graph's outputs by graph name."""
        first = next(iter(executables))
        self.load(executables[first], model, [])
        self.graphs = dict(executables)
        for executable in self.graphs.values():
            for spec in executable.graph.inputs_with_role(PARAM, BUFFER):
                if spec.name not in self.store:
                    raise SambaRunError(f"graph input '{spec.name}' is not a tensor of the model given")
        return {name: self._outputs(executable) for name, executable in self.graphs.items()}

    def _select_graph(self, graph_name: str) -> None:
        if graph_name not in self.graphs:
            known = (
                sorted(self.graphs)
                or "none: only one graph is loaded (trace_graph with {name: inputs} loads several)"
            )
            raise SambaRunError(f"session.run: no graph named '{graph_name}'; loaded graphs: {known}")
        self.executable = self.graphs[graph_name]

    def _default_seed(self, name: str) -> torch.Tensor:
        """One for a loss, zero for other outputs; made when first needed (the fused step seeds
        non-losses with zero inside the program, so a logits-sized zero tensor is often never made)."""
        if name not in self._seed_defaults:
            spec = next(s for s in self.executable.graph.inputs_with_role(OUTPUT_GRAD) if s.name == name)
            is_loss = name.removesuffix("__grad") in self.executable.graph.loss_names
            make = torch.ones if is_loss else torch.zeros
            self._seed_defaults[name] = make(spec.shape, dtype=spec.dtype)
        return self._seed_defaults[name]

    def compile(
        self, model: nn.Module, inputs: Sequence[torch.Tensor | None], optimizer: Any = None, **kwargs: Any
    ) -> str:
        """Trace and compile into a PEF file; return its path (the app layer's `compile_pef`,
        which `sambaflow.samba` installs with `set_compiler`: the runtime does not import the app)."""
        if "optimizers" in kwargs:  # SambaFlow's keyword (SambaNova's modelzoo passes it)
            given = kwargs.pop("optimizers")
            if optimizer is not None and given is not None:
                raise SambaRunError(
                    "session.compile: optimizer given twice (positionally and as optimizers=): pass one"
                )
            optimizer = given if given is not None else optimizer
        if self._compiler is None:
            raise SambaRunError(
                "session.compile: no compiler is installed; import sambaflow.samba (which installs "
                "sambaflow.app.compile.compile_pef) before calling it"
            )
        return self._compiler(model, inputs, optimizer, **kwargs)

    def set_compiler(self, compiler: Callable[..., str]) -> None:
        self._compiler = compiler

    # --- host <-> device ------------------------------------------------------------------------
    def to_rdu(self, model: nn.Module, optimizers: Sequence[SambaOptimizer] | None = None) -> None:
        """Move host weights (and optimizer state and settings) into the device store.

        Where the device is the CPU, a parameter or buffer is stored as its own memory, not a
        copy (`device_tensor`): the programs then update the host tensor in place. Each call looks
        again, so a tensor the app rebound (`param.data = new`) is shared or copied anew."""
        graph = self._require_graph("to_rdu")
        specs = {s.name: s for s in graph.inputs_with_role(PARAM, BUFFER, STATE)}
        shared = set() if runs_on_cpu(graph) else None  # storages already in the store
        for name, tensor in _host_tensors(model):
            if name in specs:
                self.store[name] = device_tensor(tensor, specs[name], shared)
        for opt in optimizers if optimizers is not None else self.optimizers:
            self._optimizer_to_rdu(opt, set(specs))

    def _optimizer_to_rdu(self, opt: SambaOptimizer, wanted: set[str]) -> None:
        index = self.optimizers.index(opt) if opt in self.optimizers else 0
        for j in range(len(opt.params)):
            # A fresh optimizer's state is made on the device only: a host copy too would hold
            # every moment twice (1 GB for GPT-2 small's AdamW).
            fresh = j not in opt.state
            for key, value in opt.current_state(j).items():
                if state_name(opt.param_name(j), key) in wanted:
                    self.store[state_name(opt.param_name(j), key)] = (
                        value if fresh else value.detach().clone()
                    )
        for key, value in opt.hyper.items():
            name = hyper_name(key, index)
            if name in self.store:
                self.store[name] = torch.tensor(value, dtype=torch.float64)

    def to_cpu(
        self, model: nn.Module, optimizers: Sequence[SambaOptimizer] | SambaOptimizer | None = None
    ) -> None:
        """Copy device weights (and, given optimizers, their state) back into the host objects;
        a host tensor the store holds as its own memory (`to_rdu`) has the device's values already.
        With no graph loaded the host weights are the only ones, and there is nothing to copy (the
        modelzoo's eager apps call it)."""
        if self.executable is None:
            return
        with torch.no_grad():
            for name, tensor in _host_tensors(model):
                stored = self.store.get(name)
                if stored is not None and not same_memory(stored, tensor):
                    tensor.copy_(stored)
        if isinstance(optimizers, SambaOptimizer):
            optimizers = [optimizers]
        for opt in optimizers or []:
            self._optimizer_to_cpu(opt)

    def _optimizer_to_cpu(self, opt: SambaOptimizer) -> None:
        index = self.optimizers.index(opt) if opt in self.optimizers else 0
        for j in range(len(opt.params)):
            state = opt.state_of(j)
            for key in state:
                name = state_name(opt.param_name(j), key)
                if name in self.store:
                    state[key] = self.store[name].clone()
        for key in opt.hyper:
            name = hyper_name(key, index)
            if name in self.store:
                opt.hyper[key] = float(self.store[name])

    def get_tensors_by_name(self, names: Sequence[str] | str) -> list[SambaTensor]:
        """Named device tensors (parameters, state, gradients, outputs, hyperparameters)."""
        if isinstance(names, str):
            names = [names]
        missing = [n for n in names if n not in self.store]
        if missing:
            known = sorted(n for n in self.store if not n.startswith(SAVED_PREFIX))
            raise SambaRunError(f"get_tensors_by_name: no device tensor named {missing}; known: {known}")
        # Copies: parameters and optimizer state are updated in place by the next step.
        return [SambaTensor(self.store[n].clone(), name=n) for n in names]

    def gradient_of(self, name: str) -> SambaTensor | None:
        grad = self.store.get(f"{name}__grad")
        return None if grad is None else SambaTensor(grad, name=f"{name}__grad")

    # --- running --------------------------------------------------------------------------------
    def run(
        self,
        input_tensors: Any,
        output_tensors: Sequence[torch.Tensor] | None = None,
        hyperparam_dict: Mapping[str, Any] | None = None,
        section_types: Sequence[str] | None = None,
        grad_of_outputs: Sequence[torch.Tensor | None] | None = None,
        data_parallel: bool = False,
        reduce_on_rdu: bool = False,
        graph_name: str | None = None,
    ) -> list[SambaTensor]:
        """Run sections (default: all) on named inputs; return the outputs in `forward` order.

        With `data_parallel` (or `reduce_on_rdu`) the gradients are averaged over all replicas
        (`runtime/communicator.py`) once backward made them, before gradnorm and opt. With
        `graph_name`, that one of the loaded graphs (`load_graphs`) runs, and stays current; after
        `init_multigraph_runtime`, that graph of the multigraph PEF (runtime/multigraph.py)."""
        if self.region_graphs:
            return self.run_region_graph(_multigraph_name(graph_name, self.region_graphs), input_tensors)
        if graph_name is not None:
            self._select_graph(graph_name)
        if isinstance(output_tensors, torch.Tensor):  # one output tensor (the loss, say)
            output_tensors = [output_tensors]
        executable = self._require_executable()
        graph = executable.graph
        sections = resolve_sections(section_types, executable.sections)
        feeds = match_inputs(input_tensors, graph.inputs_with_role(INPUT))
        hyper = expand_hyperparams(
            hyperparam_dict, [s.name for s in graph.inputs_with_role(HYPER)], graph.hyper_defaults
        )
        reduce = (data_parallel or reduce_on_rdu) and "bckwd" in sections
        accumulate = self.grad_accumulation_steps > 1 and {"bckwd", "opt"} <= set(sections)
        fused = sections == executable.sections and not (reduce or accumulate)
        if "bckwd" in sections:
            seeds = self._seeds(output_tensors, grad_of_outputs, fused)
            fused = fused and self._fused_step_takes(seeds)
            feeds |= self._scaled_for_accumulation(seeds) if accumulate else seeds
        self._check_saved(sections)
        if reduce:
            self._check_replicas()
        self._set_hyperparameters(hyper)
        self.store.update(feeds)
        programs = self._programs(sections, fused, reduce or accumulate)
        self._release_replaced(programs)
        staged: dict[str, torch.Tensor] = {}
        with explained_failures(graph, feeds):  # names an out-of-range index input, if one failed
            for name in programs:
                executable.run(name, self.store, staged)
                if name in ("grads", "bckwd") and not self._gradients_done(staged, reduce, accumulate):
                    break  # accumulating: the update waits for the k-th run
        self.store.update(staged)
        self._track_saved(sections, staged)
        return self._outputs()

    def _programs(self, sections: list[str], fused: bool, at_gradients: bool) -> list[str]:
        if fused:
            return [FULL_STEP]
        if at_gradients and sections == self.executable.sections:
            before, after = self.executable.gradient_split
            return before + after
        return sections

    def _gradients_done(self, staged: dict[str, torch.Tensor], reduce: bool, accumulate: bool) -> bool:
        """Add the earlier runs' gradients and average over replicas; False while accumulating."""
        names = [n for n in self.executable.gradient_names if n in staged]
        if accumulate:
            for name, earlier in self._accumulated.items():
                staged[name] = staged[name].add_(earlier)
            self._accumulated_runs += 1
            if self._accumulated_runs < self.grad_accumulation_steps:
                self._accumulated = {n: staged[n] for n in names}
                return False
            self._accumulated, self._accumulated_runs = {}, 0
        if reduce:
            _communicator().average_([staged[n] for n in names])
        return True

    def _scaled_for_accumulation(self, seeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Default seeds of losses that average over the batch, divided by k: k accumulated runs
        then average over the k batches, as one step on them together would."""
        reductions = self.executable.loss_reductions
        scaled = dict(seeds)
        for name, seed in seeds.items():
            loss = name.removesuffix("__grad")
            if seed is self._seed_defaults.get(name) and reductions.get(loss) == "mean":
                scaled[name] = seed / self.grad_accumulation_steps
        return scaled

    def _check_replicas(self) -> None:
        """Once per loaded graph: every replica runs the same graph on the same batch shapes."""
        if self._replicas_checked:
            return
        _communicator().check_replicas(replica_description(self.executable, self.store))
        self._replicas_checked = True

    def _release_replaced(self, programs: list[str]) -> None:
        """Drop the last run's gradients and model outputs before these programs write them anew,
        as eager's `zero_grad()` and a fresh forward do: old and new are never held at once (500 MB
        of gradients for GPT-2 small, 103 MB of logits for the tiny one). Outputs the app kept stay
        its own; a run that fails leaves no gradients or outputs, never stale ones. (With the
        memory pool off, freeing the logits first hands glibc's fresh pages to the next ones:
        generation is slower then, as every large allocation is without the pool.)"""
        key = (id(self.executable), *programs)  # loaded graphs may have programs of the same name
        if key not in self._replaced:
            found = [self.executable.programs[p] for p in programs]
            read = {n for p in found for n in p.inputs}
            graph = self.executable.graph
            grads = {s.name for s in graph.outputs if s.role in (GRAD, INPUT_GRAD)}
            replaced = grads | {s.name for s in graph.model_outputs}
            self._replaced[key] = [n for p in found for n in p.outputs if n in replaced and n not in read]
        for name in self._replaced[key]:
            self.store.pop(name, None)

    def _track_saved(self, sections: list[str], staged: dict[str, torch.Tensor]) -> None:
        """Forget saved activations once `opt` ran: they may view weights it just changed."""
        if "opt" in sections:
            for name in self._saved:
                self.store.pop(name, None)
            self._saved.clear()
        else:
            self._saved.update(n for n in staged if n.startswith(SAVED_PREFIX))

    def _set_hyperparameters(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            if float(self.store[name]) != value:  # apps pass the same dict every step
                self.store[name] = torch.tensor(value, dtype=torch.float64)

    def _outputs(self, executable: Executable | None = None) -> list[SambaTensor]:
        specs = (executable or self.executable).graph.model_outputs
        store = self.store
        return [named_view(store[s.name] if s.name in store else _empty(s), s.name) for s in specs]

    def _fused_step_takes(self, seeds: dict[str, torch.Tensor]) -> bool:
        """False when a seed the fused step holds at zero is given another value: the section
        programs, which take every seed, run instead."""
        taken = self.executable.step_seeds
        return all(n in taken or seeds[n] is self._seed_defaults.get(n) for n in seeds)

    def _seeds(
        self, outputs: Sequence[torch.Tensor] | None, grads: Sequence[Any] | None, fused: bool
    ) -> dict[str, torch.Tensor]:
        seeded = grads is not None or any("_sn_grad" in getattr(o, "__dict__", ()) for o in outputs or ())
        if not seeded and self.init_output_grads:  # the usual step: losses from one, other outputs from zero
            names = self.executable.step_seeds if fused else self._seed_names()
            return {n: self._default_seed(n) for n in names}
        specs = {s.name: s for s in self.executable.graph.inputs_with_role(OUTPUT_GRAD)}
        names = [s.name for s in self.executable.graph.model_outputs]
        explicit = _explicit_seeds(names, outputs, grads)
        constant = sorted(n for n, g in explicit.items() if g is not None and f"{n}__grad" not in specs)
        if constant:
            raise SambaRunError(
                f"a gradient was given for output(s) {constant}, which do not depend on "
                "any trained tensor (or are not floating point): backward has no use for it"
            )
        seeds = {}
        for name, spec in specs.items():
            value = explicit.get(name.removesuffix("__grad"))
            if value is None and not self.init_output_grads:
                raise SambaRunError(
                    f"no gradient for output '{name.removesuffix('__grad')}': the graph was traced with "
                    "init_output_grads=False, so pass grad_of_outputs=[...] or set out.sn_grad before bckwd"
                )
            seeds[name] = self._default_seed(name) if value is None else check_seed(value, spec)
        return seeds

    def _seed_names(self) -> list[str]:
        return [s.name for s in self.executable.graph.inputs_with_role(OUTPUT_GRAD)]

    def _check_saved(self, sections: list[str]) -> None:
        executable = self.executable
        if sections == executable.sections:
            return
        produced: set[str] = set()
        graph_inputs = {s.name for s in executable.graph.inputs}
        for section in sections:
            program = executable.programs[section]
            absent = [
                n
                for n in program.inputs
                if n not in graph_inputs and n not in produced and n not in self.store
            ]
            if absent:
                raise SambaRunError(
                    f"section '{section}' needs values that an earlier section leaves on the device "
                    f"({len(absent)} tensors), and that section has not run since the graph was "
                    f"loaded or since the last 'opt' changed the weights: run "
                    f"{executable.sections[: executable.sections.index(section)]} first"
                )
            produced.update(program.outputs)

    # --- misc -----------------------------------------------------------------------------------
    def _require_executable(self) -> Executable:
        if self.executable is None:
            raise SambaRunError(
                "session.run: no graph is loaded. Call samba.utils.trace_graph(model, "
                "inputs, optim[, pef=...]) first."
            )
        return self.executable

    def _require_graph(self, what: str) -> Any:
        if self.executable is None:
            raise SambaRunError(f"session.{what}: no graph is loaded; call utils.trace_graph first")
        return self.executable.graph

    def enable_pinned_memory(self) -> None:
        self.pinned_memory = True

    def disable_pinned_memory(self) -> None:
        self.pinned_memory = False


def _multigraph_name(graph_name: str | None, graphs: Mapping[str, Any]) -> str:
    if graph_name is None:
        raise SambaRunError(
            f"session.run: a multigraph PEF is loaded (init_multigraph_runtime): pass graph_name= "
            f"one of {sorted(graphs)}"
        )
    return graph_name


def _host_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    tensors = [(p.sn_name, p) for p in model.parameters() if getattr(p, "sn_name", None)]
    tensors += [(buffer_name(path), b) for path, b in model.named_buffers()]
    return tensors


def _explicit_seeds(
    names: list[str], outputs: Sequence[torch.Tensor] | None, grads: Sequence[Any] | None
) -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    for position, out in zip(names, outputs or []):
        name = getattr(out, "sn_name", None)  # by name; an unnamed tensor by its position
        if getattr(out, "__dict__", {}).get("_sn_grad") is not None:
            seeds[name if name in names else position] = out.__dict__["_sn_grad"]
    if grads is not None:
        if isinstance(grads, torch.Tensor):
            grads = [grads]
        if len(grads) > len(names):
            raise SambaRunError(
                f"grad_of_outputs has {len(grads)} tensors; the graph has {len(names)} outputs {names}"
            )
        seeds |= {name: g for name, g in zip(names, grads) if g is not None}
    return seeds


def _communicator() -> Any:
    """The process's data-parallel communicator; imported on first use, so that runs that are not
    data-parallel never import torch.distributed."""
    from sambaflow.runtime import communicator

    return communicator.current()


def replica_description(executable: Executable, store: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What must be the same on every data-parallel replica: the graph, batch shapes, parameters."""
    graph = executable.graph
    params = graph.inputs_with_role(PARAM)
    step_code = executable.programs[FULL_STEP].module.code
    return {
        "graph": hashlib.sha256(step_code.encode()).hexdigest()[:16],
        "programs": sorted(executable.programs),
        "batch inputs": {s.name: list(s.shape) for s in graph.inputs_with_role(INPUT)},
        "parameters": len(params),
        "parameter elements": sum(store[s.name].numel() for s in params if s.name in store),
    }


def _empty(spec: TensorSpec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype)


session = Session()
set_current_session(session)

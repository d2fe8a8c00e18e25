"""`trace_graph`: trace a model's step (and check it against a PEF) and load it into the session."""

from __future__ import annotations

import math
import re
import sys
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from sambaflow.app import run_notes
from sambaflow.app.args import parsed_args
from sambaflow.app.backend_choice import choose_backend, requested_backend
from sambaflow.app.microbatching import trace_microbatched
from sambaflow.app.precision import preset_for_run, requested_preset
from sambaflow.backends.counters import debug_level
from sambaflow.backends.registry import get_backend
from sambaflow.errors import SambaPefError, SambaTraceError
from sambaflow.host_memory import check_fits, gib
from sambaflow.optim.base import SambaOptimizer
from sambaflow.passes.memory import peak_computed_bytes
from sambaflow.pef.check import check_matches, check_precision
from sambaflow.pef.file import PefFile
from sambaflow.pef.manifest import graph_from_entry
from sambaflow.pef.schema import GRAPH_NAME
from sambaflow.pef.sign import TRUST_NOTE, key_path, load_key, user_key
from sambaflow.runtime.executable import Executable
from sambaflow.runtime.session import session
from sambaflow.tensors.sambatensor import SambaTensor
from sambaflow.trace.graph import INPUT, STATE, TensorSpec, TracedGraph
from sambaflow.trace.plan import takes_keywords
from sambaflow.trace.tracer import trace_step


def progress(message: str) -> None:
    print(f"[sambaflow] {message}", flush=True)


def optimizer_list(optim: SambaOptimizer | Sequence[SambaOptimizer] | None) -> list[SambaOptimizer]:
    if optim is None:
        return []
    if isinstance(optim, (list, tuple)):
        return list(optim)
    return [optim]


def trace_graph(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    optim: Any = None,
    init_output_grads: bool = True,
    loss_indices: Sequence[int] | None = None,
    pef: str | None = "",
    mapping: str = "section",
    data_parallel_mode: str = "normal",
    transfer_device: bool = True,
    backend: str | None = None,
    sign_key: str | None = None,
    microbatch_size: int | None = None,
    grad_accumulation_steps: int | None = None,
    graphamp_preset: str | None = None,
    **_: Any,
) -> list[SambaTensor]:
    """Trace `model` (forward, backward and `optim`'s update) and load it into the session.

    With `pef`, the traced graph is checked against the PEF and the PEF's compiled programs run;
    otherwise the step is compiled here with `backend` (default: the parsed `--backend`, else
    `$SAMBAFLOW_BACKEND`, else inductor; programs compile on first use and are cached on disk),
    saying so in one line. With no optimizer the graph is
    forward-only. Returns the graph's outputs, also stored as `model.output_tensors`. With
    `transfer_device=False` no weights move: the app calls `session.to_device()` later.

    With a signing key (`sign_key`, else the parsed `--sign-key`, else `$SAMBAFLOW_SIGN_KEY`) only a
    PEF signed with it loads; its signature is checked before anything in it is used.

    Micro-batching (`microbatch_size`, else the parsed `-mb`) applies where the step is compiled
    here; a PEF keeps the one it was compiled with. Gradient accumulation (`grad_accumulation_steps`,
    else a parsed `--grad-accumulation-steps` other than 1, else the PEF's) applies to whole steps.
    GraphAMP (`graphamp_preset`, else the parsed `--graphamp-preset`, else the PEF's, else mp0):
    mp1 traces the forward under bf16 autocast (app/precision.py).
    """
    optimizers = optimizer_list(optim)
    requested = requested_backend(backend)
    pef_file = load_pef(pef, sign_key) if pef else None
    chosen = None if pef_file is not None else choose_backend(requested, progress)
    _say_how_it_runs(pef_file, requested, chosen)
    preset = preset_for_run(requested_preset(graphamp_preset), pef_file)
    if isinstance(inputs, Mapping) and not takes_keywords(model, inputs):
        named = named_graph_inputs(inputs, optimizers)
        return _trace_named_graphs(model, named, pef_file, chosen, preset)
    if pef_file is not None and optimizers and "train" not in pef_file.kinds:
        progress(f"{pef} is forward-only (compiled with --inference): the optimizer is not used")
        optimizers = []
    if pef_file is None:  # compiled here: with the parsed -mb, micro-batched as a compile would be
        microbatch = microbatch_size or getattr(parsed_args(), "microbatch_size", None)
        traced = trace_microbatched(model, inputs, optimizers, microbatch, progress, loss_indices, preset)
    else:
        training = bool(optimizers)
        traced = trace_step(
            model, inputs, optimizers, loss_indices=loss_indices, backward=training, graphamp=preset
        )
    session.trace_count += 1
    if debug_level() >= 3:
        print(traced.as_text(), file=sys.stderr)
    settings = _step_settings(pef_file, grad_accumulation_steps)
    if pef_file is not None:
        executable = _from_pef(pef_file, traced, bool(optimizers))
    else:
        executable = Executable.build(traced, chosen, split_at_gradients=splits_at_gradients(settings))
    steps = settings["grad_accumulation_steps"] if optimizers else 1
    if steps > 1:
        progress(
            f"gradient accumulation: each run adds its gradients; the weights update once every {steps} runs"
        )
    check_step_fits(executable)
    outputs = session.load(executable, model, optimizers, init_output_grads, steps, transfer_device)
    model.output_tensors = outputs
    return outputs


def named_graph_inputs(inputs: Mapping[str, Any], optimizers: Sequence[SambaOptimizer]) -> dict[str, Any]:
    """`{graph name: inputs}`: several forward graphs of one model, checked before any is traced."""
    if optimizers:
        raise SambaTraceError(
            "several named graphs (inputs given as {name: inputs}) are forward-only: pass no optimizer, "
            "or trace the training step from one tuple of inputs"
        )
    if not inputs:
        raise SambaTraceError("inputs is an empty dict: give {graph name: inputs} for at least one graph")
    bad = [name for name in inputs if not isinstance(name, str) or re.fullmatch(GRAPH_NAME, name) is None]
    if bad:
        raise SambaTraceError(
            f"graph names {bad} are not allowed: use letters, digits, '_' and '-', starting with a letter"
        )
    return dict(inputs)


def _trace_named_graphs(
    model: nn.Module, inputs: dict[str, Any], pef_file: PefFile | None, chosen: Any, preset: str | None
) -> dict[str, list[SambaTensor]]:
    """Trace each named forward graph, load them all into the session (one device store: tensors of
    the same name, such as a KV cache, are shared) and return each graph's outputs by name."""
    executables = {}
    for name, graph_inputs in inputs.items():
        traced = trace_step(model, graph_inputs, [], backward=False, graphamp=preset)
        session.trace_count += 1
        executables[name] = (
            _from_pef(pef_file, traced, False, kind=name)
            if pef_file is not None
            else Executable.build(traced, chosen)
        )
    outputs = session.load_graphs(executables, model)
    model.output_tensors = outputs
    return outputs


def check_step_fits(executable: Executable) -> None:
    """Refuse, before the first step, a step that cannot fit in host memory: its computed tensors
    at their peak (a graph estimate, passes/memory.py) and what the device store is still to
    allocate (optimizer state, input buffers; the weights are the host model's, already held),
    instead of an allocation failure or the OOM killer mid-step."""
    step = executable.programs.get("step")
    on_host = str(getattr(executable.backend, "device", "cpu")).startswith("cpu")
    if step is None or not on_host:
        return
    fused = bool(getattr(executable.backend, "fuses_elementwise", False))
    computed = peak_computed_bytes(step.module, fused=fused)
    stored = sum(_spec_bytes(s) for s in executable.graph.inputs_with_role(STATE, INPUT))
    advice = "use a smaller batch (-b), or compile with micro-batches (-mb) of a size that fits"
    if not fused:
        # op by op, every new weight and optimizer moment is a tensor until the step ends; Inductor
        # writes them into the stored ones (1.1 B-parameter AdamW step: 17.1 against 4.1 GiB estimated)
        advice += "; or use the inductor backend, which writes the optimizer's updates in place"
    if stored > computed:
        advice += " (the stored state is most of it: a smaller batch cannot help much; free memory)"
    check_fits(
        computed + stored,
        f"one step ({gib(computed)} of computed tensors at their peak, estimated from the graph, "
        f"and {gib(stored)} of optimizer state and inputs the device store allocates)",
        advice,
    )


def _spec_bytes(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * spec.dtype.itemsize


def splits_at_gradients(settings: dict[str, Any]) -> bool:
    """Whether the step also needs its `grads` and `update` programs: gradient accumulation and
    data parallel act between them (`settings`: parsed arguments or `_step_settings`)."""
    return (settings.get("grad_accumulation_steps") or 1) > 1 or bool(settings.get("data_parallel"))


def _step_settings(pef_file: PefFile | None, accumulation: int | None) -> dict[str, Any]:
    """Gradient accumulation and data parallel: given, else parsed from `run`, else the PEF's."""
    args = parsed_args()
    recorded = pef_file.manifest.get("compile_args", {}) if pef_file is not None else {}
    steps = accumulation or getattr(args, "grad_accumulation_steps", 1)
    if steps == 1:
        steps = int(recorded.get("grad_accumulation_steps") or 1)
    parallel = bool(getattr(args, "data_parallel", False) or recorded.get("data_parallel"))
    return {"grad_accumulation_steps": steps, "data_parallel": parallel}


def _say_how_it_runs(pef_file: PefFile | None, requested: Any, chosen: Any) -> None:
    """One line each: compiled in this process (and how), settings the PEF overrides, no weights."""
    if pef_file is None:
        notes = [run_notes.in_process(chosen.name)]
    else:
        manifest = pef_file.manifest
        pef_backend = manifest.get("target", {}).get("backend", "reference")
        notes = [
            run_notes.ignored_backend(requested, pef_backend, pef_file.path),
            run_notes.ignored_threads(manifest.get("pef_metadata", {})),
            run_notes.ignored_microbatch(parsed_args(), manifest.get("compile_args", {}), pef_file.path),
        ]
    notes.append(run_notes.no_weights_loaded(parsed_args(), pef_file.path if pef_file else None))
    for note in notes:
        if note:
            progress(note)


def load_pef(path: str, sign_key: str | None = None) -> PefFile:
    """The verified PEF; says once per file when it holds native code no signature vouches for."""
    explicit = sign_key or getattr(parsed_args(), "sign_key", None)
    key = load_key(key_path(explicit))
    pef = PefFile(path, key, None if key else user_key())  # your own PEFs are checked, then trusted
    if pef.binary_members and not pef.verified and path not in _warned_unsigned:
        _warned_unsigned.add(path)
        state = "signed with another user's or machine's key" if pef.signed else "unsigned"
        progress(f"warning: '{path}' is {state} and holds native code. {TRUST_NOTE}")
    return pef


_warned_unsigned: set[str] = set()


def _from_pef(pef: PefFile, traced: TracedGraph, training: bool, kind: str | None = None) -> Executable:
    path = pef.path
    kind = kind or ("train" if training else "inference")
    check_precision(traced, pef.manifest["precision"], path)
    check_matches(traced, pef.entry(kind), path, pef.manifest.get("compile_args", {}))
    backend = _backend_for(pef, path)
    programs = {name: pef.program(kind, name) for name in pef.entry(kind)["programs"]}
    binaries = {name: pef.binary(kind, name) for name in programs}
    # The app's own trace matched the PEF's fingerprint: it is the graph the programs came from.
    graph = graph_from_entry(pef.entry(kind), traced.module)
    graph.precision = traced.precision
    return Executable.from_binaries(graph, backend, programs, binaries)


def _backend_for(pef: PefFile, path: str) -> Any:
    target = pef.manifest.get("target", {})
    if target.get("device") == "cuda" and not torch.cuda.is_available():
        raise SambaPefError(
            f"'{path}' was compiled for CUDA ({target.get('backend')} backend) and this "
            "machine has no usable GPU: run it on a GPU machine or recompile here"
        )
    produced_by = pef.manifest.get("producer", {}).get("torch")
    if target.get("backend") != "reference" and produced_by != torch.__version__:
        raise SambaPefError(
            f"'{path}' holds {target.get('backend')} binaries built with torch {produced_by}; "
            f"this is torch {torch.__version__}: recompile the PEF with this torch"
        )
    return get_backend(target.get("backend", "reference"))

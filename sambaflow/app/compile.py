"""`session.compile`: trace an app's step, compile every program, write the PEF and its log."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import torch
from torch import nn

import sambaflow
from sambaflow.app.backend_choice import choose_backend
from sambaflow.app.microbatching import trace_microbatched
from sambaflow.app.precision import compile_notes, requested_preset
from sambaflow.app.progress_line import ProgramProgress
from sambaflow.app.run_notes import threads_metadata
from sambaflow.app.tracing import named_graph_inputs, optimizer_list, progress, splits_at_gradients
from sambaflow.atomic import atomic_write, check_writable, reported_as
from sambaflow.backends.rewrites import rewrites_off
from sambaflow.passes.memory import peak_computed_bytes
from sambaflow.pef.file import CompiledGraph, write_pef
from sambaflow.pef.sign import key_path, load_key, user_key
from sambaflow.runtime.executable import Executable
from sambaflow.trace.plan import takes_keywords


def pef_path_for(name: str, config: dict[str, Any], inference: bool) -> str:
    """`-p` if given, else `<output-folder>/<pef-name>/<pef-name>.pef`."""
    if config.get("pef") and config.get("command", "compile") == "compile":
        return str(config["pef"])
    pef_name = config.get("pef_name") or (name.lower() + ("_inf" if inference else ""))
    folder = config.get("output_folder") or "out"
    return os.path.join(folder, pef_name, f"{pef_name}.pef")


def compile_pef(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    optim: Any,
    name: str | None = None,
    app_dir: str | None = None,
    config_dict: dict[str, Any] | None = None,
    pef_metadata: dict[str, Any] | None = None,
    init_output_grads: bool = True,
    inference: bool = False,
    squeeze_bs_dim: bool = False,
    loss_indices: Sequence[int] | None = None,
    backend: str | None = None,
    graphamp_preset: str | None = None,
    **_: Any,
) -> str:
    """Trace and compile `model`'s step (forward only with `inference`) into a PEF; return its path.

    `config_dict` (default: the arguments `parse_app_args` parsed) gives the PEF's place
    (`--pef-name`, `--output-folder`, or `-p`) and is recorded in it. `graphamp_preset` (else
    `--graphamp-preset`) "mp1" compiles bf16 mixed precision; the PEF records its precision.
    """
    config = dict(config_dict if config_dict is not None else _parsed_config())
    name = name or type(model).__name__
    inference = bool(inference or config.get("inference"))
    path = pef_path_for(name, config, inference)
    check_writable(path, "the PEF")  # a folder, a read-only place: say so before a long compile
    key = load_key(key_path(config.get("sign_key")))  # a bad key file fails before a long compile
    key = key or user_key(create=True)  # your own PEFs then load without a warning
    log = CompileLog(path)
    chosen = choose_backend(backend or config.get("backend"), log.note)
    started = time.perf_counter()
    graphs = {}
    optimizers = [] if inference else optimizer_list(optim)
    amp = requested_preset(graphamp_preset, config)
    if isinstance(inputs, Mapping) and not takes_keywords(
        model, inputs
    ):  # several named forward graphs (cached generation: prompt, token)
        inference = True
        for graph_name, graph_inputs in named_graph_inputs(inputs, optimizers).items():
            graphs[graph_name] = _compiled(
                model, graph_inputs, [], loss_indices, chosen, log, graphamp=amp, name=graph_name
            )
    else:
        if optimizers:
            microbatch, split = config.get("microbatch_size"), splits_at_gradients(config)
            graphs["train"] = _compiled(
                model, inputs, optimizers, loss_indices, chosen, log, microbatch, split, amp
            )
        graphs["inference"] = _compiled(model, inputs, [], loss_indices, chosen, log, graphamp=amp)
    header = _header(name, chosen, config, pef_metadata, inference, init_output_grads, app_dir)
    main = graphs.get("train", next(iter(graphs.values()))).graph
    header["precision"] = main.precision
    for line in compile_notes(main.precision):
        log.note(line)
    with reported_as(path, "the PEF"):  # a full disk: one line naming the file
        write_pef(path, header, graphs, main.as_text(), key)
    signed = f", signed with {key.source}" if key else ""
    log.note(
        f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB{signed}) in "
        f"{time.perf_counter() - started:.1f} s"
    )
    log.finish(config, main)
    return path


def _parsed_config() -> dict[str, Any]:
    from sambaflow.app.args import parsed_args

    args = parsed_args()
    return {} if args is None else vars(args)


def _compiled(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    optimizers: list,
    loss_indices: Any,
    backend: Any,
    log: CompileLog,
    microbatch_size: int | None = None,
    split_at_gradients: bool = False,
    graphamp: str | None = None,
    name: str | None = None,
) -> CompiledGraph:
    kind = "training step" if optimizers else f"'{name}' graph" if name else "inference graph"
    log.note(f"tracing the {kind} of {type(model).__name__}")
    graph = trace_microbatched(model, inputs, optimizers, microbatch_size, log.note, loss_indices, graphamp)
    executable = Executable.build(graph, backend, split_at_gradients=split_at_gradients)
    if optimizers:
        fused = bool(getattr(backend, "fuses_elementwise", False))
        peak = peak_computed_bytes(executable.programs["step"].module, fused=fused) / 2**20
        log.note(f"the step's computed tensors peak at about {peak:.1f} MiB (graph estimate; -mb lowers it)")
    log.note(
        f"compiling {len(executable.programs)} programs ({', '.join(executable.programs)}) "
        f"with the {backend.name} backend"
    )
    # Each Inductor compile takes seconds: a live line on a terminal, then per program its time
    # and the backend's report (cache hit or miss and why).
    distinct = len({id(program) for program in executable.programs.values()})
    line = ProgramProgress(log.note, distinct, getattr(backend, "reports", None))
    binaries = executable.binaries(line.start)
    line.finish()
    return CompiledGraph(graph, executable.programs, binaries)


def _header(
    name: str,
    backend: Any,
    config: dict[str, Any],
    metadata: dict[str, Any] | None,
    inference: bool,
    init_output_grads: bool,
    app_dir: str | None,
) -> dict[str, Any]:
    return {
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "producer": {
            "sambaflow": sambaflow.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "target": {"backend": backend.name, "device": getattr(backend, "device", "cpu")},
        "compile_args": jsonable({k: v for k, v in config.items() if k != "sign_key"}),
        "pef_metadata": jsonable(
            {
                "threads": threads_metadata(),
                "rewrites_off": rewrites_off(),  # for the report (the rewrites are inductor's)
                **data_parallel_metadata(config),
                **(metadata or {}),
            }
        ),
        "inference": inference,
        "init_output_grads": init_output_grads,
        "app_dir": app_dir,
    }


def data_parallel_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """`--data-parallel -ws N` as recorded: the mode and the world size it was compiled for. One PEF
    runs on any number of replicas; the number is what `compile` was told, for the record."""
    return {
        "data_parallel": bool(config.get("data_parallel")),
        "world_size": int(config.get("world_size") or 1),
    }


def jsonable(value: Any) -> Any:
    """Args and metadata as JSON: containers kept, anything exotic as its str()."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class CompileLog:
    """Progress on the console and the same lines, plus a report, in `<pef dir>/<name>.compile.log`."""

    def __init__(self, pef_path: str) -> None:
        from sambaflow.samba.directives import forget_fusion_scopes

        forget_fusion_scopes()  # the log lists the op_fusion hints this compile's traces enter
        self.path = os.path.splitext(pef_path)[0] + ".compile.log"
        self.lines: list[str] = []
        self.started = time.perf_counter()

    def note(self, message: str) -> None:
        progress(message)
        self.lines.append(f"[{time.perf_counter() - self.started:7.2f}s] {message}")

    def finish(self, config: dict[str, Any], graph: Any) -> None:
        from sambaflow.app.args import INEFFECTIVE_ARGUMENTS, ineffective_arguments
        from sambaflow.app.rdu_settings import RDU_ONLY, fusion_hints, no_effect_line, rdu_only_given
        from sambaflow.samba.directives import fusion_scopes

        report = [
            f"sambaflow {sambaflow.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}",
            "arguments: " + json.dumps(jsonable(config), sort_keys=True),
        ]
        # SambaNova's modelzoo (samba_compile: CompileArgs) gives RDU settings the argument parser
        # has no flag for: then they are all listed in one line, the flagged ones included
        given = rdu_only_given(config)
        flagged = set(INEFFECTIVE_ARGUMENTS) | {"log_level", "log_dir", "reduce_on_rdu"}  # parse_app_args's
        hints = fusion_hints(fusion_scopes())
        modelzoo = set(given) - flagged or any(hints.values())
        rdu = no_effect_line(config, hints) if modelzoo else None
        rest = {k: v for k, v in config.items() if not (rdu and k in RDU_ONLY)}
        unused = ineffective_arguments(_namespace(rest)) if rest else []
        unused += [rdu] if rdu else []
        report += [f"NO EFFECT: {line}" for line in unused] or ["every given argument took effect"]
        report += [f"fixed at compile time (not run-time inputs): {note}" for note in graph.baked]
        report += [f"run-time hyperparameters: {graph.hyper_defaults}"]
        for line in unused:
            progress(f"note: {line}")
        with reported_as(self.path, "the compile log"), atomic_write(self.path) as handle:
            # concurrent compiles each leave a whole log
            handle.write(("\n".join(self.lines + report) + "\n").encode())


def _namespace(config: dict[str, Any]) -> Any:
    import argparse

    return argparse.Namespace(**config)

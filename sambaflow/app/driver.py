"""`common_app_driver`: the standard commands of a SambaFlow app (compile, test, measure-*)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import torch
from torch import nn

from sambaflow.app.compile import compile_pef, data_parallel_metadata, jsonable
from sambaflow.app.diagnose import explain_failure
from sambaflow.app.gold import test_against_cpu
from sambaflow.app.measure import measure_performance, measure_sections
from sambaflow.app.tracing import progress, trace_graph
from sambaflow.errors import SambaArgumentError
from sambaflow.trace.locate import recording_sources

#: relative tolerance of `test` (gold.py explains the rule)
TOLERANCE = 1e-4


def get_pefmeta(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """Metadata embedded in the PEF: the model, its size and the app's arguments."""
    return {
        "model": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "command": getattr(args, "command", None),
        **data_parallel_metadata(vars(args)),
        "args": jsonable(vars(args)),
    }


def common_app_driver(
    args: argparse.Namespace,
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    optim: Any,
    name: str | None = None,
    squeeze_bs_dim: bool = False,
    init_output_grads: bool = True,
    app_dir: str | None = None,
    pef_metadata: dict[str, Any] | None = None,
    loss_indices: Sequence[int] | None = None,
    **_: Any,
) -> Any:
    """Run `args.command` for the app; `run` is the app's own loop and is not handled here."""
    command = getattr(args, "command", None)
    inference = bool(getattr(args, "inference", False))
    if command == "compile":
        return compile_pef(
            model,
            inputs,
            optim,
            name=name,
            app_dir=app_dir,
            config_dict=vars(args),
            pef_metadata=pef_metadata or get_pefmeta(args, model),
            init_output_grads=init_output_grads,
            inference=inference,
            squeeze_bs_dim=squeeze_bs_dim,
            loss_indices=loss_indices,
        )
    if command not in ("test", "measure-performance", "measure-sections"):
        raise SambaArgumentError(
            f"common_app_driver handles compile, test, measure-performance and "
            f"measure-sections; got command {command!r} (the app runs 'run' itself)"
        )
    pef = _required_pef(args, command)
    with recording_sources(command == "test"):  # the model line of a node that differs
        trace_graph(
            model,
            inputs,
            None if inference else optim,
            init_output_grads=init_output_grads,
            loss_indices=loss_indices,
            pef=pef,
        )
    if command == "test":
        return _test(model, inputs)
    if command == "measure-performance":
        return measure_performance(
            model,
            inputs,
            args.batch_size,
            n_chips=args.n_chips,
            inference=inference,
            run_graph_only=args.run_graph_only,
            n_iterations=args.num_iterations,
            json=args.json,
            min_duration=args.min_duration,
            data_parallel=getattr(args, "data_parallel", False),
            reduce_on_rdu=getattr(args, "reduce_on_rdu", False),
            world_size=getattr(args, "world_size", 1),
        )
    return measure_sections(
        model, inputs, n_iterations=args.num_iterations, batch_size=args.batch_size, json=args.json
    )


def _required_pef(args: argparse.Namespace, command: str) -> str:
    pef = getattr(args, "pef", None)
    if not pef:
        raise SambaArgumentError(
            f"'{command}' needs a compiled PEF: pass -p/--pef out/<name>/<name>.pef (compile writes it)"
        )
    return pef


def _test(model: nn.Module, inputs: Sequence[torch.Tensor]) -> bool:
    progress("comparing the compiled graph with plain PyTorch on the CPU")
    if test_against_cpu(model, inputs, TOLERANCE):
        progress("test passed")
        return True
    progress("test FAILED: some tensors differ beyond the tolerance")
    explain_failure(model, TOLERANCE, progress)
    sys.exit(1)

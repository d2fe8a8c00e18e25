"""The one-line notes `trace_graph` prints about how a run will go, each None when there is nothing
to say: where the programs come from, settings a PEF overrides, and weights nobody loaded."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

# Options whose value names a checkpoint an app loads (`--load-checkpoint`, gpt2_app's
# `--checkpoint`); a `--save-...` option writes one instead.
_CHECKPOINT_WORDS = ("checkpoint", "ckpt")


def in_process(backend_name: str) -> str:
    return (
        f"no PEF given (-p): tracing the step and compiling it in this process with the "
        f"{backend_name} backend (programs compile on first use; `compile` writes a PEF that runs "
        "without compiling)"
    )


def ignored_backend(requested: Any, pef_backend: str, path: str) -> str | None:
    """A note when `--backend` (or `backend=`) asked for another backend than the PEF's."""
    name = requested if isinstance(requested, str) or requested is None else requested.name
    if name is None or name == pef_backend:
        return None
    return (
        f"note: --backend {name}: accepted but had no effect ('{path}' was compiled for the "
        f"{pef_backend} backend, which runs it; recompile with --backend {name} to change it)"
    )


def threads_metadata() -> dict[str, int | None]:
    """What a PEF records of the thread count it was compiled with (see `ignored_threads`)."""
    return {"torch": torch.get_num_threads(), "cpus": os.cpu_count()}


def ignored_threads(pef_metadata: dict[str, Any]) -> str | None:
    """A note when the PEF's Inductor loops have a fixed thread count other than this run's.

    Inductor (torch 2.13) writes `#pragma omp parallel num_threads(N)` into its C++ when N, torch's
    thread count at compile time, differs from the machine's CPU count; when they are equal it
    writes a bare `#pragma omp parallel`, which follows `torch.set_num_threads` at run time.
    """
    threads = pef_metadata.get("threads") if isinstance(pef_metadata, dict) else None
    compiled = threads.get("torch") if isinstance(threads, dict) else None
    if not isinstance(compiled, int) or compiled in (threads.get("cpus"), torch.get_num_threads()):
        return None
    now = torch.get_num_threads()
    return (
        f"note: this PEF's compiled loops run on {compiled} threads (it was compiled with {compiled}); "
        f"this run's {now} threads apply to library calls (matrix products) only: recompile with "
        f"--num-threads {now} to change the loops too"
    )


def no_weights_loaded(args: argparse.Namespace | None, command_pef: str | None) -> str | None:
    """`run --inference` with no checkpoint option given: the weights are the random initial ones."""
    if args is None or getattr(args, "command", None) != "run" or not getattr(args, "inference", False):
        return None
    if _checkpoint_given(args):
        return None
    source = f"'{command_pef}' holds no weights and " if command_pef else ""
    return (
        f"note: --inference with no checkpoint: {source}no trained weights were loaded, so the model "
        "runs with its random initial weights and its accuracy means nothing. Train first and save "
        "a checkpoint, then load it into the model before trace_graph (e.g. ffn_app.py's "
        "--save-checkpoint / --load-checkpoint)"
    )


def _checkpoint_given(args: argparse.Namespace) -> bool:
    return any(
        value
        for dest, value in vars(args).items()
        if any(word in dest for word in _CHECKPOINT_WORDS) and not dest.startswith("save")
    )


def ignored_microbatch(
    args: argparse.Namespace | None, compile_args: dict[str, Any], path: str
) -> str | None:
    """A note when `run -mb` asks for another micro-batch size than the PEF was compiled with:
    micro-batching is built into the PEF's step."""
    wanted = getattr(args, "microbatch_size", None) if args is not None else None
    compiled = compile_args.get("microbatch_size") if isinstance(compile_args, dict) else None
    if wanted is None or wanted == compiled or getattr(args, "inference", False):
        return None
    built = f"-mb {compiled}" if compiled else "no micro-batching"
    return (
        f"note: -mb {wanted}: accepted but had no effect ('{path}' was compiled with {built}, which "
        f"its step runs; recompile with -mb {wanted} to change it)"
    )

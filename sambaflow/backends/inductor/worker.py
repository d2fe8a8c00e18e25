"""A compile worker: a child process that turns section programs into AOTInductor packages.

`main()` (parallel.py starts it with `python -c`) reads tasks from stdin and writes one result
per task to stdout until stdin closes. A task carries the program's graph pickled by torch.fx's
`GraphPickler`, which keeps node names, the generated code and the fake-tensor `meta['val']` of
every node, so the worker compiles the very graph this process traced: same fingerprint, same
package metadata, same generated code. It is a fresh interpreter (`subprocess`, not
`multiprocessing`), so an app script's top level never runs again in it.

Tasks and results are pickles between a process and its own child, never read from a file.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
import traceback
from typing import Any, BinaryIO

import torch

from sambaflow.passes.sections import SectionProgram


def task_for(program: SectionProgram, key: str, for_target: str) -> dict[str, Any]:
    """All a worker needs to compile `program` as this process would. Raises when it cannot
    travel (a graph or an Inductor setting that does not pickle): then this process compiles it."""
    from torch.fx._graph_pickler import GraphPickler, Options

    return {
        "name": program.name,
        "graph": GraphPickler.dumps(program.module, Options(ops_filter=None)),
        "inputs": list(program.inputs),
        "outputs": list(program.outputs),
        "key": key,
        "target": for_target,
        # Inductor writes the thread count into the loops it generates (see cache key "threads").
        "threads": torch.get_num_threads(),
        "config": pickle.dumps(_changed_inductor_config()),
    }


def _changed_inductor_config() -> dict[str, Any]:
    """The Inductor settings this process changed in code (settings from the environment travel
    with the environment)."""
    import torch._inductor.config as config

    return config._get_dict(skip_default=True)


def program_from(task: dict[str, Any]) -> SectionProgram:
    """The task's program, its fake tensors rebuilt in a fresh FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler

    module = GraphPickler.loads(task["graph"], FakeTensorMode())
    return SectionProgram(task["name"], module, task["inputs"], task["outputs"])


def run_task(task: dict[str, Any]) -> tuple[str, Any, Any]:
    """("ok", package, seconds), ("rebuild", why, None): the graph did not unpickle here, or
    ("error", message, traceback text): the compile failed (the message names the program)."""
    from sambaflow.backends.inductor.compiling import compile_package

    started = time.perf_counter()
    try:
        torch.set_num_threads(task["threads"])
        torch._inductor.config.load_config(pickle.loads(task["config"]))
        program = program_from(task)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which compiles it itself
        return "rebuild", f"{type(exc).__name__}: {exc}", None
    try:
        blob = compile_package(program, task["key"], task["target"])
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent
        return "error", str(exc), traceback.format_exc()
    return "ok", blob, time.perf_counter() - started


def serve(tasks: BinaryIO, results: BinaryIO) -> None:
    while True:
        try:
            task = pickle.load(tasks)
        except EOFError:
            return
        pickle.dump(run_task(task), results)
        results.flush()


def main() -> None:
    # Ctrl-C is the parent's to handle (it stops its workers, parallel._stop); SIGTERM from it
    # ends this worker through SystemExit, so its temporary folders are removed on the way out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # Results go out on the original stdout; anything Inductor or the C++ compiler prints goes to
    # stderr, so it cannot corrupt them.
    results = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # The imports a compile needs, before saying ready: the parent gives ready workers the
    # largest program left and compiles the others itself meanwhile.
    import torch._inductor.compile_fx  # noqa: F401
    import torch.export  # noqa: F401

    import sambaflow.backends.inductor.compiling  # noqa: F401

    pickle.dump("ready", results)
    results.flush()
    serve(sys.stdin.buffer, results)

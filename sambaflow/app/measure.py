"""Built-in performance measurement: whole-step throughput/latency and per-section times."""

from __future__ import annotations

import itertools
import json as json_module
import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn

from sambaflow.app.cpu_load import busy_warning, cpu_seconds, other_cpu_share
from sambaflow.app.tracing import progress
from sambaflow.backends.inductor import pool as memory_pool
from sambaflow.data.loader import SambaLoader
from sambaflow.errors import SambaArgumentError, SambaRunError
from sambaflow.runtime.session import session
from sambaflow.trace.graph import INPUT


def _outputs(model: nn.Module) -> Any:
    outputs = getattr(model, "output_tensors", None)
    if outputs is None or session.executable is None:
        raise SambaRunError(
            "measurement needs a loaded graph: call utils.trace_graph(model, inputs, optim, pef=...) first"
        )
    return outputs


def _timed_runs(
    inputs: Sequence[torch.Tensor],
    outputs: Any,
    sections: list[str] | None,
    n_iterations: int,
    min_duration: float | None,
    parallel: bool = False,
) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while not _enough(times, started, time.perf_counter(), n_iterations, min_duration):
        begin = time.perf_counter()
        session.run(inputs, outputs, section_types=sections, data_parallel=parallel)
        times.append(time.perf_counter() - begin)
    return times


def _enough(
    times: list[float], started: float, now: float, n_iterations: int, min_duration: float | None
) -> bool:
    """The timed runs stop after `n_iterations` steps, and not before `min_duration` seconds."""
    return len(times) >= n_iterations and not (min_duration and now - started < min_duration)


def _loader_runs(
    inputs: Sequence[torch.Tensor],
    outputs: Any,
    sections: list[str] | None,
    n_iterations: int,
    min_duration: float | None,
    parallel: bool = False,
) -> list[float]:
    """As `_timed_runs`, but each run's inputs come from a SambaLoader over `inputs` repeated, and
    a step's time runs from the end of the previous step: it includes waiting for the loader."""
    given = [t for t in inputs if t is not None]
    specs = session.executable.graph.inputs_with_role(INPUT)
    names = [getattr(t, "sn_name", None) or spec.name for t, spec in zip(given, specs)]
    batches = iter(SambaLoader(itertools.repeat(tuple(given)), names))
    times: list[float] = []
    started = begin = time.perf_counter()
    try:
        for batch in batches:
            session.run(batch, outputs, section_types=sections, data_parallel=parallel)
            end = time.perf_counter()
            times.append(end - begin)
            begin = end
            if _enough(times, started, end, n_iterations, min_duration):
                break
    finally:
        batches.close()  # type: ignore[attr-defined]  # stops the loader's thread now
    return times


def measure_performance(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    batch_size: int,
    n_chips: int = 1,
    inference: bool = False,
    run_graph_only: bool = True,
    n_iterations: int = 100,
    json: str | None = None,
    data_parallel: bool = False,
    reduce_on_rdu: bool = False,
    use_sambaloader: bool = False,
    min_duration: float | None = None,
    world_size: int = 1,
    **_: Any,
) -> tuple[float, float]:
    """One untimed warm-up run, then `n_iterations` timed whole steps. Returns (samples/s, s/step).

    With `use_sambaloader=True` the timed steps are fed by a SambaLoader over `inputs` (its
    producer thread, conversion and hand-over included in each step's time), as an app's
    training loop over a SambaLoader would be.
    """
    if n_iterations < 1:
        raise SambaArgumentError(f"n_iterations must be at least 1, got {n_iterations}")
    outputs = _outputs(model)
    sections = ["fwd"] if inference else None
    threads = torch.get_num_threads()
    parallel = data_parallel or reduce_on_rdu
    world_size, first = _replicas(parallel, world_size)
    say = print if first else _silent
    say(f"Measuring performance with world size:  {world_size}")
    say(f"CPU threads: {threads} (torch.get_num_threads(); set with --num-threads)")
    say("initial run starts.")
    session.run(inputs, outputs, section_types=sections, data_parallel=parallel)
    say("initial run completes.")
    if memory_pool.stats() is not None:  # the run loaded a compiled CPU program
        say(memory_pool.status())
    before = cpu_seconds()
    if use_sambaloader:
        say("timed runs are fed by a SambaLoader (use_sambaloader=True)")
    runs = _loader_runs if use_sambaloader else _timed_runs
    times = runs(inputs, outputs, sections, n_iterations, min_duration, parallel)
    others = other_cpu_share(before, cpu_seconds())
    duration = sum(times)
    latency = duration / len(times)
    throughput = len(times) * batch_size * world_size / duration
    if parallel:  # SambaFlow's data-parallel form: every replica ran as many steps, in step
        say(
            f"e2e_latency: {latency:.6f} seconds, throughput: {throughput:.2f} samples/s, "
            f"measured over {len(times)} iterations."
        )
        say(f"NOTE: This is the combined throughput for {world_size} workers")
    else:
        say(
            f"e2e_throughput: {throughput:.2f} samples/s, measured over {len(times)} iterations. "
            f"Average latency: {latency:.6f} s."
        )
        say(f"e2e_latency: {latency:.6f} s")
    say(f"total duration: {duration:.4f} s")
    warning = busy_warning(others, threads)
    if warning:
        say(warning)
    if json and first:
        _write_json(
            json,
            {
                "throughput": throughput,
                "latency": latency,
                "n_iterations": len(times),
                "batch_size": batch_size,
                "world_size": world_size,
                "duration": duration,
                "median_step_s": statistics.median(times),
                "inference": inference,
                "backend": session.executable.backend.name,
                "num_threads": threads,
                "other_cpu_share": others,
                "use_sambaloader": use_sambaloader,
            },
        )
    return throughput, latency


def _replicas(parallel: bool, world_size: int) -> tuple[int, bool]:
    """The world size measured over, and whether this process reports: data parallel counts the
    replicas that joined, and only rank 0 prints and writes the JSON (every replica times the
    same synchronised steps)."""
    if not parallel:
        return world_size, True
    from sambaflow.runtime import communicator

    comm = communicator.current()
    return comm.world_size, comm.rank == 0


def _silent(*_: Any) -> None:
    pass


def measure_sections(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    num_sections: int | None = None,
    n_iterations: int = 100,
    batch_size: int | None = None,
    json: str | None = None,
    **_: Any,
) -> dict[str, float]:
    """Median time of each section run on its own, and of the fused whole step, in seconds."""
    outputs = _outputs(model)
    sections = list(session.executable.sections)
    session.run(inputs, outputs)  # warm-up; leaves every section's inputs on the device
    samples: dict[str, list[float]] = {name: [] for name in sections + ["step"]}
    for _ in range(max(1, n_iterations)):
        for name in sections:
            begin = time.perf_counter()
            session.run(inputs, outputs, section_types=[name])
            samples[name].append(time.perf_counter() - begin)
        samples["step"] += _timed_runs(inputs, outputs, None, 1, None)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"CPU threads: {torch.get_num_threads()} (torch.get_num_threads(); set with --num-threads)")
    _print_table(medians, batch_size)
    if json:
        _write_json(json, {"median_s": medians, "n_iterations": n_iterations, "batch_size": batch_size})
    return medians


def _print_table(medians: dict[str, float], batch_size: int | None) -> None:
    print(f"{'section':<12}{'median (ms)':>14}{'samples/s':>14}")
    for name, seconds in medians.items():
        rate = f"{batch_size / seconds:14.1f}" if batch_size else f"{'-':>14}"
        label = "whole step" if name == "step" else name
        print(f"{label:<12}{seconds * 1e3:14.3f}{rate}")


def _write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json_module.dump(report, handle, indent=2)
    progress(f"wrote {path}")

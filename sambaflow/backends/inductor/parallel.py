"""Compile several programs at once: this process plus worker processes (worker.py).

An AOTInductor compile is single-threaded Python (export, lowering) and then one C++ compile, so
a PEF's programs compiled one after another keep one core busy. `SAMBAFLOW_COMPILE_JOBS` says how
many compile at once (default: the CPUs this process may run on; 1: one after another in this
process, as before). This process is one of them: whenever it waits for a result it compiles the
next program itself, so two jobs start one worker. Workers pay an interpreter start and the torch
imports (seconds) before their first program, so each consumer takes the largest program left
when it is ready (largest first keeps the last one to finish short).

A worker that cannot rebuild a program (a graph that does not pickle) hands it back and this
process compiles it; a failed compile raises the worker's error, which names the program, with
the worker's traceback as its cause.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import sambaflow
from sambaflow.errors import SambaBackendError

JOBS_ENV = "SAMBAFLOW_COMPILE_JOBS"
Outcome = tuple[str, Any, Any]  # worker.run_task's ("ok", package, seconds) and its failures


def compile_jobs() -> int:
    """How many programs may compile at once: `$SAMBAFLOW_COMPILE_JOBS`, else the usable CPUs."""
    text = os.environ.get(JOBS_ENV, "").strip()
    if not text:
        return _usable_cpus()
    if not text.isdigit() or int(text) < 1:
        raise SambaBackendError(
            f"{JOBS_ENV}={text!r}: give how many programs may compile at once, a whole number from 1 "
            "(1: one after another in this process)"
        )
    return int(text)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what taskset or a container leaves us
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class Job:
    """One program to compile; `task` (worker.task_for) is None when only this process can."""

    name: str
    task: dict[str, Any] | None
    size: int  # graph nodes: the larger, the longer it compiles
    taken: bool = False
    outcome: Outcome | None = None


class RemoteTraceback(Exception):
    """The traceback of a compile that failed in a worker (the cause of the error raised here)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0])


@dataclass(eq=False)
class Worker:
    proc: subprocess.Popen
    ready: bool = False


@dataclass
class CompilePool:
    """`with CompilePool(jobs, workers, here) as pool: pool.result(name)`; `here(name)` compiles
    one job in this process and returns its outcome (None: only the workers compile)."""

    jobs: list[Job]
    workers: int
    here: Callable[[str], Outcome] | None
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _started: list[Worker] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _closing: bool = False

    def __enter__(self) -> CompilePool:
        for _ in range(self.workers):
            self._started.append(Worker(_start_worker()))
            self._threads.append(threading.Thread(target=self._feed, args=(self._started[-1],), daemon=True))
            self._threads[-1].start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._closing = True
            # After a failure (or Ctrl-C) the other compiles are of no use; a worker still starting
            # up would only finish its imports.
            doomed = [w for w in self._started if exc[0] is not None or not w.ready]
        for worker in self._started:
            if worker in doomed:
                _stop(worker.proc)
            _close(worker.proc.stdin)
        for thread in self._threads:
            thread.join()
        for worker in self._started:
            worker.proc.wait()
            _close(worker.proc.stdout)

    def result(self, name: str) -> Outcome:
        """The outcome of job `name`; compiles jobs in this process while it is not done."""
        job = next(j for j in self.jobs if j.name == name)
        while True:
            with self._lock:
                self._lock.wait_for(lambda: job.outcome is not None or self._free(for_worker=False))
                if job.outcome is not None:
                    return job.outcome
                mine = self._take(for_worker=False)
            if mine is not None and self.here is not None:
                self._finish(mine, self.here(mine.name))

    def _free(self, for_worker: bool) -> list[Job]:
        """Jobs nobody has taken that this consumer may take (a worker: those that can travel)."""
        if self._closing or (not for_worker and self.here is None):
            return []
        return [j for j in self.jobs if not j.taken and (j.task is not None or not for_worker)]

    def _take(self, for_worker: bool) -> Job | None:
        """The largest free job, now taken."""
        free = self._free(for_worker)
        if not free:
            return None
        job = max(free, key=lambda j: j.size)
        job.taken = True
        return job

    def _finish(self, job: Job, outcome: Outcome) -> None:
        with self._lock:
            if outcome[0] == "rebuild":  # the worker could not rebuild it: this process compiles it
                job.task, job.taken = None, False
            else:
                job.outcome = outcome
            self._lock.notify_all()

    def _feed(self, worker: Worker) -> None:
        """One worker's thread: once the worker is ready, send it the largest job left, and repeat."""
        proc = worker.proc
        ready = _receive(proc) == "ready"
        with self._lock:
            worker.ready = ready and not self._closing
        while worker.ready:
            with self._lock:
                job = self._take(for_worker=True)
            if job is None:
                return
            try:
                pickle.dump(job.task, proc.stdin)
                proc.stdin.flush()
                outcome = _receive(proc)
            except OSError:
                outcome = None
            self._finish(job, outcome if isinstance(outcome, tuple) else _died(proc, job.name))
            worker.ready = isinstance(outcome, tuple)


def _start_worker() -> subprocess.Popen:
    """A fresh interpreter running worker.py; it finds this sambaflow first on its path."""
    root = str(Path(sambaflow.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen(
        [sys.executable, "-c", "from sambaflow.backends.inductor.worker import main; main()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,  # Ctrl-C reaches this process only; _stop ends the worker's group
    )


def _stop(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """End a worker and the C++ compiler it may be running: SIGTERM to its process group (the
    worker removes its temporary folders, the compiler its temporary files), SIGKILL after
    `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            pass


def _receive(proc: subprocess.Popen) -> Any:
    """The worker's next message, or None when it exited."""
    try:
        return pickle.load(proc.stdout)
    except (EOFError, OSError, pickle.UnpicklingError):
        return None


def _died(proc: subprocess.Popen, name: str) -> Outcome:
    code = proc.wait()
    return (
        "error",
        f"inductor: the compile worker (pid {proc.pid}) compiling program '{name}' exited with "
        f"code {code}; its output above says why. Set {JOBS_ENV}=1 to compile in this process",
        None,
    )


def _close(stream: Any) -> None:
    try:
        stream.close()
    except OSError:
        pass

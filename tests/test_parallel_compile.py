"""Several programs compiled at once (backends/inductor/parallel.py): a worker's package is the one
this process would make, a PEF's programs come out in order with the same cache entries, and a
failure names its program. Two tiny graphs, compiled in each of two ways (~25 s cold)."""

from __future__ import annotations

import functools
import io
import pickle
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sambaflow.backends.base import export_many
from sambaflow.backends.inductor import ExportPlan, InductorBackend, available, fingerprint, parallel
from sambaflow.backends.inductor.parallel import JOBS_ENV, CompilePool, Job, RemoteTraceback, compile_jobs
from sambaflow.backends.inductor.probe import target
from sambaflow.backends.inductor.worker import run_task, task_for
from sambaflow.backends.reference import ReferenceBackend
from sambaflow.errors import SambaBackendError
from sambaflow.passes.sections import SectionProgram

inductor = pytest.mark.skipif(not available()[0], reason=f"inductor unavailable: {available()[1]}")


def _affine(x, w):
    return (torch.relu(torch.mm(x, w) * 3.0 - 1.0),)


def _reduce(x):
    return (torch.sigmoid(x).sum(0), x.exp().amax(1))


def programs() -> dict[str, SectionProgram]:
    affine = make_fx(_affine, tracing_mode="fake")(torch.randn(8, 4), torch.randn(4, 6))
    reduce = make_fx(_reduce, tracing_mode="fake")(torch.randn(8, 5))
    return {
        "affine": SectionProgram("affine", affine, ["x", "w"], ["y"]),
        "reduce": SectionProgram("reduce", reduce, ["x"], ["s", "m"]),
    }


def broken() -> SectionProgram:
    """Fails in torch.export: its input claims a shape the matmul cannot take."""
    module = make_fx(_affine, tracing_mode="fake")(torch.randn(8, 4), torch.randn(4, 6))
    for node in module.graph.nodes:
        if node.op == "placeholder" and node.name.startswith("w"):
            node.meta["val"] = node.meta["val"].new_empty(5, 6)
    return SectionProgram("broken", module, ["x", "w"], ["y"])


def sources(blob: bytes) -> dict[str, str]:
    """The generated C++ and metadata of a package without comments (Inductor appends its build
    commands, with their temporary folders, to each source) or generated file names."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        for name in archive.namelist():
            if name.endswith((".cpp", "metadata.json")):
                lines = archive.read(name).decode().splitlines()
                code = "\n".join(
                    line for line in lines if line.strip() and not line.lstrip().startswith("//")
                )
                out[name.rsplit(".", 2)[-2] if name.endswith(".cpp") else "metadata"] = code
    return out


def worker_pool(jobs: list[Job]) -> CompilePool:
    return CompilePool(jobs, workers=1, here=None)  # only the worker compiles


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> tuple[InductorBackend, dict[str, bytes]]:
    backend = InductorBackend(cache_dir=tmp_path_factory.mktemp("seq") / "inductor")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(JOBS_ENV, "1")
        return backend, export_many(backend, programs())


def here_only_after_the_worker_took_a_program(monkeypatch) -> list[str]:
    """Make this process start its compile only once the worker has taken the other program, so
    each compiles one (otherwise who compiles what depends on timing); returns what it compiled."""
    pools, here = [], []
    enter, compile_here = CompilePool.__enter__, ExportPlan.compile_here

    def entered(pool):
        pools.append(pool)
        return enter(pool)

    def waiting(plan):
        deadline = time.monotonic() + 120
        while not all(job.taken for job in pools[-1].jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        here.append(plan.program.name)
        return compile_here(plan)

    monkeypatch.setattr(CompilePool, "__enter__", entered)
    monkeypatch.setattr(ExportPlan, "compile_here", waiting)
    return here


@inductor
@pytest.mark.slow
def test_parallel_export_gives_the_sequential_packages_reports_and_cache(sequential, tmp_path, monkeypatch):
    monkeypatch.setenv(JOBS_ENV, "2")
    here = here_only_after_the_worker_took_a_program(monkeypatch)
    backend = InductorBackend(cache_dir=tmp_path / "inductor")
    started = []
    packages = export_many(backend, programs(), started.append)
    assert len(here) == 1 and here[0] in packages  # the other one the worker compiled
    first, first_packages = sequential
    assert started == ["affine", "reduce"] and list(packages) == started
    assert [(r.program, r.cache, r.fingerprint) for r in backend.reports] == [
        (r.program, r.cache, r.fingerprint) for r in first.reports
    ]
    assert all(r.seconds > 0 for r in backend.reports)
    for name in packages:
        assert sources(packages[name]) == sources(first_packages[name]), name
    assert len(sources(packages["affine"])) == 3  # wrapper, kernels, metadata
    entries = {e.key: e.note["parts"] for e in backend.cache.entries()}
    assert entries == {e.key: e.note["parts"] for e in first.cache.entries()} and len(entries) == 2
    assert all(backend.cache.problem(e) is None for e in backend.cache.entries())
    again = InductorBackend(cache_dir=tmp_path / "inductor")
    assert export_many(again, programs()) == packages  # all cache hits: nothing to compile
    assert [r.cache for r in again.reports] == ["hit", "hit"]

    x, w = torch.randn(8, 5), torch.randn(4, 6)
    s, m = backend.load(programs()["reduce"], packages["reduce"])([x])
    torch.testing.assert_close(s, torch.sigmoid(x).sum(0))
    torch.testing.assert_close(m, x.exp().amax(1))
    (y,) = backend.load(programs()["affine"], packages["affine"])([x[:, :4], w])
    torch.testing.assert_close(y, torch.relu(x[:, :4] @ w * 3.0 - 1.0))


@inductor
@pytest.mark.slow
def test_a_failed_compile_names_its_program_with_the_workers_traceback(monkeypatch, tmp_path):
    bad = broken()
    with worker_pool([Job("broken", task_for(bad, fingerprint(bad), target("cpu")), 1)]) as pool:
        outcome, message, trace = pool.result("broken")
    assert outcome == "error" and "program 'broken' failed" in message
    assert "Traceback" in trace and "compile_package" in trace

    monkeypatch.setenv(JOBS_ENV, "2")
    both = {"broken": bad, **{k: v for k, v in programs().items() if k == "reduce"}}
    with pytest.raises(SambaBackendError, match="program 'broken' failed") as caught:
        export_many(InductorBackend(cache_dir=tmp_path / "inductor"), both)
    # compiled here its cause is torch's own error; compiled in the worker, the worker's traceback
    assert caught.value.__cause__ is not None


def fake_worker(monkeypatch, script: str) -> None:
    """Workers that say they are ready, read a task, then run `script` (no torch: fast)."""
    ready = "import pickle, sys; out = sys.stdout.buffer; pickle.dump('ready', out); out.flush(); "
    ready += "pickle.load(sys.stdin.buffer); "
    command = [sys.executable, "-c", ready + script]
    popen = functools.partial(subprocess.Popen, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    monkeypatch.setattr(parallel, "_start_worker", popen)


def test_a_worker_that_dies_is_an_error_naming_the_program(monkeypatch):
    fake_worker(monkeypatch, "sys.exit(3)")
    with worker_pool([Job("step", {"name": "step"}, 1)]) as pool:
        outcome, message, _ = pool.result("step")
    assert outcome == "error" and "compiling program 'step' exited with code 3" in message
    assert f"{JOBS_ENV}=1" in message


def test_a_program_the_worker_cannot_rebuild_compiles_here(monkeypatch):
    assert (
        run_task({"name": "odd", "graph": b"junk", "threads": 1, "config": pickle.dumps({})})[0] == "rebuild"
    )
    fake_worker(
        monkeypatch, "pickle.dump(('rebuild', 'no such op', None), out); out.flush(); sys.stdin.read()"
    )
    jobs, here = [Job("odd", {"name": "odd"}, 1)], []
    with CompilePool(jobs, workers=1, here=lambda name: here.append(name) or ("ok", b"pkg", 0.5)) as pool:
        while jobs[0].task is not None:  # until the worker has handed it back
            time.sleep(0.01)
        assert pool.result("odd") == ("ok", b"pkg", 0.5)
    assert here == ["odd"]


def test_compile_jobs_setting(monkeypatch):
    monkeypatch.delenv(JOBS_ENV, raising=False)
    assert compile_jobs() >= 1
    monkeypatch.setenv(JOBS_ENV, "3")
    assert compile_jobs() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(JOBS_ENV, bad)
        with pytest.raises(SambaBackendError, match=JOBS_ENV):
            compile_jobs()


def test_backends_without_export_many_export_one_after_another():
    started = []
    exported = export_many(ReferenceBackend(), programs(), started.append)
    assert started == list(exported) == ["affine", "reduce"]
    assert all(isinstance(blob, bytes) for blob in exported.values())


def test_remote_traceback_reads_as_the_workers_traceback():
    assert str(RemoteTraceback("Traceback (most recent call last):\n  boom")).startswith("\nTraceback")

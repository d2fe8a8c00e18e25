"""The inductor backend's memory pool (backends/inductor/pool.py): the big buffers of compiled CPU
programs keep their pages from one run to the next, without changing any number, any allocation
outside the runs, or a tensor the app still holds."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

from sambaflow import samba
from sambaflow.backends.inductor import available, pool
from sambaflow.samba import utils

from helpers import _eager_step, make_pair, named_inputs, rel_err

pytestmark = pytest.mark.skipif(not available()[0], reason=f"inductor unavailable: {available()[1]}")
MIB = 1 << 20


def pooled(make):
    """Run `make` as a compiled program's body would run: inside the pool."""
    return pool.wrap(lambda _: make(), on_cpu=True)([])


def delta(before: dict[str, int]) -> dict[str, int]:
    after = pool.stats()
    return {k: after[k] - before[k] for k in after}


@pytest.fixture
def empty_pool():
    """The pool installed, with no free memory left from earlier tests."""
    pooled(lambda: None)
    assert pool.stats() is not None, pool.status()
    pool.release()
    return pool.stats()


def test_blocks_are_split_merged_and_given_back(empty_pool):
    (big,) = pooled(lambda: [torch.empty(8 * MIB, dtype=torch.uint8)])
    assert delta(empty_pool)["misses"] == 1 and delta(empty_pool)["bytes"] == 8 * MIB
    del big
    assert delta(empty_pool)["free_bytes"] == 8 * MIB
    a, b = pooled(
        lambda: [torch.full((2 * MIB,), 1, dtype=torch.uint8), torch.full((3 * MIB,), 2, dtype=torch.uint8)]
    )
    grown = delta(empty_pool)
    assert grown["hits"] == 2 and grown["bytes"] == 8 * MIB, "both should be cut from the free 8 MiB"
    assert (a == 1).all() and (b == 2).all(), "two lent blocks overlap"
    holder = [a]
    del a
    freeing = threading.Thread(target=holder.clear)  # a block may be freed on any thread
    freeing.start()
    freeing.join()
    del b
    assert delta(empty_pool)["free_bytes"] == 8 * MIB and delta(empty_pool)["lent"] == 0
    assert pool.release() == empty_pool["bytes"], "the merged 8 MiB segment should be released whole"


def test_allocations_outside_runs_small_ones_and_gpu_programs_are_not_pooled(empty_pool):
    outside = torch.empty(8 * MIB, dtype=torch.uint8)  # eager PyTorch in the same process
    (small,) = pooled(lambda: [torch.empty(MIB // 2, dtype=torch.uint8)])  # glibc's heap keeps these
    assert delta(empty_pool) == {k: 0 for k in empty_pool}
    del outside, small

    def run(tensors):
        return tensors

    assert pool.wrap(run, on_cpu=False) is run


class WideMLP(nn.Module):
    """Activations of 2 MiB and more at batch 512: big enough for the pool."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(256, 1024)
        self.down = nn.Linear(1024, 10)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.up(x))
        return self.criterion(self.down(hidden), y), hidden


@pytest.mark.slow
def test_compiled_step_reuses_its_memory_keeps_held_outputs_and_matches_eager():
    reference, model = make_pair(WideMLP)

    def batch():
        return [torch.randn(512, 256), torch.randint(10, (512,))]

    optim = samba.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs = utils.trace_graph(model, named_inputs(["x", "y"], batch()), [optim], backend="inductor")
    eager_optim = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    counts, held = [], None
    for step in range(7):
        data = batch()
        loss, hidden = samba.session.run(named_inputs(["x", "y"], data), outs)
        want_loss, want_hidden = _eager_step(reference, data, [eager_optim], None, None)
        assert rel_err(loss, want_loss) < 2e-4 and rel_err(hidden, want_hidden) < 2e-4, f"step {step}"
        counts.append(pool.stats())
        if step == 1:
            held, held_copy = hidden, hidden.clone()  # the app keeps one step's output
    assert counts[-1]["hits"] > counts[1]["hits"], "later steps should be served from the pool"
    # the held output takes one block out of the steady set: settled by step 4, then no new memory
    assert counts[-1]["misses"] == counts[4]["misses"], "a steady step should need no new memory"
    assert torch.equal(held, held_copy), "a later run wrote into an output the app still holds"
    samba.session.to_cpu(model)
    for got, want in zip(model.parameters(), reference.parameters()):
        assert rel_err(got, want) < 2e-4


def test_the_cap_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(pool.ENV, "64")
    assert pool.cap_bytes() == 64 * MIB
    monkeypatch.setenv(pool.ENV, "0")
    assert pool.cap_bytes() == 0
    monkeypatch.setenv(pool.ENV, "lots")
    with pytest.raises(ValueError, match="SAMBAFLOW_MEMORY_POOL_MB='lots': expected a whole number of MiB"):
        pool.cap_bytes()


def test_zero_turns_the_pool_off(tmp_path):
    script = textwrap.dedent(
        """
        import torch
        from sambaflow.backends.inductor import pool
        run = lambda tensors: tensors
        assert pool.wrap(run, on_cpu=True) is run
        print(pool.stats(), pool.status())
        """
    )
    env = {"SAMBAFLOW_MEMORY_POOL_MB": "0", "SAMBAFLOW_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None memory pool off: SAMBAFLOW_MEMORY_POOL_MB=0"


def test_a_cached_library_is_used_only_while_it_matches_its_note(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SAMBAFLOW_CACHE_DIR", str(tmp_path))
    pool._store("k", b"\x7fELF pretend library")
    assert pool._cached("k") == b"\x7fELF pretend library"
    library = tmp_path / "inductor" / "runtime" / "pool-k.so"
    library.write_bytes(b"\x7fELF planted code")
    with caplog.at_level(logging.WARNING, logger="sambaflow.compile"):
        assert pool._cached("k") is None
    assert "does not match its note; rebuilding" in caplog.text
    assert oct(library.parent.stat().st_mode & 0o777) == "0o700"


def test_without_a_compiler_programs_run_as_before(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler \(/nonexistent/c\+\+ not found on PATH\)"):
        pool._compiler()
    monkeypatch.setattr(pool, "_tried", False)
    monkeypatch.setattr(pool, "_library", None)
    monkeypatch.setattr(pool, "_load", pool._compiler)  # as the build meets it
    run = lambda tensors: tensors  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="sambaflow.compile"):
        assert pool.wrap(run, on_cpu=True) is run
    assert "memory pool off: no C++ compiler" in caplog.text and "run without it" in caplog.text

"""Two compiles of one app into one output folder at once: both succeed, the PEF left is whole.

Two processes each compile five times in a row (rounds), so their writes of the one PEF and
compile log overlap again and again without paying an interpreter start per round."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from test_pef import build

from sambaflow import samba
from sambaflow.atomic import atomic_write
from sambaflow.samba import utils

APP = """
import sys
sys.path.insert(0, {tests!r})
from sambaflow import samba
from sambaflow.samba.utils.argparser import parse_app_args
from test_pef import build

args = parse_app_args()
for _ in range({rounds}):
    samba.session.reset()
    model, inputs, optim = build()
    samba.session.compile(model, inputs, optim, name="ffn", config_dict=vars(args))
"""
ROUNDS = 5


@pytest.fixture(scope="module")
def expected_losses():
    model, inputs, optim = build()
    outs = utils.trace_graph(model, inputs, optim)
    return [float(samba.session.run(inputs, outs)[0]) for _ in range(2)]


@pytest.mark.slow
def test_two_compiles_into_one_folder_both_succeed(tmp_path, expected_losses):
    app = tmp_path / "app.py"
    app.write_text(APP.format(tests=os.path.dirname(__file__), rounds=ROUNDS))
    out = tmp_path / "out"
    command = [sys.executable, str(app), "compile", "--backend", "reference", "--output-folder", str(out)]
    command += ["--pef-name", "ffn"]
    env = dict(os.environ, SAMBAFLOW_BACKEND="reference")
    logs = [open(tmp_path / f"{who}.log", "w+") for who in "ab"]  # files: a full pipe would block
    runs = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env) for log in logs]
    pef, seen = out / "ffn" / "ffn.pef", set()
    while any(run.poll() is None for run in runs):  # meanwhile, every PEF a reader finds is whole
        with contextlib.suppress(FileNotFoundError):
            with zipfile.ZipFile(pef) as archive:
                assert archive.testzip() is None
            seen.add(os.stat(pef).st_ino)
        time.sleep(0.05)
    outputs = []
    for run, log in zip(runs, logs):
        run.wait(timeout=300)
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert len(seen) > 1, "the reader saw one PEF only: it did not overlap the writers"
    for run, text in zip(runs, outputs):
        assert run.returncode == 0, f"a compile failed:\n{text[-2000:]}"
        assert text.count("wrote ") == ROUNDS, text[-2000:]
    assert sorted(os.listdir(out / "ffn")) == ["ffn.compile.log", "ffn.pef"], "temporary files left"
    assert (out / "ffn" / "ffn.compile.log").read_text().rstrip().splitlines()[-1].startswith("run-time")
    model, inputs, optim = build()
    outs = utils.trace_graph(model, inputs, optim, pef=str(pef))
    got = [float(samba.session.run(inputs, outs)[0]) for _ in range(2)]
    assert got == pytest.approx(expected_losses, rel=1e-6)


def test_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "x.pef"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(str(target)) as handle:
        handle.write(b"half")
        raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ["x.pef"] and target.read_bytes() == b"old"
    with atomic_write(str(target)) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["x.pef"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_write_is_complete_for_a_concurrent_reader(tmp_path):
    """A reader never sees a half-written file: the name appears with all its bytes at once."""
    target = str(tmp_path / "big.bin")
    data = torch.randint(0, 255, (4 << 20,), dtype=torch.uint8).numpy().tobytes()
    with atomic_write(target) as handle:
        handle.write(data[: len(data) // 2])
        assert not os.path.exists(target)
        handle.write(data[len(data) // 2 :])
    assert open(target, "rb").read() == data

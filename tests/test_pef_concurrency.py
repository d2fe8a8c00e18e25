"""Two compiles of one app into one output folder at once: both succeed, the PEF left is whole."""

from __future__ import annotations

import os
import subprocess
import sys

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
model, inputs, optim = build()
samba.session.compile(model, inputs, optim, name="ffn", config_dict=vars(args))
"""


@pytest.fixture(scope="module")
def expected_losses():
    model, inputs, optim = build()
    outs = utils.trace_graph(model, inputs, optim)
    return [float(samba.session.run(inputs, outs)[0]) for _ in range(2)]


@pytest.mark.slow
def test_two_compiles_into_one_folder_both_succeed(tmp_path, expected_losses):
    app = tmp_path / "app.py"
    app.write_text(APP.format(tests=os.path.dirname(__file__)))
    out = tmp_path / "out"
    command = [sys.executable, str(app), "compile", "--backend", "reference", "--output-folder", str(out)]
    command += ["--pef-name", "ffn"]
    env = dict(os.environ, SAMBAFLOW_BACKEND="reference")
    for round_ in range(5):
        runs = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for _ in "ab"
        ]
        outputs = [run.communicate(timeout=120)[0].decode() for run in runs]
        for run, text in zip(runs, outputs):
            assert run.returncode == 0, f"round {round_}: a compile failed:\n{text[-2000:]}"
            assert "wrote " in text
        assert sorted(os.listdir(out / "ffn")) == ["ffn.compile.log", "ffn.pef"], "temporary files left"
        assert (out / "ffn" / "ffn.compile.log").read_text().rstrip().splitlines()[-1].startswith("run-time")
        model, inputs, optim = build()
        outs = utils.trace_graph(model, inputs, optim, pef=str(out / "ffn" / "ffn.pef"))
        got = [float(samba.session.run(inputs, outs)[0]) for _ in range(2)]
        assert got == pytest.approx(expected_losses, rel=1e-6)
        samba.session.reset()


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

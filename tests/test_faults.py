"""Faults injected from outside (issue 19): a full disk (a 1 MiB tmpfs), a read-only folder (a
read-only bind mount: tests run as root, for whom chmod alone changes nothing), kill -9 in the
middle of a checkpoint save, Ctrl-C, and damaged checkpoints. Each must leave the previous file
whole and end in one `error:` line naming the file, exit status 2, no traceback. Mounting needs
root and a kernel that allows it; those tests skip cleanly elsewhere."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sambaflow import samba
from sambaflow.errors import SambaIOError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FFN_APP = os.path.join(ROOT, "examples", "ffn_app.py")
SMALL = ["-b", "16", "--hidden-size", "16"]


# ---------------------------------------------------------------------------- mounts


@contextlib.contextmanager
def mounted(*argv: str):
    """`mount *argv` for the block, or skip the test where mounting is not permitted."""
    done = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip() or done.returncode})")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", argv[-1]], capture_output=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs with two pages (8 KiB) left."""
    folder = tmp_path / "small"
    folder.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)):
        free = os.statvfs(folder)
        (folder / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 8192))
        yield folder


@pytest.fixture
def read_only(tmp_path):
    """A folder holding `old.pt`, bind-mounted read-only over itself."""
    folder = tmp_path / "ro"
    folder.mkdir()
    samba.save({"step": 1}, folder / "old.pt")
    with mounted("--bind", "-o", "ro", str(folder), str(folder)):
        if os.access(folder, os.W_OK):  # some kernels ignore ro on the first bind
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
        if os.access(folder, os.W_OK):
            pytest.skip("the bind mount stayed writable")
        yield folder


# ---------------------------------------------------------------------------- the checkpoint helper


def test_save_and_load_round_trip_in_torch_format(tmp_path):
    path = tmp_path / "sub" / "ck.pt"  # a missing folder is made
    samba.save({"w": torch.arange(3.0), "step": 7}, path)
    assert torch.load(path)["step"] == 7  # torch's own format
    assert samba.load(path)["w"].tolist() == [0.0, 1.0, 2.0]
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]  # no temporary file left


def test_full_disk_keeps_the_old_checkpoint_and_names_the_file(full_disk):
    path = full_disk / "ck.pt"
    samba.save({"step": 1}, path)
    with pytest.raises(SambaIOError, match=r"could not write the checkpoint '.*ck\.pt': the disk .* is full"):
        samba.save({"big": torch.zeros(100_000)}, path)
    assert samba.load(path) == {"step": 1}
    assert sorted(p.name for p in full_disk.iterdir()) == ["ck.pt", "filler"]


def test_read_only_folder_is_refused_before_writing(read_only):
    with pytest.raises(SambaIOError, match=r"'.*new\.pt'.*read-only file system"):
        samba.check_output_path(read_only / "new.pt", "--save-checkpoint")
    with pytest.raises(SambaIOError, match="read-only"):
        samba.save({"step": 2}, read_only / "old.pt")
    assert samba.load(read_only / "old.pt") == {"step": 1}


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    """kill -9 once the new checkpoint's temporary file is being written."""
    path = tmp_path / "ck.pt"
    samba.save({"step": 1}, path)
    script = textwrap.dedent(f"""
        import torch
        from sambaflow import samba
        while True:
            samba.save({{"step": 2, "big": torch.randn(20_000_000)}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".ck.pt.") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert samba.load(path)["step"] in (1, 2)  # whole: the old one, or a new one renamed whole
    assert torch.load(path)["step"] in (1, 2)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"PK\x03\x04 truncated", "is damaged or not a checkpoint"),
        (bytes(range(256)) * 8, "is damaged or not a checkpoint"),
    ],
)
def test_bad_checkpoints_name_the_file(tmp_path, content, message):
    path = tmp_path / "ck.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SambaIOError, match=f"checkpoint '.*ck.pt' {message}"):
        samba.load(path)


def test_checkpoint_of_another_model_lists_the_shapes(tmp_path):
    samba.save({"model": torch.nn.Linear(4, 3).state_dict()}, tmp_path / "ck.pt")
    with pytest.raises(
        SambaIOError, match=r"saved from another model: weight has shape \[3, 4\], the model \[5, 4\]"
    ):
        samba.load(tmp_path / "ck.pt", torch.nn.Linear(4, 5))


# ---------------------------------------------------------------------------- the example app


def start(*argv: str, cwd, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, FFN_APP, *argv],
        cwd=cwd,
        env=dict(os.environ, SAMBAFLOW_BACKEND="reference", PYTHONUNBUFFERED="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def one_error_line(proc: subprocess.Popen, *expected: str) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    for text in expected:
        assert text in err, err
    assert "Epoch" not in out  # refused before training
    return err


@pytest.fixture(scope="module")
def ffn_pef(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ffn")
    proc = start("compile", *SMALL, "-p", str(folder / "ffn.pef"), cwd=folder)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return folder / "ffn.pef"


def test_ffn_app_bad_paths_and_checkpoints_end_in_one_line(ffn_pef, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint" * 100)
    samba.save({"model": torch.nn.Linear(2, 2).state_dict()}, tmp_path / "other.pt")
    run = ["run", *SMALL, "-e", "1", "-p", str(ffn_pef)]
    cases = {  # started together: each is a fresh Python that imports torch
        "folder": start(*run, "--save-checkpoint", str(tmp_path), cwd=tmp_path),
        "no folder": start(*run, "--log-losses", "/dev/null/losses.json", cwd=tmp_path),
        "missing": start(*run, "--load-checkpoint", "missing.pt", cwd=tmp_path),
        "garbage": start(*run, "--load-checkpoint", "garbage.pt", cwd=tmp_path),
        "other model": start(*run, "--load-checkpoint", "other.pt", cwd=tmp_path),
        "compile -p folder": start("compile", *SMALL, "-p", str(tmp_path), cwd=tmp_path),
        "huge batch": start("compile", "-b", "50000000", "-p", "x.pef", cwd=tmp_path),
        # the inputs fit in 10 MiB; the step's gradients and updated weights (2048 wide) do not
        "huge step": start(
            "run", "-b", "16", "--hidden-size", "2048", cwd=tmp_path, SAMBAFLOW_MEMORY_LIMIT="10M"
        ),
    }
    one_error_line(cases["folder"], f"--save-checkpoint '{tmp_path}': that is a folder")
    one_error_line(cases["no folder"], "'/dev/null/losses.json': a part of that path is a file")
    one_error_line(cases["missing"], "checkpoint 'missing.pt' does not exist")
    one_error_line(cases["garbage"], "checkpoint 'garbage.pt' is damaged")
    one_error_line(cases["other model"], "checkpoint 'other.pt' was saved from another model")
    one_error_line(cases["compile -p folder"], f"the PEF '{tmp_path}': that is a folder")
    one_error_line(
        cases["huge batch"], "tensor 'image' of shape [50000000, 784] float32 needs 146.0 GiB", "-mb"
    )
    one_error_line(
        cases["huge step"], "MiB of computed tensors at their peak", "optimizer state", "-b", "-mb"
    )


def test_ffn_app_compile_into_a_read_only_folder_says_so_before_compiling(read_only):
    proc = start("compile", *SMALL, "--output-folder", str(read_only / "out"), cwd=read_only)
    err = one_error_line(proc, f"could not write the PEF '{read_only}/out/", "read-only file system")
    assert "choose a writable folder" in err


def test_ffn_app_compile_on_a_full_disk_names_the_pef(full_disk):
    proc = start(
        "compile", "-b", "16", "--hidden-size", "512", "-p", str(full_disk / "ffn.pef"), cwd=full_disk
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"error: could not write the PEF '{full_disk}/ffn.pef'")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no partial PEF or log


def test_ffn_app_ctrl_c_during_a_run_prints_one_line(ffn_pef, tmp_path):
    proc = start("run", *SMALL, "-e", "100000", "-p", str(ffn_pef), cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("Epoch"):
            break
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == 130 and err == "interrupted (Ctrl-C)\n", err[-2000:]


@pytest.mark.slow
def test_ctrl_c_during_a_parallel_compile_leaves_no_worker_or_folder(tmp_path):
    """Ctrl-C as a terminal sends it (to the app's process group) while a worker compiles."""
    from sambaflow.backends.inductor.probe import available

    if not available()[0]:
        pytest.skip(f"inductor unavailable: {available()[1]}")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(SAMBAFLOW_BACKEND="inductor", SAMBAFLOW_COMPILE_JOBS="2", TMPDIR=str(scratch))
    argv = [sys.executable, FFN_APP, "compile", *SMALL, "-p", str(tmp_path / "ffn.pef")]
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONUNBUFFERED="1", **env), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(scratch.glob("sambaflow-aoti-*"))) < 2:  # this process and the worker compile
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 3.0
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted (Ctrl-C)", err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    left = sorted(p.name for p in scratch.iterdir() if p.name.startswith(("sambaflow-", "cc")))
    assert left == [], left
    still = subprocess.run(
        ["pgrep", "-f", "sambaflow.backends.inductor.worker"], capture_output=True, text=True
    )
    alive = [pid for pid in still.stdout.split() if str(scratch) in _environ(int(pid))]
    assert alive == []


def _environ(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return ""

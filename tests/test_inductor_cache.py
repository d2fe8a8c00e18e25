"""The inductor compile cache and package loading, as an attacker or a long-running process sees them.

One tiny program is compiled once (module fixture, ~10 s); the poisoned-entry and refused-folder
tests compile it once more each, because that is what they check. Loading runs in subprocesses
with their own TMPDIR, so what they leave behind can be counted.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sambaflow.__main__ import main
from sambaflow.backends.inductor import InductorBackend, available
from sambaflow.backends.inductor.scratch import remove_stale_folders
from sambaflow.errors import SambaBackendError
from sambaflow.passes.sections import SectionProgram

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available()[0], reason=f"inductor unavailable: {available()[1]}"),
]


def _tiny(x, y):
    return (torch.mm(x, y) * 2.0 + 1.0,)


def tiny_program() -> SectionProgram:
    module = make_fx(_tiny, tracing_mode="fake")(torch.randn(8, 4), torch.randn(4, 8))
    return SectionProgram("tiny", module, ["x", "y"], ["out"])


def tiny_args(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=gen), torch.randn(4, 8, generator=gen)]


def assert_runs_tiny(run) -> None:
    args = tiny_args(3)
    (out,) = run(args)
    torch.testing.assert_close(out, args[0] @ args[1] * 2.0 + 1.0, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def program() -> SectionProgram:
    return tiny_program()


@pytest.fixture(scope="module")
def cached(tmp_path_factory, program):
    """(backend, package bytes) after one compile into a fresh cache."""
    backend = InductorBackend(cache_dir=tmp_path_factory.mktemp("cache") / "inductor")
    blob = backend.export(program)
    assert backend.last_report.cache == "miss", backend.last_report.as_text()
    return backend, blob


def copy_cache(backend: InductorBackend, tmp_path: Path) -> Path:
    """A private copy of the fixture's cache folder, as `<root>/inductor`; returns the root."""
    shutil.copytree(backend.cache.root, tmp_path / "root" / "inductor")
    return tmp_path / "root"


def with_members(blob: bytes, extra: dict[str, bytes]) -> bytes:
    """The package with members added (a planted library, a name that escapes the folder)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        for name, data in extra.items():
            target.writestr(name, data)
    return out.getvalue()


def package_prefix(blob: bytes) -> str:
    return zipfile.ZipFile(io.BytesIO(blob)).namelist()[0].split("/")[0]


# --- entries and the folder ---------------------------------------------------------------------
def test_entries_are_private_and_record_the_package_hash(cached):
    import hashlib

    backend, blob = cached
    root = backend.cache.root
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    [note_path] = root.glob("*.json")
    [package] = root.glob("*.pt2")
    assert {stat.S_IMODE(p.stat().st_mode) for p in (note_path, package)} == {0o600}
    note = json.loads(note_path.read_text())
    assert note["sha256"] == hashlib.sha256(package.read_bytes()).hexdigest()
    assert package.read_bytes() == blob
    assert not list(root.glob("*.tmp")) and not list(root.glob(".*.tmp"))


def test_a_poisoned_entry_is_a_miss_and_is_recompiled(cached, program, tmp_path):
    backend = InductorBackend(cache_dir=copy_cache(cached[0], tmp_path) / "inductor")
    [package] = backend.cache.root.glob("*.pt2")
    prefix = package_prefix(cached[1])
    planted = with_members(package.read_bytes(), {f"{prefix}/data/aotinductor/model/planted.so": b"\x7fELF"})
    package.write_bytes(planted)  # a valid package, its note untouched
    blob = backend.export(program)
    report = backend.last_report
    assert report.cache == "miss" and "SHA-256" in report.reason, report.as_text()
    assert blob != planted and "planted.so" not in zipfile.ZipFile(io.BytesIO(blob)).namelist()
    assert package.read_bytes() == blob  # the entry was rewritten from the fresh compile
    assert_runs_tiny(backend.load(program, blob))
    backend.export(program)
    assert backend.last_report.cache == "hit"


@pytest.mark.parametrize("damage", ["note deleted", "note garbled", "note without hash"])
def test_an_entry_without_a_good_note_is_a_miss(cached, tmp_path, damage):
    backend, _ = cached
    cache = InductorBackend(cache_dir=copy_cache(backend, tmp_path) / "inductor").cache
    [note_path] = cache.root.glob("*.json")
    note = json.loads(note_path.read_text())
    if damage == "note deleted":
        note_path.unlink()
    elif damage == "note garbled":
        note_path.write_text("{not json")
    else:
        note_path.write_text(json.dumps({k: v for k, v in note.items() if k != "sha256"}))
    blob, reason = cache.get(note_path.stem, "tiny", note["parts"])
    assert blob is None and "not used" in reason and "note" in reason, reason


@pytest.mark.parametrize("who", ["group", "others"])
def test_a_cache_folder_others_can_write_is_refused_and_compile_still_works(program, tmp_path, who):
    folder = tmp_path / "inductor"
    folder.mkdir()
    folder.chmod(0o770 if who == "group" else 0o707)
    backend = InductorBackend(cache_dir=folder)
    if who == "others":  # the message alone; compiling is shown once, for group
        reason = backend.cache.refused()
        assert "writable by group or others" in reason and f"chmod 700 {folder}" in reason, reason
        return
    blob = backend.export(program)
    report = backend.last_report
    assert report.cache == "off", report.as_text()
    assert "refused" in report.reason and f"chmod 700 {folder}" in report.reason
    assert "SAMBAFLOW_CACHE_DIR" in report.reason and "compiling without the cache" in report.reason
    assert list(folder.iterdir()) == []  # nothing written there
    assert_runs_tiny(backend.load(program, blob))


def test_a_parent_others_can_write_is_refused_unless_sticky(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o777)
    cache = InductorBackend(cache_dir=parent / "inductor").cache
    reason = cache.refused()
    assert reason and f"its parent {parent} is writable by group or others" in reason, reason
    parent.chmod(0o1777)  # like /tmp: others cannot rename our folder away
    assert cache.refused() is None


def test_a_folder_made_by_us_is_0700_with_its_parents(tmp_path):
    cache = InductorBackend(cache_dir=tmp_path / "a" / "b" / "inductor").cache
    assert cache.refused() is None
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a", tmp_path / "a" / "b", cache.root)} == {
        0o700
    }


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a folder to another user")
def test_a_cache_folder_owned_by_another_user_is_refused(tmp_path):
    folder = tmp_path / "inductor"
    folder.mkdir(mode=0o700)
    os.chown(folder, 4242, 4242)
    reason = InductorBackend(cache_dir=folder).cache.refused()
    assert reason and "owned by user id 4242" in reason and "SAMBAFLOW_CACHE_DIR" in reason, reason


# --- package member names -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["../escaped", "{prefix}/../../escaped", ".../../../tmp/escaped", "/tmp/escaped", "a\\..\\escaped"],
)
def test_a_member_name_that_escapes_is_refused_before_loading(cached, program, tmp_path, name):
    blob = cached[1]
    name = name.format(prefix=package_prefix(blob))
    bad = with_members(blob, {name: b"planted"})
    with pytest.raises(SambaBackendError, match="member named .*escaped") as error:
        cached[0].load(program, bad)
    assert "outside its folder" in str(error.value)
    assert not Path("/tmp/escaped").exists()


def test_a_member_name_with_a_nul_is_refused(cached, program):
    bad = with_members(cached[1], {"tinyXnul": b"planted"}).replace(b"tinyXnul", b"tiny\x00nul")
    with pytest.raises(SambaBackendError, match=r"member named 'tiny\\x00nul'"):
        cached[0].load(program, bad)


def test_duplicate_members_are_refused(cached, program):
    blob = cached[1]
    first = zipfile.ZipFile(io.BytesIO(blob)).namelist()[0]
    with pytest.warns(UserWarning, match="Duplicate name"):
        bad = with_members(blob, {first: b"other"})
    with pytest.raises(SambaBackendError, match="two members named"):
        cached[0].load(program, bad)


# --- loading in a process: memory, folders --------------------------------------------------------
LOADS = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_inductor_cache import tiny_program, assert_runs_tiny
from sambaflow.backends.inductor import InductorBackend

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

program, backend = tiny_program(), InductorBackend(use_cache=False)
blob = open({blob!r}, "rb").read()
run = backend.load(program, blob)
assert_runs_tiny(run)
start = rss_mb()
for _ in range({loads}):
    run = backend.load(program, bytes(bytearray(blob)))  # the same PEF read again: new bytes object
    assert_runs_tiny(run)
print("GROWTH-MB", rss_mb() - start)
print("PID", os.getpid(), flush=True)
if {kill}:
    os.kill(os.getpid(), 9)
"""


def run_loads(blob_path: Path, tmpdir: Path, loads: int, kill: bool = False) -> subprocess.CompletedProcess:
    script = LOADS.format(tests=str(Path(__file__).parent), blob=str(blob_path), loads=loads, kill=kill)
    env = dict(os.environ, TMPDIR=str(tmpdir))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def after_loads(cached, tmp_path_factory):
    """A process killed after one load, then one that loads 100 times and exits, in one TMPDIR."""
    tmpdir = tmp_path_factory.mktemp("tmpdir")
    blob_path = tmpdir.parent / "tiny.pt2"
    blob_path.write_bytes(cached[1])
    killed = run_loads(blob_path, tmpdir, loads=0, kill=True)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    left_by_killed = sorted(p.name for p in tmpdir.iterdir())
    done = run_loads(blob_path, tmpdir, loads=100)
    assert done.returncode == 0, done.stdout + done.stderr
    return killed, left_by_killed, done, tmpdir


def test_rss_grows_less_than_20_mb_over_100_reloads(after_loads):
    growth = float(after_loads[2].stdout.split("GROWTH-MB")[1].split()[0])
    assert growth < 20, f"RSS grew by {growth:.1f} MB over 100 loads of one package"


def test_a_killed_process_leaves_only_its_private_folder(after_loads):
    killed, left, _, _ = after_loads
    pid = killed.stdout.split("PID")[1].split()[0]
    assert len(left) == 1 and left[0].startswith(f"sambaflow-{pid}-"), left


def test_a_normal_exit_leaves_no_folder_and_stale_ones_are_gone(after_loads):
    tmpdir = after_loads[3]
    assert sorted(p.name for p in tmpdir.iterdir()) == []  # no aotinductor_*, no sambaflow-*


def test_stale_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"sambaflow-{dead_pid}-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "lib.so").write_bytes(b"x")
    alive = tmp_path / f"sambaflow-{os.getpid()}-def456"
    alive.mkdir()
    other = tmp_path / f"sambaflow-{dead_pid}.pt2"  # not one of our folders
    other.write_bytes(b"x")
    assert remove_stale_folders(tmp_path) == [stale]
    assert not stale.exists() and alive.exists() and other.exists()


# --- python -m sambaflow cache --------------------------------------------------------------------
def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["cache", *args])
    return code, capsys.readouterr().out


def test_cache_list_shows_the_entry(cached, tmp_path, capsys, monkeypatch):
    root = copy_cache(cached[0], tmp_path)
    monkeypatch.setenv("SAMBAFLOW_CACHE_DIR", str(root))
    code, out = cli(capsys, "list")
    assert code == 0
    assert f"compile cache {root / 'inductor'}: 1 entry, " in out
    line = next(line for line in out.splitlines() if "tiny" in line)
    assert torch.__version__ in line and "cpu-" in line and " MB" in line and " s " in line, out


def test_cache_verify_finds_a_bad_entry_and_fix_removes_it(cached, tmp_path, capsys):
    root = copy_cache(cached[0], tmp_path)
    code, out = cli(capsys, "verify", "--dir", str(root))
    assert code == 0 and "1 good, 0 bad" in out, out
    [package] = (root / "inductor").glob("*.pt2")
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    code, out = cli(capsys, "verify", "--dir", str(root))
    assert code == 1 and "BAD" in out and "SHA-256" in out and "0 good, 1 bad" in out, out
    code, out = cli(capsys, "verify", "--fix", "--dir", str(root))
    assert code == 0 and "removed" in out
    assert list((root / "inductor").iterdir()) == []


def test_cache_prune_by_age_size_bad_and_all(cached, tmp_path, capsys):
    root = copy_cache(cached[0], tmp_path)
    folder = root / "inductor"
    code, out = cli(capsys, "prune", "--older-than", "1", "--dir", str(root))
    assert code == 0 and "pruned 0 of 1" in out, out
    code, out = cli(capsys, "prune", "--bad", "--dir", str(root))
    assert "pruned 0 of 1" in out, out
    code, out = cli(capsys, "prune", "--max-size", "1000", "--dir", str(root))
    assert "pruned 0 of 1" in out, out
    [note_path] = folder.glob("*.json")
    note = json.loads(note_path.read_text())
    note_path.write_text(json.dumps(note | {"created": note["created"] - 3 * 86400}))
    code, out = cli(capsys, "prune", "--older-than", "2", "--dir", str(root))
    assert code == 0 and "older than 2 days" in out and "pruned 1 of 1" in out, out
    assert list(folder.iterdir()) == []
    for option in (["--max-size", "0"], ["--all"]):
        shutil.rmtree(root)
        copy_cache(cached[0], tmp_path)
        code, out = cli(capsys, "prune", *option, "--dir", str(root))
        assert code == 0 and "pruned 1 of 1" in out and list(folder.iterdir()) == [], out


def test_cache_prune_needs_an_option(tmp_path, capsys):
    assert main(["cache", "prune", "--dir", str(tmp_path)]) == 2
    assert "say what to prune" in capsys.readouterr().err


def test_cache_list_and_verify_flag_a_folder_others_can_write(tmp_path, capsys):
    folder = tmp_path / "inductor"
    folder.mkdir()
    folder.chmod(0o777)
    code, out = cli(capsys, "list", "--dir", str(tmp_path))
    assert code == 0 and "warning:" in out and f"chmod 700 {folder}" in out, out
    code, out = cli(capsys, "verify", "--dir", str(tmp_path))
    assert code == 1 and "BAD folder" in out, out

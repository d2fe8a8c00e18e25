"""What a PEF may make the loader do: only data in graphs, signatures checked before any binary."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch
from test_pef import build, edit_graph, forge

from sambaflow import samba
from sambaflow.__main__ import main as cli_main
from sambaflow.errors import SambaArgumentError, SambaPefError
from sambaflow.pef.decode import decode_graph, resolve_target
from sambaflow.pef.file import PefFile
from sambaflow.pef.sign import load_key, user_key, user_key_path
from sambaflow.samba import utils


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("trust")


def write_key(path, data=None, mode=0o600):
    path.write_text(data if data is not None else os.urandom(32).hex() + "\n")
    os.chmod(path, mode)
    return str(path)


@pytest.fixture(scope="module")
def key_file(folder):
    return write_key(folder / "pef.key")


@pytest.fixture(scope="module")
def own_pef(folder):
    """Compiled with no key configured: signed with the user's own key (conftest's config folder)."""
    model, inputs, optim = build()
    return samba.session.compile(model, inputs, optim, name="ffn", config_dict={"output_folder": str(folder)})


@pytest.fixture(scope="module")
def unsigned_pef(own_pef, folder):
    return forge(own_pef, folder / "unsigned.pef")


@pytest.fixture(scope="module")
def signed_pef(folder, key_file):
    model, inputs, optim = build()
    config = {"output_folder": str(folder), "pef_name": "signed", "sign_key": key_file}
    return samba.session.compile(model, inputs, optim, name="ffn", config_dict=config)


@pytest.fixture(scope="module")
def inductor_pef(folder, key_file):
    """One signed inductor PEF (forward only: one AOT compile), shared by the native-code tests."""
    from sambaflow.backends.inductor import InductorBackend

    ok, why = InductorBackend.available()
    if not ok:
        pytest.skip(f"inductor cannot compile here: {why}")
    model, inputs, _ = build()
    config = {"output_folder": str(folder), "pef_name": "native", "sign_key": key_file}
    return samba.session.compile(
        model, inputs, None, name="ffn", inference=True, backend="inductor", config_dict=config
    )


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "code from the PEF ran"


def payload(marker):
    return f"x=__import__('pathlib').Path({str(marker)!r}).touch()"


def step_graph(pef):
    with zipfile.ZipFile(pef) as archive:
        return json.loads(archive.read("graphs/train/step.json"))


def first(graph, op):
    return next(n for n in graph["nodes"] if n["op"] == op)


def last(graph, op):
    """The last placeholder: its target becomes the last parameter, where `x=<code>` is valid
    Python that runs when fx builds the module."""
    return [n for n in graph["nodes"] if n["op"] == op][-1]


# --- the codec accepts only data -----------------------------------------------------------------
def test_codec_decodes_the_genuine_graph(unsigned_pef):
    module = decode_graph(step_graph(unsigned_pef))
    assert sum(1 for n in module.graph.nodes if n.op == "placeholder") == len(
        step_graph(unsigned_pef)["inputs"]
    )


@pytest.mark.parametrize(
    "inject, message",
    [
        (lambda g, p: last(g, "placeholder").update(target=p), "placeholder target .* is not a plain"),
        (lambda g, p: first(g, "placeholder").update(target="__class__"), "placeholder target .* reserved"),
        (lambda g, p: first(g, "call_function").update(name=p), "node name .* is not a plain"),
        (lambda g, p: first(g, "call_function").update(name="print"), "node name 'print' is a reserved"),
        (lambda g, p: first(g, "call_function")["kwargs"]["dict"].update({p: 1}), "keyword argument"),
        (
            lambda g, p: g["nodes"].insert(0, {"name": "c", "op": "get_attr", "target": 'a");' + p + "#"}),
            "constant target",
        ),
        (
            lambda g, p: g["constants"].update({p: {"dtype": "float32", "shape": [], "data": ""}}),
            "constant name",
        ),
        (
            lambda g, p: first(g, "call_function").update(target="aten.__class__.__setattr__"),
            "not an ATen op",
        ),
        (lambda g, p: first(g, "call_function").update(target="builtins.exec"), "not an ATen op"),
        (lambda g, p: first(g, "call_function").update(args={"tuple": [{"node": "nowhere"}]}), "'nowhere'"),
        (lambda g, p: g["nodes"].insert(1, dict(first(g, "placeholder"))), "used twice"),
    ],
    ids=[
        "placeholder-code",
        "placeholder-dunder",
        "node-name-code",
        "node-name-builtin",
        "kwarg-name-code",
        "get_attr-quote",
        "constant-name",
        "class-setattr",
        "exec",
        "unknown-node",
        "duplicate-name",
    ],
)
def test_codec_refuses_code_in_a_graph(unsigned_pef, marker, inject, message):
    graph = step_graph(unsigned_pef)
    inject(graph, payload(marker))
    with pytest.raises(SambaPefError, match=message) as info:
        decode_graph(graph, "member 'graphs/train/step.json'")
    assert "graphs/train/step.json" in str(info.value) and "recompile" in str(info.value)


def test_injected_placeholder_in_a_pef_never_runs(unsigned_pef, tmp_path, marker):
    """Finding 1: the file's checksums are all consistent; loading still refuses before fx runs code."""
    change = edit_graph(
        "graphs/train/step.json", lambda g: last(g, "placeholder").update(target=payload(marker))
    )
    path = forge(unsigned_pef, tmp_path / "injected.pef", change)
    model, inputs, optim = build()
    with pytest.raises(SambaPefError, match="placeholder target"):
        utils.trace_graph(model, inputs, optim, pef=path)
    assert samba.session.executable is None


def test_resolve_target_returns_only_op_overloads():
    assert resolve_target("aten._softmax.default") is torch.ops.aten._softmax.default
    assert isinstance(resolve_target("prims.add.default"), torch._ops.OpOverload)
    for name in (
        "aten.__class__.__setattr__",
        "aten.add.__call__",
        "aten.add",
        "os.system",
        "aten.add.Tensor.x",
    ):
        with pytest.raises(SambaPefError, match="not an ATen op"):
            resolve_target(name)
    with pytest.raises(SambaPefError, match="does not exist in torch"):
        resolve_target("aten.no_such_op.default")


# --- signing ---------------------------------------------------------------------------------------
def test_signed_pef_loads_with_its_key_and_runs(signed_pef, key_file):
    with zipfile.ZipFile(signed_pef) as archive:
        assert "signature.json" in archive.namelist()
    model, inputs, optim = build()
    outs = utils.trace_graph(model, inputs, optim, pef=signed_pef, sign_key=key_file)
    assert torch.isfinite(samba.session.run(inputs, outs)[0]).all()


def test_unsigned_pef_under_a_configured_key_is_refused(unsigned_pef, key_file, monkeypatch):
    monkeypatch.setenv("SAMBAFLOW_SIGN_KEY", key_file)
    model, inputs, optim = build()
    with pytest.raises(SambaPefError, match="is not signed, and a signing key is configured"):
        utils.trace_graph(model, inputs, optim, pef=unsigned_pef)
    assert samba.session.executable is None


def test_pef_signed_with_another_key_is_refused(signed_pef, tmp_path):
    other = write_key(tmp_path / "other.key")
    with pytest.raises(SambaPefError, match="signed with another key"):
        PefFile(signed_pef, load_key(other))


def test_edited_signed_pef_is_refused(signed_pef, key_file, tmp_path):
    """Checksums recomputed after the edit (the signature cannot be): refused, naming the signature."""
    swap = edit_graph("graphs/train/opt.json", lambda g: g["inputs"].reverse())
    path = forge(signed_pef, tmp_path / "edited.pef", swap)
    with zipfile.ZipFile(path, "a") as archive, zipfile.ZipFile(signed_pef) as genuine:
        archive.writestr("signature.json", genuine.read("signature.json"))
    with pytest.raises(SambaPefError, match="signature does not match"):
        PefFile(path, load_key(key_file))


@pytest.mark.parametrize(
    "data, mode, message",
    [
        (None, 0o644, r"accessible by group or others \(mode 0644\): run `chmod 600 "),
        (None, 0o640, r"mode 0640\): run `chmod 600 "),
        ("abcdef" * 4, 0o600, "too short"),
        ("short raw key", 0o600, "too short"),
    ],
)
def test_bad_key_files_are_refused(tmp_path, data, mode, message):
    path = write_key(tmp_path / "bad.key", data, mode)
    with pytest.raises(SambaArgumentError, match=message):
        load_key(path)


def test_key_files_raw_or_hex(tmp_path):
    raw = tmp_path / "raw.key"
    raw.write_bytes(b"\x00\x01 not hex at all, 32+ bytes long ....")
    os.chmod(raw, 0o600)
    assert load_key(str(raw)).secret.startswith(b"\x00\x01")
    hexed = write_key(tmp_path / "hex.key", "ab" * 32 + "\n")
    assert load_key(hexed).secret == bytes([0xAB]) * 32
    with pytest.raises(SambaArgumentError, match="cannot be read"):
        load_key(str(tmp_path / "missing.key"))


def test_compile_refuses_a_bad_key_before_compiling(tmp_path):
    model, inputs, optim = build()
    loose = write_key(tmp_path / "loose.key", mode=0o644)
    config = {"output_folder": str(tmp_path), "sign_key": loose}
    with pytest.raises(SambaArgumentError, match="chmod 600"):
        samba.session.compile(model, inputs, optim, name="ffn", config_dict=config)
    assert not (tmp_path / "ffn").exists()


def test_sign_key_is_a_standard_argument(monkeypatch):
    from sambaflow.samba.utils.argparser import parse_app_args

    monkeypatch.setattr("sambaflow.app.args._last_parsed", None)  # restored after the test
    for command in ("compile", "run"):
        assert parse_app_args([command, "--sign-key", "k.key"]).sign_key == "k.key"


# --- your own key (Jupyter's notebook trust) -----------------------------------------------------
def test_compile_signs_with_the_users_own_key_made_on_first_use(own_pef, capsys):
    path = user_key_path()
    assert path.startswith(os.environ["XDG_CONFIG_HOME"])  # conftest: never the real ~/.config
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    pef = PefFile(own_pef, None, user_key())
    assert pef.own and pef.signature_fields["key_id"] == user_key().key_id
    assert cli_main(["inspect", own_pef]) == 0
    assert f"trust: signed with your own key ({path}, key id {user_key().key_id}), signature verified" in (
        capsys.readouterr().out
    )


def test_a_second_key_maker_keeps_the_first_key(tmp_path, monkeypatch):
    """Two first compiles at once: the key linked first stays, and both sign with it."""
    from sambaflow.pef.sign import _create_key

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    _create_key(user_key_path())
    first = user_key().secret
    _create_key(user_key_path())
    assert user_key().secret == first and os.listdir(tmp_path / "sambaflow") == ["pef.key"]


@pytest.fixture
def own_native_pef(inductor_pef, tmp_path):
    """The native PEF as this user's compile writes it: signed with their own key."""
    return forge(inductor_pef, tmp_path / "own.pef", key=user_key(create=True))


def load_native(path):
    model, inputs, _ = build()
    utils.trace_graph(model, inputs, None, pef=path)
    return samba.session.run(inputs, model.output_tensors)[0]


def test_own_native_pef_loads_silently_and_warns_under_another_home(
    own_native_pef, tmp_path, capsys, monkeypatch
):
    load_native(own_native_pef)
    assert "native code" not in capsys.readouterr().out
    # The same file for another user: no key of theirs yet, then a key of their own.
    other = tmp_path / "other-home"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(other))
    for step in ("no key yet", "their own key"):
        samba.session.reset()
        copy = tmp_path / f"copy-{step.replace(' ', '-')}.pef"
        copy.write_bytes(open(own_native_pef, "rb").read())
        load_native(str(copy))
        out = capsys.readouterr().out
        assert "is signed with another user's or machine's key and holds native code" in out, (step, out)
        user_key(create=True)
    assert user_key_path() == str(other / ".config" / "sambaflow" / "pef.key")
    assert cli_main(["inspect", own_native_pef]) == 0
    assert "signed with another key (key id" in capsys.readouterr().out


def test_own_pef_with_a_flipped_byte_is_refused_with_no_key_configured(own_native_pef, tmp_path):
    with zipfile.ZipFile(own_native_pef) as archive:
        binary = next(n for n in archive.namelist() if n.endswith(".bin"))
        signature = archive.read("signature.json")

    def flip(members, manifest):
        data = bytearray(members[binary])
        data[len(data) // 2] ^= 0x01
        members[binary] = bytes(data)

    forged = forge(own_native_pef, tmp_path / "forged.pef", flip)
    with zipfile.ZipFile(forged, "a") as archive:
        archive.writestr("signature.json", signature)  # the user's genuine signature kept
    model, inputs, _ = build()
    with pytest.raises(SambaPefError, match="signature does not match"):
        utils.trace_graph(model, inputs, None, pef=forged)
    assert samba.session.executable is None


# --- native code ---------------------------------------------------------------------------------
def test_signed_native_pef_with_one_flipped_byte_is_refused_before_any_binary(
    inductor_pef, key_file, tmp_path, monkeypatch
):
    handed_out = []
    real_binary = PefFile.binary
    monkeypatch.setattr(PefFile, "binary", lambda self, k, n: handed_out.append(n) or real_binary(self, k, n))
    model, inputs, _ = build()
    # The genuine file loads, runs, and hands its binaries to the backend (what the spy sees).
    outs = utils.trace_graph(model, inputs, None, pef=inductor_pef, sign_key=key_file)
    want = model(*[t.torch() for t in inputs])[0]
    assert handed_out and torch.allclose(samba.session.run(inputs, outs)[0], want, rtol=1e-4)
    samba.session.reset()
    handed_out.clear()
    with zipfile.ZipFile(inductor_pef) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(".bin"))
        signature = archive.read("signature.json")
    # A byte flipped in the file itself (the binary's stored bytes) ...
    data = bytearray(open(inductor_pef, "rb").read())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0x01
    damaged = tmp_path / "damaged.pef"
    damaged.write_bytes(bytes(data))

    def flip(members, manifest):
        binary = bytearray(members[info.filename])
        binary[len(binary) // 2] ^= 0x01
        members[info.filename] = bytes(binary)

    # ... and one flipped on purpose, every checksum recomputed, the genuine signature kept.
    forged = forge(inductor_pef, tmp_path / "forged.pef", flip)
    with zipfile.ZipFile(forged, "a") as archive:
        archive.writestr("signature.json", signature)
    for path, message in (
        (damaged, "cannot be read|fail their checksum"),
        (forged, "signature does not match"),
    ):
        model, inputs, _ = build()
        with pytest.raises(SambaPefError, match=message):
            utils.trace_graph(model, inputs, None, pef=str(path), sign_key=key_file)
        assert handed_out == [] and samba.session.executable is None


def test_unsigned_native_pef_is_announced_once(inductor_pef, tmp_path, capsys):
    path = forge(inductor_pef, tmp_path / "unsigned.pef")
    for _ in range(2):
        model, inputs, _ = build()
        utils.trace_graph(model, inputs, None, pef=path)
    out = capsys.readouterr().out
    assert out.count("is unsigned and holds native code") == 1
    assert "load only PEFs from sources you trust. PEFs you compile are signed" in out


def test_reference_pef_loads_without_a_native_code_warning(unsigned_pef, capsys):
    model, inputs, optim = build()
    utils.trace_graph(model, inputs, optim, pef=unsigned_pef)
    assert "native code" not in capsys.readouterr().out


def test_inspect_states_the_trust_model(inductor_pef, unsigned_pef, key_file, monkeypatch, capsys):
    assert cli_main(["inspect", inductor_pef]) == 0
    text = capsys.readouterr().out
    assert "trust: signed with another key (key id" in text and "not verified" in text
    assert "native code: yes: 1 inductor binaries" in text and "runs that code in your process" in text
    monkeypatch.setenv("SAMBAFLOW_SIGN_KEY", key_file)
    assert cli_main(["inspect", inductor_pef]) == 0
    assert f"signed with the given key {key_file} (key id" in capsys.readouterr().out
    assert cli_main(["inspect", unsigned_pef]) == 2
    assert "is not signed, and a signing key is configured" in capsys.readouterr().err

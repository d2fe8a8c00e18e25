"""PEF files: contents, loading in place of compiling, mismatches, damage, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
import torch

from sambaflow import samba
from sambaflow.__main__ import main as cli_main
from sambaflow.backends import counters
from sambaflow.errors import SambaPefError, SambaRunError
from sambaflow.samba import utils

from helpers import named_inputs, rel_err
from models import ResFFNLogReg

BATCH, FEATURES, HIDDEN, CLASSES = 8, 16, 12, 4


def build(hidden=HIDDEN, batch=BATCH, names=("x", "y"), dtype=torch.float32, optimizer="sgd"):
    torch.manual_seed(1)
    model = ResFFNLogReg(FEATURES, hidden, CLASSES)
    samba.from_torch_model_(model)
    inputs = [
        samba.randn(batch, FEATURES, name=names[0], batch_dim=0, dtype=dtype),
        samba.randint(CLASSES, (batch,), name=names[1], batch_dim=0),
    ]
    if optimizer == "sgd":
        optim = samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    else:
        optim = samba.optim.AdamW(model.parameters(), lr=1e-3)
    return model, inputs, optim


@pytest.fixture(scope="module")
def pef_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pef")
    model, inputs, optim = build()
    config = {"output_folder": str(folder), "pef_name": "ffn", "batch_size": BATCH, "n_chips": 2}
    return samba.session.compile(model, inputs, optim, name="ffn", config_dict=config)


@pytest.fixture(scope="module")
def inference_pef(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pef_inf")
    model, inputs, _ = build()
    return samba.session.compile(
        model, inputs, None, name="ffn", inference=True, config_dict={"output_folder": str(folder)}
    )


def read_manifest(path):
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("manifest.json")), archive.namelist()


def rewrite(path, target, edit_manifest=None, drop=None):
    """A copy of the PEF with its manifest edited (its own checksum recomputed) or a member dropped."""
    from sambaflow.pef.consistency import manifest_digest

    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    if edit_manifest:  # its signature (the user's own key, at compile) could not survive the edit
        members.pop("signature.json", None)
        manifest = json.loads(members["manifest.json"])
        edit_manifest(manifest)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            if name != drop:
                archive.writestr(name, data)
    return str(target)


def test_compile_writes_pef_and_log(pef_path):
    assert pef_path.endswith("ffn/ffn.pef")
    manifest, names = read_manifest(pef_path)
    assert manifest["format"] == "sambaflow-pef" and manifest["format_version"] == 3
    assert manifest["precision"] == "fp32"
    assert manifest["producer"]["torch"] == torch.__version__ and manifest["target"]["backend"] == "reference"
    assert manifest["compile_args"]["n_chips"] == 2
    train = manifest["graphs"]["train"]
    assert train["sections"] == ["fwd", "bckwd", "opt"]
    roles = {t["name"]: (t["role"], t["shape"], t["dtype"], t["batch_dim"]) for t in train["inputs"]}
    assert roles["x"] == ("input", [BATCH, FEATURES], "float32", 0)
    assert roles["gemm1__weight__momentum_buffer"][0] == "state" and roles["lr"][0] == "hyper"
    assert set(train["programs"]) == {"step", "fwd", "bckwd", "opt"} and "inference" in manifest["graphs"]
    assert (
        set(manifest["members"]) == set(names) - {"manifest.json", "signature.json"} and "graph.txt" in names
    )
    assert "signature.json" in names  # signed with the user's own key (conftest: a temporary one)
    assert all(n.endswith((".json", ".txt", ".bin")) for n in names)
    log = open(pef_path.replace(".pef", ".compile.log")).read()
    assert "NO EFFECT: --n-chips 2" in log and "run-time hyperparameters" in log


def test_run_from_pef_traces_once_compiles_nothing_and_matches_in_process(pef_path):
    model, inputs, optim = build()
    outs = utils.trace_graph(model, inputs, optim)
    expected = [float(samba.session.run(inputs, outs)[0]) for _ in range(3)]
    model, inputs, optim = build()
    traces, compiles = samba.session.trace_count, counters.compiles
    outs = utils.trace_graph(model, inputs, optim, pef=pef_path)
    got = [float(samba.session.run(inputs, outs)[0]) for _ in range(3)]
    assert samba.session.trace_count == traces + 1 and counters.compiles == compiles
    assert got == pytest.approx(expected, rel=1e-6)


def test_training_pef_runs_for_inference(pef_path):
    model, inputs, _ = build()
    outs = utils.trace_graph(model, inputs, None, pef=pef_path)
    loss, logits = samba.session.run(inputs, outs, section_types=["fwd"])
    want_loss, want_logits = model(*[t.torch() for t in inputs])
    assert rel_err(loss, want_loss) < 1e-6 and rel_err(logits, want_logits) < 1e-6


def test_inference_pef_refuses_to_train(inference_pef, capsys):
    model, inputs, optim = build()
    outs = utils.trace_graph(model, inputs, optim, pef=inference_pef)
    assert "forward-only" in capsys.readouterr().out
    samba.session.run(inputs, outs)  # the default is every compiled section: fwd
    with pytest.raises(SambaRunError, match="asks to train, but this graph is forward-only"):
        samba.session.run(inputs, outs, section_types=["fwd", "bckwd", "opt"])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"batch": 4},
            r"compiled with batch size 8, the app now traces 4 \(input 'x'\): recompile, or pass -b 8",
        ),
        (
            {"names": ("image", "y")},
            r"input tensors: the PEF has \['x'\] that the app lacks; the app has \['image'\]",
        ),
        (
            {"dtype": torch.float64},
            r"input tensors: 'x' is torch.float32 in the PEF, torch.float64 in the app",
        ),
        (
            {"hidden": 20},
            r"model parameters \(model structure\): 'gemm1__weight' has shape \[12, 16\] in the PEF",
        ),
        (
            {"optimizer": "adamw"},
            r"optimizer state \(optimizer type or settings\): the PEF has \['gemm1__bias__m",
        ),
    ],
)
def test_mismatch_is_explained(pef_path, change, message):
    model, inputs, optim = build(**change)
    with pytest.raises(SambaPefError, match=message):
        utils.trace_graph(model, inputs, optim, pef=pef_path)


def test_changed_forward_is_detected(pef_path):
    model, inputs, optim = build()
    model.tanh1 = torch.nn.ReLU()  # same parameters and shapes, different computation
    with pytest.raises(SambaPefError, match="computation differs"):
        utils.trace_graph(model, inputs, optim, pef=pef_path)


def damaged_variants(pef_path, tmp_path):
    data = open(pef_path, "rb").read()
    truncated = tmp_path / "truncated.pef"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    flipped_path = tmp_path / "flipped.pef"
    flipped_path.write_bytes(bytes(flipped))
    text = tmp_path / "text.pef"
    text.write_text("this is not a PEF")
    return {
        "truncated": (str(truncated), "damaged, truncated or not a zip file"),
        "flipped byte": (str(flipped_path), "damaged"),
        "missing member": (
            rewrite(pef_path, tmp_path / "missing.pef", drop="graphs/train/bckwd.json"),
            r"missing members \['graphs/train/bckwd.json'\]",
        ),
        "future version": (
            rewrite(pef_path, tmp_path / "future.pef", edit_manifest=lambda m: m.update(format_version=99)),
            "format version 99.*reads format versions up to 3",
        ),
        "older version": (
            rewrite(pef_path, tmp_path / "old.pef", edit_manifest=lambda m: m.update(format_version=1)),
            "older PEF format version 1",
        ),
        "not a zip": (str(text), "not a zip file"),
        "absent": (str(tmp_path / "nope.pef"), "does not exist"),
        "tampered graph": (
            rewrite(
                pef_path,
                tmp_path / "tampered.pef",
                edit_manifest=lambda m: m["members"]["graphs/train/step.json"].update(sha256="0" * 64),
            ),
            r"fail their checksum",
        ),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "flipped byte",
        "missing member",
        "future version",
        "older version",
        "not a zip",
        "absent",
        "tampered graph",
    ],
)
def test_damaged_pef_gets_a_clear_error(pef_path, tmp_path, kind):
    path, message = damaged_variants(pef_path, tmp_path)[kind]
    model, inputs, optim = build()
    with pytest.raises(SambaPefError, match=message):
        utils.trace_graph(model, inputs, optim, pef=path)
    assert samba.session.executable is None  # nothing half-loaded


def test_foreign_op_in_graph_is_refused(pef_path, tmp_path):
    with zipfile.ZipFile(pef_path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    graph = json.loads(members["graphs/train/step.json"])
    call = next(n for n in graph["nodes"] if n["op"] == "call_function")
    call["target"] = "os.system"
    members["graphs/train/step.json"] = json.dumps(graph).encode()
    del members["signature.json"]  # the editor has no key to sign with
    manifest = json.loads(members["manifest.json"])
    import hashlib

    from sambaflow.pef.consistency import manifest_digest

    manifest["members"]["graphs/train/step.json"] = {
        "sha256": hashlib.sha256(members["graphs/train/step.json"]).hexdigest(),
        "size": len(members["graphs/train/step.json"]),
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    target = tmp_path / "foreign.pef"
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    model, inputs, optim = build()
    with pytest.raises(SambaPefError, match="'os.system' is not an ATen op; refusing to load it"):
        utils.trace_graph(model, inputs, optim, pef=str(target))


def test_inspect_prints_the_manifest(pef_path, capsys):
    assert cli_main(["inspect", pef_path]) == 0
    text = capsys.readouterr().out
    for needle in (
        "format version 3",
        "precision: fp32 (float32 weights and compute)",
        "backend reference on cpu",
        "trust: signed with your own key (",
        "native code: none",
        "runs that code in your process",
        "graph 'train': sections fwd, bckwd, opt",
        "gemm1__weight",
        "param",
        "lr=0.1",
        "momentum=0.9",
        "program step",
    ):
        assert needle in text
    assert cli_main(["inspect", pef_path + ".missing"]) == 2


def test_checkpoint_resumes_training_exactly(tmp_path):
    batches = [[torch.randn(BATCH, FEATURES), torch.randint(CLASSES, (BATCH,))] for _ in range(6)]

    def steps(model, inputs, optim, chunk):
        outs = utils.trace_graph(model, inputs, optim)
        return [
            float(samba.session.run(named_inputs(["x", "y"], b), outs, hyperparam_dict={"lr": 0.05})[0])
            for b in chunk
        ]

    straight = steps(*build(), batches)
    model, inputs, optim = build()
    first = steps(model, inputs, optim, batches[:3])
    samba.session.to_cpu(model, optim)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optim.state_dict(), "completed_steps": 3}, path)
    code = f"import torch; c = torch.load({str(path)!r}); print(c['completed_steps'], sorted(c['model'])[0])"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.split() == ["3", "gemm1.bias"]
    model, inputs, optim = build()
    checkpoint = torch.load(path)
    model.load_state_dict(checkpoint["model"])
    optim.load_state_dict(checkpoint["optimizer"])
    resumed = first + steps(model, inputs, optim, batches[3:])
    assert resumed == pytest.approx(straight, rel=1e-6)
    assert optim.hyper["lr"] == pytest.approx(0.05)


def test_cuda_pef_without_a_gpu_is_refused(pef_path, tmp_path):
    def to_cuda(manifest):
        manifest["target"] = {"backend": "inductor", "device": "cuda"}

    path = rewrite(pef_path, tmp_path / "cuda.pef", edit_manifest=to_cuda)
    model, inputs, optim = build()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SambaPefError, match="compiled for CUDA .* no usable GPU"):
        utils.trace_graph(model, inputs, optim, pef=path)


def test_backend_falls_back_to_reference_with_one_message(monkeypatch):
    from sambaflow.app.backend_choice import choose_backend
    from sambaflow.backends import inductor

    monkeypatch.setattr(
        inductor.InductorBackend, "available", staticmethod(lambda: (False, "no C++ compiler"))
    )
    said = []
    backend = choose_backend("inductor", said.append)
    assert backend.name == "reference"
    assert said == [
        "the inductor backend cannot run here (no C++ compiler); falling back to the reference backend"
    ]


def test_test_command_reports_failures_and_exits_non_zero(capsys):
    from sambaflow.app.driver import _test
    from sambaflow.app.gold import test_against_cpu

    model, inputs, optim = build()
    utils.trace_graph(model, inputs, optim)
    assert test_against_cpu(model, inputs)
    assert "gemm1__weight__grad" in capsys.readouterr().out
    # A device that computes something else. (Changing a stored weight would not do: the gold
    # model starts from the device's weights.)
    executable = samba.session.executable
    names, fwd = executable.programs["fwd"].outputs, executable.compiled["fwd"]

    def wrong_fwd(args):
        return [t * 1.01 if n == "gemm3__outputs__0" else t for n, t in zip(names, fwd(args))]

    executable.compiled["fwd"] = wrong_fwd
    with pytest.raises(SystemExit) as exit_info:
        _test(model, inputs)
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "gemm3__outputs__0" in out and "FAIL" in out and "test FAILED" in out


def test_graph_keyword_arguments_keep_their_order():
    """A node's kwargs come back from the PEF in the traced order, so the decoded program's code
    (which the inductor backend fingerprints) is the code that was compiled."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from sambaflow.passes.sections import SectionProgram
    from sambaflow.pef.decode import decode_graph
    from sambaflow.pef.file import _program_members

    def build(x):
        return x + torch.ones(x.shape, dtype=torch.float32, layout=torch.strided, device="cpu")

    module = make_fx(build)(torch.randn(3))
    kwargs = [list(n.kwargs) for n in module.graph.nodes if n.kwargs]
    assert kwargs and kwargs[0] != sorted(kwargs[0])  # the case sorting used to break
    members: dict[str, bytes] = {}
    entry = _program_members("train", "step", SectionProgram("step", module, ["x"], ["y"]), None, members)
    assert decode_graph(json.loads(members[entry["graph"]])).code == module.code


def test_compile_without_config_reads_the_parsed_args(tmp_path, monkeypatch):
    """SambaNova's tutorials call `session.compile(model, inputs[, optims])` with no config_dict:
    the PEF goes where `--output-folder`/`--pef-name` say, `--inference` makes it forward-only."""
    from sambaflow.samba.utils.argparser import parse_app_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sambaflow.app.args._last_parsed", None)  # restored after the test
    argv = ["compile", "--inference", "--pef-name=inference", "--output-folder=there", "--arch", "sn20"]
    parse_app_args(argv)
    model, inputs, _ = build()
    path = samba.session.compile(model, inputs)
    assert path == "there/inference/inference.pef" and (tmp_path / path).exists()
    manifest, _ = read_manifest(tmp_path / path)
    assert manifest["inference"] and list(manifest["graphs"]) == ["inference"]
    log = (tmp_path / "there/inference/inference.compile.log").read_text()
    assert "NO EFFECT: --arch sn20" in log


def forge(path, target, edit=None, key=None, recompute_members=True):
    """A copy of the PEF after `edit(members, manifest)` with its checksums recomputed (and signed
    with `key`): what someone editing a PEF on purpose writes. Returns the new path."""
    import hashlib

    from sambaflow.pef.consistency import manifest_digest
    from sambaflow.pef.sign import sign

    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    members.pop("signature.json", None)
    if edit:
        edit(members, manifest)
    if recompute_members:
        manifest["members"] = {
            n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in members.items()
        }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    raw = json.dumps(manifest).encode()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", raw)
        for name, data in members.items():
            archive.writestr(name, data)
        if key is not None:
            archive.writestr("signature.json", sign(raw, key))
    return str(target)


def edit_graph(member, change):
    """An `edit` for `forge`: apply `change(graph_json)` to one graph member."""

    def edit(members, manifest):
        graph = json.loads(members[member])
        change(graph)
        members[member] = json.dumps(graph).encode()

    return edit

"""Precision: GraphAMP mp1 (bf16 mixed precision) and bf16 models, recorded in the PEF and checked.

A small FFN on the reference backend: mp1 equals eager `torch.autocast("cpu", torch.bfloat16)`;
the PEF records `bf16-mixed` / `bf16` / `fp32`, `inspect` and the compile log say so; a run traces
with the PEF's preset, and one that traces another precision, or feeds another dtype, is refused
with what to change. The Llama numerics are in tests/test_llama.py.
"""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch

from sambaflow import samba
from sambaflow.__main__ import main as cli_main
from sambaflow.app import args as app_args
from sambaflow.app import gold as gold_check
from sambaflow.app.args import parse_app_args
from sambaflow.app.compile import compile_pef
from sambaflow.errors import SambaArgumentError, SambaPefError, SambaRunError
from sambaflow.samba import utils

from helpers import named_inputs, rel_err
from models import ResFFNLogReg

BATCH, FEATURES = 8, 32


def build(dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = ResFFNLogReg(FEATURES, 24, 5).to(dtype)
    gold = ResFFNLogReg(FEATURES, 24, 5).to(dtype)
    gold.load_state_dict(model.state_dict())
    samba.from_torch_model_(model)
    return gold, model, samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def data(generator: torch.Generator, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [
        torch.randn(BATCH, FEATURES, generator=generator).to(dtype),
        torch.randint(0, 5, (BATCH,), generator=generator),
    ]


def compile_ffn(folder, name: str, dtype=torch.float32, **config) -> str:
    _, model, optim = build(dtype)
    inputs = named_inputs(["x", "y"], data(torch.Generator().manual_seed(0), dtype))
    config = {"pef_name": name, "output_folder": str(folder), **config}
    path = compile_pef(model, inputs, optim, config_dict=config)
    samba.session.reset()
    return path


@pytest.fixture(scope="module")
def pefs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision")
    mixed = {"graphamp_preset": "mp1", "enable_mixed_precision_ops": ["gemm", "softmax"]}
    return {
        "mixed": compile_ffn(folder, "mixed", **mixed),
        "fp32": compile_ffn(folder, "fp32"),
        "bf16": compile_ffn(folder, "bf16", torch.bfloat16),
    }


def manifest(path: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("manifest.json"))


def test_the_pef_records_its_precision_and_inspect_shows_it(pefs, capsys):
    assert {kind: manifest(path)["precision"] for kind, path in pefs.items()} == {
        "mixed": "bf16-mixed",
        "fp32": "fp32",
        "bf16": "bf16",
    }
    log = open(os.path.splitext(pefs["mixed"])[0] + ".compile.log").read()
    assert "precision: bf16-mixed (GraphAMP mp1: GEMM-like ops" in log
    assert "NO EFFECT: --enable-mixed-precision-ops ['gemm', 'softmax']: accepted but had no effect" in log
    assert cli_main(["inspect", pefs["mixed"]]) == 0
    assert "precision: bf16-mixed (GraphAMP mp1" in capsys.readouterr().out
    mixed = manifest(pefs["mixed"])["graphs"]["train"]
    dtypes = {t["dtype"] for t in mixed["inputs"] if t["role"] in ("param", "state")}
    assert dtypes == {"float32"}  # master weights and momenta stay fp32


def test_mixed_precision_pef_runs_with_its_preset_as_eager_autocast(pefs):
    gold, model, optim = build()
    gold_optim = torch.optim.SGD(gold.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    outputs = utils.trace_graph(model, named_inputs(["x", "y"], data(generator)), optim, pef=pefs["mixed"])
    assert samba.session.executable.graph.precision == "bf16-mixed"  # no preset given: the PEF's
    for step in range(4):
        x, y = data(generator)
        loss, logits = samba.session.run(named_inputs(["x", "y"], [x, y]), outputs)
        if step == 0:  # autocast really changes the numbers: fp32 logits are not these
            with torch.no_grad():
                assert rel_err(logits, gold(x, y)[1]) > 1e-3
        gold_optim.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want_loss, want_logits = gold(x, y)
        want_loss.backward()
        gold_optim.step()
        assert logits.dtype == torch.bfloat16
        assert rel_err(loss, want_loss) < 1e-5 and rel_err(logits, want_logits) < 1e-5, step
    samba.session.to_cpu(model)
    for got, want in zip(model.parameters(), gold.parameters()):
        assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


def test_test_command_compares_mixed_precision_with_an_autocast_gold(pefs, capsys):
    _, model, optim = build()
    inputs = named_inputs(["x", "y"], data(torch.Generator().manual_seed(2)))
    utils.trace_graph(model, inputs, optim, pef=pefs["mixed"])
    assert gold_check.test_against_cpu(model, inputs)
    out = capsys.readouterr().out
    assert "the gold model runs under torch.autocast('cpu', torch.bfloat16)" in out
    assert "0.03 x (its largest expected value)" in out
    # the gold ran under autocast: the logits agree to the last bit on the reference backend
    logits_line = next(line for line in out.splitlines() if line.startswith("gemm3__outputs__0"))
    assert "max_abs_err  0.000e+00" in logits_line, logits_line


def test_bf16_model_pef_passes_test_at_bf16_tolerance(pefs, capsys):
    _, model, optim = build(torch.bfloat16)
    inputs = named_inputs(["x", "y"], data(torch.Generator().manual_seed(3), torch.bfloat16))
    utils.trace_graph(model, inputs, optim, pef=pefs["bf16"])
    assert samba.session.executable.graph.precision == "bf16"
    assert gold_check.test_against_cpu(model, inputs)
    assert "precision bf16: the gold model runs; bf16 tolerance" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("pef", "dtype", "preset", "message"),
    [
        (
            "mixed",
            torch.float32,
            "mp0",
            r"compiled in precision bf16-mixed \(GraphAMP mp1.*now traces fp32 \(float32.*drop "
            r"--graphamp-preset mp0",
        ),
        (
            "fp32",
            torch.float32,
            "mp1",
            r"compiled in precision fp32.*now traces bf16-mixed.*drop --graphamp",
        ),
        ("bf16", torch.float32, None, r"compiled in precision bf16 .*now traces fp32.*model.bfloat16\(\)"),
        ("fp32", torch.bfloat16, None, r"compiled in precision fp32 .*now traces bf16 .*model.float\(\)"),
    ],
    ids=["mixed-pef-run-mp0", "fp32-pef-run-mp1", "bf16-pef-fp32-model", "fp32-pef-bf16-model"],
)
def test_a_pef_refuses_an_app_tracing_another_precision(pefs, pef, dtype, preset, message):
    _, model, optim = build(dtype)
    inputs = named_inputs(["x", "y"], data(torch.Generator().manual_seed(4), dtype))
    with pytest.raises(SambaPefError, match=message):
        utils.trace_graph(model, inputs, optim, pef=pefs[pef], graphamp_preset=preset)
    assert samba.session.executable is None


def test_a_bf16_pef_fed_fp32_names_the_input(pefs):
    _, model, optim = build(torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    outputs = utils.trace_graph(
        model, named_inputs(["x", "y"], data(generator, torch.bfloat16)), optim, pef=pefs["bf16"]
    )
    with pytest.raises(
        SambaRunError,
        match=r"input 'x': the graph was compiled for torch.bfloat16, given torch.float32.*x.bfloat16\(\)",
    ):
        samba.session.run(named_inputs(["x", "y"], data(generator)), outputs)


def test_graphamp_arguments(monkeypatch):
    monkeypatch.setattr(app_args, "_last_parsed", None)  # restored after the test
    args = parse_app_args(
        ["compile", "--graphamp-preset", "MP1", "--enable-mixed-precision-ops", "gemm", "softmax"]
    )
    assert args.graphamp_preset == "mp1" and args.enable_mixed_precision_ops == ["gemm", "softmax"]
    assert parse_app_args(["run"]).graphamp_preset is None  # run -p: the PEF's
    with pytest.raises(SystemExit):
        parse_app_args(["compile", "--graphamp-preset", "mp2"])
    # run without -p compiles here with the parsed preset
    parse_app_args(["run", "--graphamp-preset", "mp1"])
    _, model, optim = build()
    utils.trace_graph(model, named_inputs(["x", "y"], data(torch.Generator().manual_seed(6))), optim)
    assert samba.session.executable.graph.precision == "bf16-mixed"


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        ("mp4", r"mp4 \(every operator in bf16\) is not implemented: use mp1.*model.bfloat16\(\)"),
        ("mp2", r"'mp2' is not a GraphAMP preset: use mp0 .* or mp1"),
    ],
)
def test_unsupported_presets_are_refused(preset, message):
    _, model, optim = build()
    inputs = named_inputs(["x", "y"], data(torch.Generator().manual_seed(7)))
    with pytest.raises(SambaArgumentError, match=message):
        utils.trace_graph(model, inputs, optim, graphamp_preset=preset)


def test_mixed_precision_with_microbatches_is_eager_autocast_accumulation():
    """-mb 4 on a batch of 8 under mp1: eager autocast with two half batches, each loss halved."""
    gold, model, optim = build()
    gold_optim = torch.optim.SGD(gold.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(8)
    first = named_inputs(["x", "y"], data(generator))
    outputs = utils.trace_graph(model, first, optim, graphamp_preset="mp1", microbatch_size=4)
    graph = samba.session.executable.graph
    assert graph.precision == "bf16-mixed" and graph.origin is not None  # micro-batched, in bf16
    for step in range(3):
        x, y = data(generator)
        samba.session.run(named_inputs(["x", "y"], [x, y]), outputs)
        gold_optim.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = gold(x[half], y[half])[0]
            (loss / 2).backward()
        gold_optim.step()
    samba.session.to_cpu(model)
    for got, want in zip(model.parameters(), gold.parameters()):
        assert rel_err(got, want) < 1e-5

"""What a new user meets (issue 11): one backend rule, `error:` lines instead of tracebacks, messages
that name the argument and the fix, help per command, notes about weights and threads, progress."""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from sambaflow import samba
from sambaflow.app import args as args_module
from sambaflow.app import cpu_load, error_hook, gold, run_notes
from sambaflow.app.measure import measure_performance
from sambaflow.app.progress_line import ProgramProgress
from sambaflow.backends.inductor import CompileReport
from sambaflow.backends.inductor.probe import available
from sambaflow.errors import SambaOptimizerError, SambaRunError
from sambaflow.samba import utils

from models import ResFFNLogReg

# An app as a user writes one: parse_app_args, the standard driver, its own `run`.
APP = textwrap.dedent(
    """
    import sys
    import torch
    from sambaflow import samba
    import sambaflow.samba.utils as utils
    from sambaflow.samba.utils.argparser import parse_app_args
    from sambaflow.samba.utils.common import common_app_driver


    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.criterion = torch.nn.CrossEntropyLoss()

        def forward(self, x, y):
            out = self.lin(x)
            return self.criterion(out, y), out


    def main(argv):
        args = parse_app_args(argv)
        torch.manual_seed(0)
        model = Tiny()
        samba.from_torch_model_(model)
        x = samba.randn(args.batch_size, 4, name="x", batch_dim=0)
        y = samba.randint(3, (args.batch_size,), name="y", batch_dim=0)
        optim = samba.optim.SGD(model.parameters(), lr=0.1)
        if args.command == "run":
            utils.trace_graph(model, (x, y), optim, pef=args.pef)
        else:
            common_app_driver(args, model, (x, y), optim, name="tiny")


    if __name__ == "__main__":
        main(sys.argv[1:])
    """
)


@pytest.fixture
def app_process(monkeypatch):
    """parse_app_args in this process: its excepthook and parsed args are put back afterwards."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(args_module, "_last_parsed", None)


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    """The app file and a reference-backend PEF of it (compiled in this process), plus the log."""
    folder = tmp_path_factory.mktemp("tiny_app")
    path = folder / "tiny_app.py"
    path.write_text(APP)
    spec = importlib.util.spec_from_file_location("tiny_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "excepthook", sys.excepthook)
        patch.setattr(args_module, "_last_parsed", None)
        patch.setattr(sys, "stdout", out)
        module.main(["compile", "-b", "2", "--pef-name", "tiny", "--output-folder", str(folder), "--backend", "reference"])  # fmt: skip
    return module, path, str(folder / "tiny" / "tiny.pef"), out.getvalue()


def tiny_inputs(batch: int = 2):
    return (samba.randn(batch, 4, name="x", batch_dim=0), samba.randint(3, (batch,), name="y", batch_dim=0))


def traced_ffn(optim: bool = True, backend: str | None = None):
    model = ResFFNLogReg(16, 8, 4)
    samba.from_torch_model_(model)
    x = samba.randn(4, 16, name="x", batch_dim=0)
    label = samba.randint(4, (4,), name="label", batch_dim=0)
    sgd = samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optim else None
    outs = utils.trace_graph(model, [x, label], sgd, backend=backend)
    return model, x, label, outs


# ---------------------------------------------------------------------------- 1. one backend rule


def test_backend_rule_argument_then_env_then_inductor(monkeypatch, app_process, capsys):
    monkeypatch.setenv("SAMBAFLOW_BACKEND", "reference")
    traced_ffn()
    assert samba.session.executable.backend.name == "reference"
    assert "compiling it in this process with the reference backend" in capsys.readouterr().out

    traced_ffn(backend="inductor")  # an argument beats the environment (programs compile on first use)
    inductor = "inductor" if available()[0] else "reference"
    assert samba.session.executable.backend.name == inductor

    args_module.parse_app_args(["run", "--backend", "inductor"])  # so does the command line
    traced_ffn()
    assert samba.session.executable.backend.name == inductor
    monkeypatch.setattr(args_module, "_last_parsed", None)

    monkeypatch.delenv("SAMBAFLOW_BACKEND")  # nothing asked for: inductor
    traced_ffn()
    assert samba.session.executable.backend.name == inductor
    assert f"in this process with the {inductor} backend" in capsys.readouterr().out


def test_backend_given_with_a_pef_is_listed_as_no_effect(tiny_app, capsys):
    module, _, pef, _ = tiny_app
    model = module.Tiny()
    samba.from_torch_model_(model)
    utils.trace_graph(model, tiny_inputs(), samba.optim.SGD(model.parameters(), lr=0.1), pef=pef, backend="inductor")  # fmt: skip
    out = capsys.readouterr().out
    assert (
        "--backend inductor: accepted but had no effect" in out
        and "compiled for the reference backend" in out
    )


# ---------------------------------------------------------------------------- 2. error: lines


def run_app(path, *argv, env=None):
    return subprocess.Popen(
        [sys.executable, str(path), *argv],
        cwd=path.parent,
        env=dict(os.environ, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_app_prints_error_lines_not_tracebacks(tiny_app):
    _, path, pef, _ = tiny_app
    cases = {  # started together: each is a fresh Python that imports torch
        "no pef": run_app(path, "test", "-b", "2"),
        "missing": run_app(path, "run", "-b", "2", "-p", "missing.pef"),
        "mismatch": run_app(path, "test", "-b", "3", "-p", pef),
        "debug": run_app(path, "test", "-b", "2", env={"SAMBAFLOW_DEBUG": "1"}),
    }
    done = {name: (p.wait(timeout=300), p.communicate()[1]) for name, p in cases.items()}
    for name in ("no pef", "missing", "mismatch"):
        status, err = done[name]
        assert status == 2, (name, err)
        assert err.startswith("error: ") and "Traceback" not in err, (name, err)
    assert "'test' needs a compiled PEF: pass -p/--pef" in done["no pef"][1]
    assert "missing.pef" in done["missing"][1]
    assert "compiled with batch size 2, the app now traces 3" in done["mismatch"][1]
    status, err = done["debug"]
    assert status == 2 and "Traceback" in err and "SambaArgumentError: 'test' needs a compiled PEF" in err


def test_error_hook_keeps_tracebacks_of_other_exceptions(monkeypatch):
    seen = []
    monkeypatch.delenv("SAMBAFLOW_DEBUG", raising=False)
    error = ValueError("a bug in the app")
    assert error_hook.report(ValueError, error, None, lambda *a: seen.append(a)) is False
    assert seen == [(ValueError, error, None)]  # handed to the previous hook: the traceback stays
    assert error_hook.report(SambaRunError, SambaRunError("x"), None, lambda *a: seen.append(a)) is True
    assert len(seen) == 1


def test_hook_wrapped_by_torch_distributed_is_not_installed_again(app_process):
    """init_process_group wraps the hook in a closure (its _distributed_excepthook): a second
    parse_app_args must find ours inside it, or each error would print twice."""
    args_module.parse_app_args(["run"])
    ours = sys.excepthook

    def _distributed_excepthook(*args):
        ours(*args)

    sys.excepthook = _distributed_excepthook
    args_module.parse_app_args(["run"])
    assert sys.excepthook is _distributed_excepthook


def test_parse_app_args_installs_the_hook_once(app_process):
    args_module.parse_app_args(["run"])
    hook = sys.excepthook
    args_module.parse_app_args(["run"])
    assert sys.excepthook is hook and hook._sambaflow_hook


# ---------------------------------------------------------------------------- 3. messages


def test_forward_only_graph_with_optimizer_settings():
    _, x, label, outs = traced_ffn(optim=False)
    with pytest.raises(SambaRunError, match=r"'lr' sets an optimizer, and this graph has none.*recompile without --inference"):  # fmt: skip
        samba.session.run([x, label], outs, hyperparam_dict={"lr": 0.1})


@pytest.mark.parametrize("value", ["abc", None])
def test_hyperparameter_that_is_not_a_number(value):
    _, x, label, outs = traced_ffn()
    with pytest.raises(SambaRunError, match=rf"hyperparam_dict\['lr'\] = {value!r} is not a number: pass a float, e.g. {{'lr': 0.01}}"):  # fmt: skip
        samba.session.run([x, label], outs, hyperparam_dict={"lr": value})


def test_betas_on_an_sgd_graph():
    _, x, label, outs = traced_ffn()
    with pytest.raises(
        SambaRunError, match=r"'betas' is not a run-time input.*'lr'.*These are AdamW settings"
    ):
        samba.session.run([x, label], outs, hyperparam_dict={"betas": 0.9})


def test_betas_that_are_not_a_pair():
    model = ResFFNLogReg(16, 8, 4)
    samba.from_torch_model_(model)
    x, label = samba.randn(4, 16, name="x"), samba.randint(4, (4,), name="label")
    outs = utils.trace_graph(model, [x, label], samba.optim.AdamW(model.parameters()))
    with pytest.raises(
        SambaRunError, match=r"betas is a pair \(beta1, beta2\), e.g. \{'betas': \(0.9, 0.997\)\}"
    ):
        samba.session.run([x, label], outs, hyperparam_dict={"betas": 0.9})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: samba.optim.SGD(p, lr=math.nan), r"SGD: lr=nan is invalid: lr must be a learning rate >= 0"),
        (lambda p: samba.optim.SGD(p, lr=-0.1), r"SGD: lr=-0.1 is invalid: lr must be a learning rate >= 0"),
        (lambda p: samba.optim.SGD(p, lr=0.1, momentum=-1), r"momentum=-1 is invalid: momentum must be"),
        (lambda p: samba.optim.SGD(p, lr="fast"), r"SGD: lr='fast' is not a number: pass a learning rate"),
        (lambda p: samba.optim.AdamW(p, betas=(0.9, 1.0)), r"AdamW: beta2=1.0 is invalid: beta2 must be a beta in"),
        (lambda p: samba.optim.AdamW(p, eps=-1e-8), r"AdamW: eps=-1e-08 is invalid"),
    ],
)  # fmt: skip
def test_optimizer_refuses_invalid_settings_at_construction(make, match):
    model = ResFFNLogReg(16, 8, 4)
    samba.from_torch_model_(model)
    with pytest.raises(SambaOptimizerError, match=match):
        make(model.parameters())


def test_run_time_nan_learning_rate_is_refused():
    _, x, label, outs = traced_ffn()
    with pytest.raises(
        SambaRunError, match=r"hyperparam_dict\['lr'\] = nan: lr must be a learning rate >= 0"
    ):
        samba.session.run([x, label], outs, hyperparam_dict={"lr": float("nan")})


def test_empty_section_types_is_an_error():
    _, x, label, outs = traced_ffn()
    with pytest.raises(SambaRunError, match=r"section_types=\[\] names no section.*section_types=None"):
        samba.session.run([x, label], outs, section_types=[])


def test_out_of_range_label_names_the_input_reference():
    _, x, _, outs = traced_ffn()
    bad = samba.from_torch_tensor(torch.tensor([0, 1, 4, 2]), name="label", batch_dim=0)
    with pytest.raises(SambaRunError, match=r"input 'label' holds 1 value\(s\) out of range, e.g. \[4\].*loss over 4 classes, valid 0 <= value < 4") as info:  # fmt: skip
        samba.session.run([x, bad], outs)
    assert "Target 4 is out of bounds" in str(info.value.__cause__)


def test_out_of_range_token_names_the_embedding():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)

        def forward(self, tokens):
            return self.embed(tokens).sum()

    model = Bag()
    samba.from_torch_model_(model)
    tokens = samba.randint(5, (2, 3), name="tokens")
    outs = utils.trace_graph(model, [tokens], samba.optim.SGD(model.parameters(), lr=0.1))
    bad = samba.from_torch_tensor(torch.tensor([[0, 1, 2], [7, 4, -1]]), name="tokens")
    with pytest.raises(SambaRunError, match=r"input 'tokens' holds 2 value\(s\) out of range, e.g. \[-1, 7\]: it is the row numbers of an embedding with 5 rows"):  # fmt: skip
        samba.session.run([bad], outs)
    samba.session.run([tokens], outs)  # in range: runs


@pytest.mark.slow
@pytest.mark.skipif(not available()[0], reason="inductor unavailable")
def test_out_of_range_label_names_the_input_inductor():
    _, x, _, outs = traced_ffn(optim=False, backend="inductor")  # forward only: one small program
    bad = samba.from_torch_tensor(torch.tensor([0, 1, 10, 2]), name="label", batch_dim=0)
    with pytest.raises(SambaRunError, match=r"input 'label' holds 1 value\(s\) out of range, e.g. \[10\].*valid 0 <= value < 4") as info:  # fmt: skip
        samba.session.run([x, bad], outs)
    assert "index out of bounds" in str(info.value.__cause__)


# ---------------------------------------------------------------------------- 4. help


def command_help(command: str) -> str:
    parser = args_module.build_parser()
    return parser._subparsers._group_actions[0].choices[command].format_help()


def test_each_command_lists_only_its_own_options():
    run, test, measure, compile_ = (
        command_help(c) for c in ("run", "test", "measure-performance", "compile")
    )
    for option in ("--pef-name", "--output-folder", "--o0", "--num-tiles", "--arch", "--num-iterations"):
        assert option not in run and option not in test, option
        assert option in compile_ or option == "--num-iterations"
    assert "--num-threads" in run and "--backend" in run and "--backend" not in test
    assert "--num-iterations" in measure and "--pef-name" not in measure


def test_compile_only_option_under_run_is_refused_but_its_default_is_there(capsys):
    with pytest.raises(SystemExit):
        args_module.parse_app_args(["run", "--pef-name", "x"])
    assert "unrecognized arguments: --pef-name x" in capsys.readouterr().err
    assert args_module.parse_app_args(["run"]).pef_name is None  # apps may still read args.pef_name


def test_app_option_with_a_hidden_dest_keeps_its_own_default():
    args = args_module.parse_app_args(
        ["test"], test_parser_fn=lambda p: p.add_argument("--json", action="store_true")
    )
    assert args.json is False  # fmt: skip


@pytest.mark.parametrize("name", ["ffn_app", "logreg_app", "lenet_app"])
def test_example_app_options_have_help(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py"))  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    module.add_run_args(parser)
    missing = [a.dest for a in parser._actions if not a.help]
    assert missing == []


def test_test_command_prints_the_tolerance(capsys):
    model, x, label, outs = traced_ffn()
    assert gold.test_against_cpu(model, [x, label], tolerance=1e-4)
    out = capsys.readouterr().out
    assert "passes when max_abs_err <= 1e-06 + 0.0001 x (its largest expected value)" in out
    assert "gemm1__weight__grad" in out and "bound" in out.splitlines()[-1]


# ---------------------------------------------------------------------------- 5. no weights loaded


def test_inference_without_a_checkpoint_says_no_weights_were_loaded(tiny_app, app_process, capsys):
    module, _, pef, _ = tiny_app
    args_module.parse_app_args(["run", "-b", "2", "--inference", "-p", pef])
    model = module.Tiny()
    samba.from_torch_model_(model)
    utils.trace_graph(model, tiny_inputs(), None, pef=pef)
    out = capsys.readouterr().out
    assert "--inference with no checkpoint" in out and "random initial weights" in out
    given = argparse.Namespace(command="run", inference=True, load_checkpoint="c.pt", save_checkpoint=None)
    assert run_notes.no_weights_loaded(given, pef) is None
    assert run_notes.no_weights_loaded(argparse.Namespace(command="run", inference=False), pef) is None


# ---------------------------------------------------------------------------- 6. threads


def test_num_threads_is_applied_at_parse_time(app_process):
    before = torch.get_num_threads()
    try:
        assert args_module.parse_app_args(["run", "--num-threads", "1"]).num_threads == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        args_module.parse_app_args(["measure-performance", "--num-threads", "0"])


def test_fixed_thread_count_of_a_pef_is_noted():
    now = torch.get_num_threads()
    other = now + 1
    assert "compiled loops run on" in run_notes.ignored_threads(
        {"threads": {"torch": other, "cpus": other + 8}}
    )
    assert run_notes.ignored_threads({"threads": {"torch": other, "cpus": other}}) is None  # follows the run
    assert run_notes.ignored_threads({"threads": {"torch": now, "cpus": 64}}) is None
    assert run_notes.ignored_threads({}) is None


def test_measure_performance_prints_threads_and_records_the_cpu_share(tmp_path, capsys):
    model, x, label, _ = traced_ffn()
    report = tmp_path / "perf.json"
    measure_performance(model, [x, label], 4, n_iterations=2, json=str(report))
    assert f"CPU threads: {torch.get_num_threads()}" in capsys.readouterr().out
    import json

    data = json.loads(report.read_text())
    assert data["num_threads"] == torch.get_num_threads() and 0.0 <= data["other_cpu_share"] <= 1.0


@pytest.mark.slow
def test_other_cpu_share_sees_a_busy_process():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        before = cpu_load.cpu_seconds()
        time.sleep(0.6)
        share = cpu_load.other_cpu_share(before, cpu_load.cpu_seconds())
    finally:
        busy.kill()
        busy.wait()
    assert share > 0.8 / (os.cpu_count() or 1) * 0.5  # one busy core of cpu_count, with slack
    assert "--num-threads 1" in cpu_load.busy_warning(share, 2)
    assert cpu_load.busy_warning(0.0, 2) is None


# ---------------------------------------------------------------------------- 7. progress


def test_progress_is_one_plain_line_per_program_off_a_terminal():
    lines, stream = [], io.StringIO()
    reports = []
    line = ProgramProgress(lines.append, 2, reports, stream=stream, live=False)
    line.start("step")
    reports.append(CompileReport("step", "abc", "miss", "not compiled before", 1.0, 2_000_000))
    line.start("fwd")
    reports.append(CompileReport("fwd", "def", "hit", "same graph", 0.0, 1_000_000))
    line.finish()
    assert [text.split(":")[0] for text in lines] == ["  program 'step' (1/2)", "  program 'fwd' (2/2)"]
    assert "cache miss (not compiled before), package 2.0 MB" in lines[0] and "cache hit" in lines[1]
    assert stream.getvalue() == ""


@pytest.mark.slow
def test_progress_is_a_live_line_on_a_terminal():
    lines, stream = [], io.StringIO()
    line = ProgramProgress(lines.append, 1, None, stream=stream, live=True)
    line.start("step")
    time.sleep(1.3)
    line.finish()
    assert "\r[sambaflow]   program 'step' (1/1): compiling, 1 s" in stream.getvalue()
    assert stream.getvalue().endswith("\r\033[K") and len(lines) == 1


def test_compile_says_each_program(tiny_app):
    log = tiny_app[3]
    for i, name in enumerate(["step", "fwd", "bckwd", "opt"], 1):
        assert f"program '{name}' ({i}/4): " in log

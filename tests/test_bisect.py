"""`test` names the first node that differs: a deliberately broken rewrite is found, with the model
line it came from, its inputs' and output's error, and the rewrite to turn off.

Compiles: two in-process Inductor programs (the end-to-end test: the run, the probe); the other
tests run the rewrites op by op through a backend that applies them to the reference backend.
"""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
from torch import nn

from sambaflow import samba
from sambaflow.app import bisect
from sambaflow.app.diagnose import finding_lines
from sambaflow.app.driver import TOLERANCE, _test
from sambaflow.backends import rewrites
from sambaflow.backends.inductor import InductorBackend, available
from sambaflow.backends.reference import ReferenceBackend
from sambaflow.samba import utils
from sambaflow.trace.locate import node_source, recording_sources

aten = torch.ops.aten
TANH_LINE = "h = torch.tanh(self.fc1(x))"


class TanhNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(7, 5)
        self.fc2 = nn.Linear(5, 3)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.fc1(x))
        out = self.fc2(h)
        return self.criterion(out, y), out


def tanh_as_sigmoid(graph: torch.fx.Graph) -> None:
    """A broken `fast_tanh`: tanh becomes sigmoid."""
    for node in graph.nodes:
        if node.target is aten.tanh.default:
            node.target = aten.sigmoid.default


def tanh_backward_as_sigmoid_backward(graph: torch.fx.Graph) -> None:
    """A broken rewrite of one backward op (same arguments: the gradient and the forward output)."""
    for node in graph.nodes:
        if node.target is aten.tanh_backward.default:
            node.target = aten.sigmoid_backward.default


class RewritingReference(ReferenceBackend):
    """The reference backend on the graph as the inductor backend rewrites it: a compiled program's
    graph, run op by op, with no compile."""

    def compile(self, program):
        rewritten = copy.copy(program)
        rewritten.module = rewrites.rewrite_for_inductor(copy.deepcopy(program.module))
        return super().compile(rewritten)


def traced(optim: bool, backend=None, sources: bool = True):
    model = TanhNet()
    samba.from_torch_model_(model)
    x = samba.randn(3, 7, name="x", batch_dim=0)
    y = samba.randint(3, (3,), name="y", batch_dim=0)
    sgd = samba.optim.SGD(model.parameters(), lr=0.1) if optim else None
    with recording_sources(sources):  # as `test` traces
        utils.trace_graph(model, [x, y], sgd, backend=backend)
    return model, [x, y]


def ran_on_reference():
    """A training step traced and run (forward, backward) on the reference backend: the store then
    holds every input of the run, as after a failed `test`."""
    model, inputs = traced(optim=True, backend="reference")
    samba.session.run(inputs, model.output_tensors, section_types=["fwd", "bckwd"])
    return samba.session.executable.graph, samba.session.store


@pytest.mark.skipif(not available()[0], reason="Inductor or a C++ compiler is missing")
def test_test_command_names_the_node_a_broken_rewrite_changed(monkeypatch, capsys):
    monkeypatch.setattr(rewrites, "fast_tanh", tanh_as_sigmoid)
    # in-process compiles (one for the run, one for the probe): a PEF's ahead-of-time programs are
    # probed the same way (`probe_backend`)
    model, inputs = traced(optim=False, backend=InductorBackend(mode="jit"))
    with pytest.raises(SystemExit) as exit_info:
        _test(model, inputs)
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "test FAILED" in out and "looking for the first node that differs" in out
    report = out[out.index("first node outside tolerance") :].splitlines()
    assert report[0].startswith("first node outside tolerance (section fwd): tanh = tanh(addmm)")
    assert report[1].endswith(f"test_bisect.py:{_line_of(TANH_LINE)} (`{TANH_LINE}`)")
    assert report[2].split()[:3] == ["input", "addmm", "max_abs_err"]
    assert float(report[2].split()[3]) <= float(report[2].split()[5])  # its input agrees
    assert report[3].split()[:2] == ["output", "tanh"] and float(report[3].split()[3]) > 0.1
    assert "rewrite(s) fast_tanh" in report[4] and "SAMBAFLOW_REWRITES_OFF=fast_tanh" in report[4]


def test_a_backward_node_is_placed_at_the_forward_line_it_differentiates(monkeypatch):
    monkeypatch.setattr(rewrites, "scalars_computed_once", tanh_backward_as_sigmoid_backward)
    graph, store = ran_on_reference()
    finding = bisect.first_wrong_node(graph, RewritingReference(), store, ["fwd", "bckwd"], TOLERANCE)
    assert finding.node.target is aten.tanh_backward.default and finding.compiles == 1
    assert [d.ok for d in finding.inputs] == [True, True] and not finding.output.ok
    lines = finding_lines(graph, finding, store, TOLERANCE)
    assert lines[1].endswith(f"backward of {__file__}:{_line_of(TANH_LINE)} (`{TANH_LINE}`)")
    assert "rewrite(s) scalars_computed_once" in lines[-1]


def test_bisection_finds_the_same_node_in_log2_compiles(monkeypatch):
    """The fallback, for when returning every value hides the difference: probes of what crosses
    each cut, in log2(nodes) compiles."""
    monkeypatch.setattr(rewrites, "fast_tanh", tanh_as_sigmoid)
    graph, store = ran_on_reference()
    scope = bisect.scope_nodes(graph, ["fwd", "bckwd"])
    prober = bisect._Prober(graph, RewritingReference(), store)
    found = prober.bisect(scope, TOLERANCE)
    assert found.node.target is aten.tanh.default
    assert found.compiles <= math.ceil(math.log2(len(scope))) + 1


def test_no_finding_when_the_compiled_nodes_agree():
    graph, store = ran_on_reference()
    assert bisect.first_wrong_node(graph, RewritingReference(), store, ["fwd", "bckwd"], TOLERANCE) is None


def test_a_device_weight_changed_is_named_when_every_node_agrees(capsys):
    from sambaflow.app.diagnose import explain_failure

    model, inputs = traced(optim=True, backend="reference")
    assert samba.session.run(inputs, model.output_tensors, section_types=["fwd", "bckwd"])
    # a device copy apart from the host's (as on a GPU; on the CPU the store shares host memory)
    samba.session.store["fc2__weight"] = samba.session.store["fc2__weight"] * 1.5
    assert explain_failure(model, TOLERANCE, print) is None
    assert "the device's weights differ from the host model's: fc2__weight" in capsys.readouterr().out


def test_probes_of_ahead_of_time_programs_compile_in_process():
    aot = InductorBackend()
    probe = bisect.probe_backend(aot)
    assert (probe.mode, aot.mode, probe.cache is aot.cache) == ("jit", "aot", True)
    reference = ReferenceBackend()
    assert bisect.probe_backend(reference) is reference


def test_rewrites_off_leaves_a_rewrite_out_and_changes_the_cache_key(monkeypatch):
    from sambaflow.backends.inductor import compiler_source_hash
    from sambaflow.errors import SambaBackendError

    plain = compiler_source_hash()
    monkeypatch.setenv(rewrites.REWRITES_OFF_VARIABLE, "fast_tanh")
    assert rewrites.rewrites_off() == ["fast_tanh"] and compiler_source_hash() != plain
    assert aten.tanh.default in _targets_after_rewrites()
    monkeypatch.setenv(rewrites.REWRITES_OFF_VARIABLE, "")
    assert aten.tanh.default not in _targets_after_rewrites()
    monkeypatch.setenv(rewrites.REWRITES_OFF_VARIABLE, "fast_tahn")
    with pytest.raises(SambaBackendError, match=r"unknown rewrite\(s\) \['fast_tahn'\]"):
        rewrites.rewrites_off()


def _targets_after_rewrites() -> set:
    from torch.fx.experimental.proxy_tensor import make_fx

    module = make_fx(torch.tanh, tracing_mode="fake")(torch.randn(4))
    return {n.target for n in rewrites.rewrite_for_inductor(module).graph.nodes}


def _line_of(text: str) -> int:
    with open(__file__) as source:
        return next(i for i, line in enumerate(source, 1) if text in line and "TANH_LINE" not in line)


def test_the_test_command_traces_with_model_lines(tmp_path):
    """`test` (common_app_driver) records each node's stack; other traces do not pay for it."""
    from sambaflow.app.compile import compile_pef
    from sambaflow.app.driver import common_app_driver

    model, inputs = traced(optim=False, backend="reference", sources=False)
    assert not any("stack_trace" in n.meta for n in samba.session.executable.graph.module.graph.nodes)
    config = {"output_folder": str(tmp_path), "backend": "reference"}
    pef = compile_pef(model, inputs, None, name="tanh", config_dict=config, inference=True)
    args = argparse.Namespace(command="test", pef=pef, inference=True)
    assert common_app_driver(args, model, inputs, None)
    sources = {node_source(n) for n in samba.session.executable.graph.module.graph.nodes}
    assert f"{__file__}:{_line_of(TANH_LINE)} (`{TANH_LINE}`)" in sources


class TanhAsSigmoid(ReferenceBackend):
    """A backend whose own code for tanh is wrong (no rewrite involved)."""

    def compile(self, program):
        wrong = copy.copy(program)
        wrong.module = copy.deepcopy(program.module)
        tanh_as_sigmoid(wrong.module.graph)
        wrong.module.recompile()
        return super().compile(wrong)


def test_a_wrong_op_of_the_backend_itself_is_named_as_such():
    graph, store = ran_on_reference()
    finding = bisect.first_wrong_node(graph, TanhAsSigmoid(), store, ["fwd", "bckwd"], TOLERANCE)
    assert finding.node.target is aten.tanh.default
    suggestion = finding_lines(graph, finding, store, TOLERANCE)[-1]
    assert (
        "the backend computes this op wrongly from right inputs" in suggestion and "rewrite" not in suggestion
    )

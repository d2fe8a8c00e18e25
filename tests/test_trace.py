"""The traced whole-step graph: sections, names, hyperparameter inputs, text, and trace errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sambaflow import samba
from sambaflow.errors import SambaTraceError
from sambaflow.passes.sections import section_programs
from sambaflow.trace.tracer import trace_step

from helpers import named_inputs
from models import Branchy, DropoutMLP, ResFFNLogReg, UsesNumpy


def converted(model):
    samba.from_torch_model_(model)
    return model


def test_whole_step_graph_is_sectioned_and_named():
    model = converted(ResFFNLogReg(16, 8, 4))
    optim = samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    graph = trace_step(
        model, named_inputs(["image", "label"], [torch.randn(4, 16), torch.randint(4, (4,))]), [optim]
    )
    assert graph.sections == ["fwd", "bckwd", "opt"]
    calls = [n for n in graph.module.graph.nodes if n.op == "call_function"]
    assert {n.meta["section"] for n in calls} == {"fwd", "bckwd", "opt"}
    order = [n.meta["section"] for n in calls]
    assert order == sorted(order, key=["fwd", "bckwd", "opt"].index), "sections are contiguous"
    roles = {s.name: s.role for s in graph.inputs}
    assert roles["image"] == "input" and roles["gemm1__weight"] == "param"
    assert roles["gemm1__weight__momentum_buffer"] == "state"
    assert {n for n, r in roles.items() if r == "hyper"} == {"lr", "momentum", "weight_decay"}
    assert roles["criterion__outputs__0__grad"] == "output_grad"
    outputs = {s.name: s.role for s in graph.outputs}
    assert [s.name for s in graph.model_outputs] == ["criterion__outputs__0", "gemm3__outputs__0"]
    assert outputs["gemm1__weight__grad"] == "grad" and outputs["gemm1__weight"] == "param_update"
    assert outputs["gemm1__weight__momentum_buffer"] == "state_update"
    assert graph.loss_names == ["criterion__outputs__0"]
    assert graph.hyper_defaults == {"lr": 0.1, "weight_decay": 1e-4, "momentum": 0.9}


def test_hyperparameters_are_graph_inputs_not_constants():
    model = converted(ResFFNLogReg(16, 8, 4))
    optim = samba.optim.SGD(model.parameters(), lr=0.123456, momentum=0.654321, weight_decay=0.000777)
    graph = trace_step(model, named_inputs(["x", "y"], [torch.randn(4, 16), torch.randint(4, (4,))]), [optim])
    code = graph.module.code
    for value in ("0.123456", "0.654321", "0.000777"):
        assert value not in code


def test_as_text_marks_sections_and_names():
    model = converted(ResFFNLogReg(16, 8, 4))
    graph = trace_step(
        model,
        named_inputs(["x", "y"], [torch.randn(4, 16), torch.randint(4, (4,))]),
        [samba.optim.SGD(model.parameters(), lr=0.1)],
    )
    text = graph.as_text()
    for marker in (
        "section fwd:",
        "section bckwd:",
        "section opt:",
        "x [4x16 float32]",
        "addmm(gemm1__bias, x, t)",
        "gemm1__weight__grad [8x16 float32]",
    ):
        assert marker in text


def test_dropout_probability_is_a_named_hyperparameter():
    model = converted(DropoutMLP(16, 8, 4, p=0.3))
    graph = trace_step(
        model,
        named_inputs(["x", "y"], [torch.randn(4, 16), torch.randint(4, (4,))]),
        [samba.optim.SGD(model.parameters(), lr=0.1)],
    )
    assert graph.hyper_defaults["drop__p"] == pytest.approx(0.3)
    assert "0.3" not in graph.module.code and "0.7" not in graph.module.code


def test_inference_trace_has_no_backward_or_optimizer():
    model = converted(ResFFNLogReg(16, 8, 4))
    graph = trace_step(
        model, named_inputs(["x", "y"], [torch.randn(4, 16), torch.randint(4, (4,))]), [], backward=False
    )
    assert graph.sections == ["fwd"] and [s.role for s in graph.outputs] == ["output", "output"]


def test_section_programs_pass_activations_through_the_store():
    model = converted(ResFFNLogReg(16, 8, 4))
    graph = trace_step(
        model,
        named_inputs(["x", "y"], [torch.randn(4, 16), torch.randint(4, (4,))]),
        [samba.optim.SGD(model.parameters(), lr=0.1)],
    )
    programs = section_programs(graph)
    saved_by_fwd = {n for n in programs["fwd"].outputs if n.startswith("__saved__")}
    assert saved_by_fwd and saved_by_fwd <= set(programs["bckwd"].inputs) | set(programs["opt"].inputs)
    assert "gemm1__weight__grad" in programs["bckwd"].outputs
    assert "gemm1__weight" in programs["opt"].outputs
    assert "program fwd(" in programs["fwd"].as_text()


def test_data_dependent_branch_names_the_model_line():
    model = converted(Branchy())
    with pytest.raises(SambaTraceError, match=r"models\.py:\d+ \(`if out\.sum\(\) > 0:") as info:
        trace_step(
            model, named_inputs(["x"], [torch.randn(2, 8)]), [samba.optim.SGD(model.parameters(), lr=0.1)]
        )
    assert "torch.where" in str(info.value)


def test_untraceable_value_read_names_the_model_line():
    model = converted(UsesNumpy())
    with pytest.raises(SambaTraceError, match=r"models\.py:\d+ \(`scale = float\("):
        trace_step(
            model, named_inputs(["x"], [torch.randn(2, 8)]), [samba.optim.SGD(model.parameters(), lr=0.1)]
        )


def test_forward_must_return_tensors():
    class ReturnsDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return {"out": self.fc(x), "n": 3}

    model = converted(ReturnsDict())
    with pytest.raises(SambaTraceError, match="must return a tensor or a tuple/list of tensors"):
        trace_step(model, named_inputs(["x"], [torch.randn(2, 2)]), [])


def test_unconverted_model_and_foreign_optimizer_are_rejected():
    model = ResFFNLogReg(16, 8, 4)
    inputs = named_inputs(["x", "y"], [torch.randn(4, 16), torch.randint(4, (4,))])
    with pytest.raises(SambaTraceError, match="from_torch_model_"):
        trace_step(model, inputs, [])
    samba.from_torch_model_(model)
    with pytest.raises(SambaTraceError, match="torch.optim optimizers cannot be traced"):
        trace_step(model, inputs, [torch.optim.SGD(model.parameters(), lr=0.1)])


def test_inputs_need_unique_names():
    model = converted(ResFFNLogReg(16, 8, 4))
    with pytest.raises(SambaTraceError, match="input 0 .* has no name"):
        trace_step(model, [torch.randn(4, 16), torch.randint(4, (4,))], [])
    with pytest.raises(SambaTraceError, match="two inputs are named 'x'"):
        trace_step(model, named_inputs(["x", "x"], [torch.randn(4, 16), torch.randint(4, (4,))]), [])


def test_overlapping_optimizers_are_rejected():
    model = converted(ResFFNLogReg(16, 8, 4))
    inputs = named_inputs(["x", "y"], [torch.randn(4, 16), torch.randint(4, (4,))])
    optims = [samba.optim.SGD(model.parameters(), lr=0.1), samba.optim.SGD([model.gemm1.weight], lr=0.1)]
    with pytest.raises(SambaTraceError, match="must be disjoint"):
        trace_step(model, inputs, optims)


def test_loss_indices_choose_the_loss():
    model = converted(ResFFNLogReg(16, 8, 4))
    inputs = named_inputs(["x", "y"], [torch.randn(4, 16), torch.randint(4, (4,))])
    graph = trace_step(model, inputs, [samba.optim.SGD(model.parameters(), lr=0.1)], loss_indices=[1])
    assert graph.loss_names == ["gemm3__outputs__0"]
    with pytest.raises(SambaTraceError, match="out of range"):
        trace_step(model, inputs, [samba.optim.SGD(model.parameters(), lr=0.1)], loss_indices=[5])


class KeepsATable(nn.Module):
    """Builds a table on its first call and keeps it: made while tracing, it is a fake tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.tables: dict[int, torch.Tensor] = {}

    def forward(self, x):
        if x.shape[-1] not in self.tables:
            self.tables[x.shape[-1]] = torch.arange(4.0) * 2
        return self.lin(x) + self.tables[x.shape[-1]]


def test_a_tensor_kept_from_an_earlier_fake_pass_is_named_at_trace_time():
    model = samba.from_torch_model_(KeepsATable())
    x = samba.randn(2, 4, name="x", batch_dim=0)
    with pytest.raises(
        SambaTraceError, match=r"forward\(\) reads KeepsATable.tables\[4\], which it made during"
    ):
        trace_step(model, (x,), [], backward=False)
    model.tables.clear()
    model.tables[4] = torch.arange(4.0) * 2  # made outside the trace: a real constant, fine
    graph = trace_step(model, (x,), [], backward=False)
    assert any(n.op == "get_attr" for n in graph.module.graph.nodes)

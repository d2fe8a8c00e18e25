"""Every bad input to session.run gets a SambaRunError that lists what the graph expects."""

from __future__ import annotations

import pytest
import torch

from sambaflow import samba
from sambaflow.errors import SambaRunError
from sambaflow.samba import utils

from models import ResFFNLogReg


@pytest.fixture
def traced():
    model = ResFFNLogReg(16, 8, 4)
    samba.from_torch_model_(model)
    x = samba.randn(4, 16, name="x", batch_dim=0)
    y = samba.randint(4, (4,), name="y", batch_dim=0)
    outs = utils.trace_graph(model, [x, y], samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    return model, x, y, outs


def store_snapshot():
    return {k: v.clone() for k, v in samba.session.store.items()}


def assert_store_unchanged(before):
    after = samba.session.store
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def raises_and_keeps_store(match, **run_kwargs):
    before = store_snapshot()
    with pytest.raises(SambaRunError, match=match):
        samba.session.run(**run_kwargs)
    assert_store_unchanged(before)


def test_unknown_input_name(traced):
    _, x, y, outs = traced
    z = samba.randn(4, 16, name="z")
    raises_and_keeps_store(
        r"unknown \['z'\], missing \['x'\].*expects \['x \[4x16 float32\]'",
        input_tensors=[z, y],
        output_tensors=outs,
    )


def test_missing_input(traced):
    _, x, y, outs = traced
    raises_and_keeps_store(r"missing \['y'\]", input_tensors=[x], output_tensors=outs)


def test_wrong_shape(traced):
    _, x, y, outs = traced
    bad = samba.randn(8, 16, name="x")
    raises_and_keeps_store(
        r"input 'x'.*compiled for shape \[4, 16\].*given \[8, 16\]",
        input_tensors=[bad, y],
        output_tensors=outs,
    )


def test_wrong_dtype(traced):
    _, x, y, outs = traced
    bad = samba.randn(4, 16, name="x", dtype=torch.float64)
    raises_and_keeps_store(
        r"input 'x': the graph was compiled for torch.float32, given torch.float64.*Feed torch.float32 "
        r"tensors, e.g. x.float\(\)",
        input_tensors=[bad, y],
        output_tensors=outs,
    )


def test_inputs_by_dict_and_by_position(traced):
    _, x, y, outs = traced
    by_dict = samba.session.run({"x": x.torch(), "y": y.torch()}, outs, section_types=["fwd"])[0]
    by_position = samba.session.run([x.torch(), y.torch()], outs, section_types=["fwd"])[0]
    assert torch.equal(by_dict, by_position)


def test_unknown_section(traced):
    _, x, y, outs = traced
    raises_and_keeps_store(
        r"unknown section 'backward'.*\['fwd', 'bckwd', 'opt'\]",
        input_tensors=[x, y],
        output_tensors=outs,
        section_types=["fwd", "backward"],
    )


def test_sections_out_of_order(traced):
    _, x, y, outs = traced
    raises_and_keeps_store(
        r"in the order", input_tensors=[x, y], output_tensors=outs, section_types=["opt", "fwd"]
    )


def test_upper_case_sections_accepted(traced):
    _, x, y, outs = traced
    samba.session.run([x, y], outs, section_types=["FWD", "BCKWD", "OPT"])


def test_unknown_hyperparameter(traced):
    _, x, y, outs = traced
    raises_and_keeps_store(
        r"'beta1' is not a run-time input.*\['lr', 'weight_decay', 'momentum'\]",
        input_tensors=[x, y],
        output_tensors=outs,
        hyperparam_dict={"lr": 0.1, "beta1": 0.9},
    )


def test_zero_momentum_is_accepted_for_plain_sgd():
    model = ResFFNLogReg(16, 8, 4)
    samba.from_torch_model_(model)
    x, y = samba.randn(4, 16, name="x"), samba.randint(4, (4,), name="y")
    outs = utils.trace_graph(model, [x, y], samba.optim.SGD(model.parameters(), lr=0.1))
    samba.session.run([x, y], outs, hyperparam_dict={"momentum": 0.0, "p": 0.0})
    with pytest.raises(SambaRunError, match="momentum > 0"):
        samba.session.run([x, y], outs, hyperparam_dict={"momentum": 0.9})


def test_bckwd_before_any_fwd(traced):
    _, x, y, outs = traced
    raises_and_keeps_store(
        r"section 'bckwd' needs values.*run \['fwd'\] first",
        input_tensors=[x, y],
        output_tensors=outs,
        section_types=["bckwd", "opt"],
    )


def test_opt_before_bckwd(traced):
    _, x, y, outs = traced
    samba.session.run([x, y], outs, section_types=["fwd"])
    raises_and_keeps_store(
        r"section 'opt' needs values.*run \['fwd', 'bckwd'\] first",
        input_tensors=[x, y],
        output_tensors=outs,
        section_types=["opt"],
    )


def test_wrong_output_gradient_shape(traced):
    _, x, y, outs = traced
    samba.session.run([x, y], outs, section_types=["fwd"])
    raises_and_keeps_store(
        r"gradient of output 'criterion__outputs__0__grad'.*shape \[\]",
        input_tensors=[x, y],
        output_tensors=outs,
        section_types=["bckwd"],
        grad_of_outputs=[torch.ones(3)],
    )


def test_too_many_output_gradients(traced):
    _, x, y, outs = traced
    samba.session.run([x, y], outs, section_types=["fwd"])
    raises_and_keeps_store(
        r"grad_of_outputs has 3 tensors",
        input_tensors=[x, y],
        output_tensors=outs,
        section_types=["bckwd"],
        grad_of_outputs=[None, None, torch.ones(1)],
    )


def test_run_without_a_graph():
    with pytest.raises(SambaRunError, match="trace_graph"):
        samba.session.run([samba.randn(2, name="x")])


def test_get_tensors_by_unknown_name(traced):
    with pytest.raises(SambaRunError, match=r"no device tensor named \['nope'\].*gemm1__weight"):
        samba.session.get_tensors_by_name(["nope"])


def test_no_output_gradient_without_init_output_grads():
    model = ResFFNLogReg(16, 8, 4)
    samba.from_torch_model_(model)
    x, y = samba.randn(4, 16, name="x"), samba.randint(4, (4,), name="y")
    outs = utils.trace_graph(
        model, [x, y], samba.optim.SGD(model.parameters(), lr=0.1), init_output_grads=False
    )
    with pytest.raises(SambaRunError, match="init_output_grads=False"):
        samba.session.run([x, y], outs)
    samba.session.run([x, y], outs, grad_of_outputs=[torch.ones(()), torch.zeros(4, 4)])


def test_bckwd_after_opt_needs_a_new_fwd(traced):
    _, x, y, outs = traced
    samba.session.run([x, y], outs, section_types=["fwd"])
    samba.session.run([x, y], outs, section_types=["bckwd", "opt"])
    raises_and_keeps_store(
        r"since the last 'opt' changed the weights: run \['fwd'\] first",
        input_tensors=[x, y],
        output_tensors=outs,
        section_types=["bckwd"],
    )


def test_gradient_for_a_constant_output_is_refused():
    class WithPrediction(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x, y):
            logits = self.fc(x)
            return torch.nn.functional.cross_entropy(logits, y), logits.argmax(dim=1)

    model = WithPrediction()
    samba.from_torch_model_(model)
    x, y = samba.randn(4, 16, name="x"), samba.randint(4, (4,), name="y")
    outs = utils.trace_graph(model, [x, y], samba.optim.SGD(model.parameters(), lr=0.1))
    raises_and_keeps_store(
        r"gradient was given for output\(s\) \['fc__outputs__0'\]|do not depend",
        input_tensors=[x, y],
        output_tensors=outs,
        grad_of_outputs=[None, torch.ones(4)],
    )


def test_data_parallel_without_a_launcher_is_one_replica(monkeypatch):
    """No torchrun or mpirun variables: a world of one, whose average changes nothing; the run
    (grads, then update) ends where the fused step does, without a warning."""
    import warnings

    from sambaflow.runtime import communicator, launch_env

    for rank_var, size_var, _ in launch_env.LAUNCHERS.values():
        monkeypatch.delenv(rank_var, raising=False)
        monkeypatch.delenv(size_var, raising=False)
    communicator.reset()
    before, after = None, []
    for parallel in (True, False):
        torch.manual_seed(0)
        model = ResFFNLogReg(16, 8, 4)
        samba.from_torch_model_(model)
        x, y = samba.randn(4, 16, name="x", batch_dim=0), samba.randint(4, (4,), name="y", batch_dim=0)
        outs = utils.trace_graph(model, [x, y], samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        before = model.gemm1.weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                samba.session.run([x, y], outs, data_parallel=parallel)
        after.append(samba.session.get_tensors_by_name(model.gemm1.weight.sn_name)[0])
    assert communicator.current().world_size == 1
    assert torch.allclose(after[0], after[1], rtol=1e-5, atol=1e-6)
    assert (after[0] - before).abs().max() > 1e-3  # it trained

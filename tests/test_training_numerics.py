"""20 steps through session.run equal 20 eager PyTorch steps (fp32, reference and inductor backends).

Each test compiles its own graph, 5-15 s with Inductor on CI's two cores. A test whose subject is
what the graph or session decides (seeds, traces, optimizer variants whose update is the same
elementwise code) runs on the reference backend only, where an inductor test of the same code
exists; the comment at each says which."""

from __future__ import annotations

import pytest
import torch

from sambaflow import samba
from sambaflow.samba import utils

from helpers import current_tolerance, make_pair, named_inputs, rel_err, train_side_by_side
from models import BatchNormMLP, DropoutMLP, DropoutProbe, LeNet, Logits, LogReg, ResFFNLogReg

BATCH = 16


@pytest.fixture(autouse=True, params=["reference", pytest.param("inductor", marks=pytest.mark.slow)])
def backend(request, monkeypatch):
    """Every numerics test runs on the reference backend and on Inductor."""
    monkeypatch.setenv("SAMBAFLOW_BACKEND", request.param)
    return request.param


# Runs on the reference backend only (overrides the autouse fixture's parameters).
reference_only = pytest.mark.parametrize("backend", ["reference"], indirect=True)


@pytest.fixture
def tol(backend):
    return current_tolerance()


def mnist_like(features=784):
    return lambda: [torch.randn(BATCH, features), torch.randint(10, (BATCH,))]


def images():
    return [torch.randn(BATCH, 1, 28, 28), torch.randint(10, (BATCH,))]


# Nesterov's update differs from plain momentum by elementwise terms only: compiled once, plain.
@pytest.mark.parametrize(
    "backend,nesterov",
    [("reference", False), ("reference", True), pytest.param("inductor", False, marks=pytest.mark.slow)],
    indirect=["backend"],
)
def test_resffn_sgd_momentum_weight_decay(nesterov):
    train_side_by_side(
        lambda: ResFFNLogReg(784, 64, 10),
        mnist_like(),
        lambda m: samba.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=nesterov),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=nesterov),
    )


def test_resffn_at_a_large_batch():
    """Batch 256: Inductor's pass sums bias and LayerNorm gradients over the batch in row blocks."""
    train_side_by_side(
        lambda: ResFFNLogReg(784, 64, 10),
        lambda: [torch.randn(256, 784), torch.randint(10, (256,))],
        lambda m: samba.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
        steps=10,
    )


# compiled SGD with momentum: test_resffn_sgd_momentum_weight_decay[inductor]
@reference_only
def test_sgd_with_dampening():
    train_side_by_side(
        lambda: LogReg(64, 10),
        mnist_like(64),
        lambda m: samba.optim.SGD(m.parameters(), lr=0.2, momentum=0.8, dampening=0.3),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.8, dampening=0.3),
        steps=5,
    )


# a subset of test_resffn_sgd_momentum_weight_decay[inductor]
@reference_only
def test_logistic_regression_plain_sgd():
    train_side_by_side(
        lambda: LogReg(784, 10),
        mnist_like(),
        lambda m: samba.optim.SGD(m.parameters(), lr=0.05),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
    )


def test_lenet_sgd():
    train_side_by_side(
        LeNet,
        images,
        lambda m: samba.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    )


def test_dropout_mlp_with_p_zero_matches_eager():
    def eager_without_dropout(m):
        m.drop.p = 0.0
        return torch.optim.SGD(m.parameters(), lr=0.1)

    train_side_by_side(
        DropoutMLP,
        mnist_like(64),
        lambda m: samba.optim.SGD(m.parameters(), lr=0.1),
        eager_without_dropout,
        hyper_for_step=lambda step: {"p": 0.0},
    )


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_dropout_rate_follows_hyperparam(p):
    model = DropoutProbe()
    samba.from_torch_model_(model)
    with torch.no_grad():
        model.scale.weight.fill_(1.0)
    x = samba.rand(64, 784, name="x", batch_dim=0)
    x.data.add_(0.5)  # no exact zeros in the input
    outs = utils.trace_graph(model, [x], samba.optim.SGD(model.parameters(), lr=0.0))
    _, dropped = samba.session.run([x], outs, hyperparam_dict={"p": p}, section_types=["fwd"])
    zero_fraction = float((dropped == 0).float().mean())
    assert abs(zero_fraction - p) < 0.02
    kept = dropped[dropped != 0]
    assert torch.allclose(kept, (x.torch()[dropped != 0]) / (1 - p), rtol=1e-6)


# compiled AdamW: the clipping, amsgrad and two-optimizer tests (and test_gpt2.py)
@reference_only
def test_adamw_sambaflow_default_betas():
    train_side_by_side(
        lambda: ResFFNLogReg(64, 32, 10),
        mnist_like(64),
        lambda m: samba.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.997), weight_decay=0.01),
    )


def test_adamw_amsgrad():
    train_side_by_side(
        lambda: LogReg(64, 10),
        mnist_like(64),
        lambda m: samba.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True),
        lambda m: torch.optim.AdamW(
            m.parameters(), lr=1e-2, betas=(0.9, 0.997), weight_decay=0.0, amsgrad=True
        ),
        steps=8,
    )


def test_adamw_with_gradient_clipping_is_active_and_matches():
    max_norm = 0.05
    reference, _ = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    loss, _ = reference(torch.randn(BATCH, 64), torch.randint(10, (BATCH,)))
    loss.backward()
    assert torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9) > max_norm  # clipping will bite
    model, _ = train_side_by_side(
        lambda: ResFFNLogReg(64, 32, 10),
        mnist_like(64),
        lambda m: samba.optim.AdamW(m.parameters(), lr=1e-2, max_grad_norm=max_norm),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.997), weight_decay=0.0),
        clip=max_norm,
    )
    assert samba.session.executable.sections == ["fwd", "bckwd", "gradnorm", "opt"]


def test_two_optimizers_over_two_parameter_groups():
    def samba_optims(m):
        first = [m.gemm1.weight, m.gemm1.bias, m.norm1.weight, m.norm1.bias]
        rest = [p for p in m.parameters() if all(p is not q for q in first)]
        return [samba.optim.SGD(first, lr=0.1, momentum=0.9), samba.optim.AdamW(rest, lr=1e-2)]

    def torch_optims(m):
        first = [m.gemm1.weight, m.gemm1.bias, m.norm1.weight, m.norm1.bias]
        rest = [p for p in m.parameters() if all(p is not q for q in first)]
        return [
            torch.optim.SGD(first, lr=0.1, momentum=0.9),
            torch.optim.AdamW(rest, lr=1e-2, betas=(0.9, 0.997), weight_decay=0.0),
        ]

    train_side_by_side(lambda: ResFFNLogReg(64, 32, 10), mnist_like(64), samba_optims, torch_optims)


# traces are backend-independent; run-time hyperparameters compiled: test_dropout_rate_follows_hyperparam
@reference_only
def test_lr_schedule_through_hyperparam_dict_traces_once():
    traces_before = samba.session.trace_count
    train_side_by_side(
        lambda: ResFFNLogReg(64, 32, 10),
        mnist_like(64),
        lambda m: samba.optim.SGD(m.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4),
        hyper_for_step=lambda step: {"lr": 0.2 * 0.8**step, "weight_decay": 1e-4},
    )
    assert samba.session.trace_count == traces_before + 1


def test_split_sections_equal_one_full_run(tol):
    batches = [mnist_like(64)() for _ in range(4)]
    full_model, split_model = [make_pair(lambda: ResFFNLogReg(64, 32, 10))[1] for _ in range(2)]
    split_model.load_state_dict(full_model.state_dict())
    results = {}
    for label, model, sections in (
        ("full", full_model, None),
        ("split", split_model, [["fwd"], ["bckwd", "opt"]]),
    ):
        optim = samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        outs = utils.trace_graph(model, named_inputs(["x", "y"], batches[0]), optim)
        losses = []
        for batch in batches:
            inputs = named_inputs(["x", "y"], batch)
            if sections is None:
                losses.append(samba.session.run(inputs, outs)[0].torch().clone())
            else:
                losses.append(samba.session.run(inputs, outs, section_types=sections[0])[0].torch().clone())
                samba.session.run(inputs, outs, section_types=sections[1])
        samba.session.to_cpu(model)
        results[label] = (losses, [p.detach().clone() for p in model.parameters()])
    for a, b in zip(results["full"][0] + results["full"][1], results["split"][0] + results["split"][1]):
        assert rel_err(a, b) < tol


def test_host_loss_flow_matches_eager_training(tol):
    reference, model = make_pair(Logits)
    criterion = torch.nn.CrossEntropyLoss()
    optim = samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch_optim = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x = samba.randn(BATCH, 64, name="x", batch_dim=0)
    traced_outputs = utils.trace_graph(model, [x], optim)
    for _ in range(10):
        data, targets = torch.randn(BATCH, 64), torch.randint(10, (BATCH,))
        inputs = [samba.from_torch_tensor(data, name="x", batch_dim=0)]
        partial_output = samba.session.run(
            input_tensors=inputs, output_tensors=traced_outputs, section_types=["fwd"]
        )[0]
        partial_output = samba.to_torch(partial_output)
        partial_output.requires_grad = True
        loss = criterion(partial_output, targets)
        loss.backward()
        samba.session.run(
            input_tensors=inputs,
            output_tensors=traced_outputs,
            grad_of_outputs=(samba.from_torch_tensor(partial_output.grad),),
            section_types=["bckwd", "opt"],
        )
        torch_optim.zero_grad()
        criterion(reference(data), targets).backward()
        assert rel_err(model.fc1.weight.sn_grad, reference.fc1.weight.grad) < tol
        torch_optim.step()
    samba.session.to_cpu(model)
    for got, want in zip(model.parameters(), reference.parameters()):
        assert rel_err(got, want) < tol


def test_sn_grad_seed_set_on_output(tol):
    reference, model = make_pair(Logits)
    x = samba.randn(BATCH, 64, name="x", batch_dim=0, requires_grad=True)
    outs = utils.trace_graph(model, [x], samba.optim.SGD(model.parameters(), lr=0.0))
    seed = torch.randn(BATCH, 10)
    outs[0].sn_grad = seed
    samba.session.run([x], outs, section_types=["fwd", "bckwd"])
    xr = x.torch().detach().clone().requires_grad_()
    reference(xr).backward(seed)
    assert rel_err(model.fc2.weight.sn_grad, reference.fc2.weight.grad) < tol
    assert rel_err(x.sn_grad, xr.grad) < tol


# seeds are a graph pass; compiled gradients: every inductor training test
@reference_only
def test_default_step_gradients_equal_loss_backward(tol):
    """Loss outputs start backward from one, logits from zero: as eager loss.backward()."""
    reference, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    batch = mnist_like(64)()
    outs = utils.trace_graph(
        model, named_inputs(["x", "y"], batch), samba.optim.SGD(model.parameters(), lr=0.0)
    )
    samba.session.run(named_inputs(["x", "y"], batch), outs)
    reference(*batch)[0].backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        assert rel_err(got.sn_grad, want.grad) < tol


# seeds are a graph pass; compiled section programs: test_split_sections_equal_one_full_run
@reference_only
def test_full_step_with_a_logits_seed_reaches_backward(tol):
    """The fused step holds non-loss seeds at zero (no logits-sized input); a run that seeds the
    logits runs the section programs instead and gets eager's gradients."""
    reference, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    batch = mnist_like(64)()
    inputs = named_inputs(["x", "y"], batch)
    outs = utils.trace_graph(model, inputs, samba.optim.SGD(model.parameters(), lr=0.0))
    logits_seed = f"{outs[1].sn_name}__grad"
    assert logits_seed not in samba.session.executable.programs["step"].inputs
    samba.session.run(inputs, outs)
    assert logits_seed not in samba.session.store
    seed = torch.randn(BATCH, 10)
    samba.session.run(inputs, outs, grad_of_outputs=[None, seed])
    loss, logits = reference(*batch)
    (loss + (logits * seed).sum()).backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        assert rel_err(got.sn_grad, want.grad) < tol


class PerSampleLoss(torch.nn.Module):
    """A per-sample loss first and the logits second, as SambaFlow's GPT-2 tutorial returns them."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x, y):
        logits = self.fc(x)
        return torch.nn.functional.cross_entropy(logits, y, reduction="none"), logits


# seeds are a graph pass; compiled per-token loss with a vector seed: tests/test_gpt2_app.py
@reference_only
def test_per_sample_loss_seeded_each_step_runs_the_fused_step(tol):
    reference, model = make_pair(PerSampleLoss)
    batch = mnist_like(64)()
    inputs = named_inputs(["x", "y"], batch)
    outs = utils.trace_graph(model, inputs, samba.optim.SGD(model.parameters(), lr=0.0))
    step = samba.session.executable.programs["step"]
    assert f"{outs[0].sn_name}__grad" in step.inputs and f"{outs[1].sn_name}__grad" not in step.inputs
    weights = torch.rand(BATCH)
    outs[0].sn_grad = weights
    samba.session.run(inputs, outs)
    reference(*batch)[0].backward(weights)
    for got, want in zip(model.parameters(), reference.parameters()):
        assert rel_err(got.sn_grad, want.grad) < tol


# to_rdu / to_cpu and the host memory the store shares: test_weights_once.py (reference backend),
# test_to_rdu_pushes_host_weights_the_app_rebound; compiled in-place updates of that memory:
# test_step_updates_parameters_in_place[inductor]


# the graph's sections; compiled forward-only graphs: test_gpt2.py, test_apps_e2e.py
@reference_only
def test_inference_trace_is_forward_only(tol):
    reference, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    batch = mnist_like(64)()
    outs = utils.trace_graph(model, named_inputs(["x", "y"], batch), None, init_output_grads=False)
    graph = samba.session.executable.graph
    assert graph.sections == ["fwd"]
    assert all(s.role in ("input", "param", "buffer") for s in graph.inputs)
    loss, out = samba.session.run(named_inputs(["x", "y"], batch), outs)
    want_loss, want_out = reference(*batch)
    assert rel_err(loss, want_loss) < tol and rel_err(out, want_out) < tol


def test_optimizer_state_dict_round_trip_in_torch_format():
    reference, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    optim = samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    outs = utils.trace_graph(model, named_inputs(["x", "y"], mnist_like(64)()), optim)
    for _ in range(3):
        samba.session.run(named_inputs(["x", "y"], mnist_like(64)()), outs, hyperparam_dict={"lr": 0.05})
    samba.session.to_cpu(model, optim)
    state = optim.state_dict()
    torch_optim = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch_optim.load_state_dict(state)  # torch accepts our format
    assert state["param_groups"][0]["lr"] == pytest.approx(0.05)
    fresh = samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    fresh.load_state_dict(torch_optim.state_dict())
    for i in range(len(fresh.params)):
        assert torch.equal(fresh.state_of(i)["momentum_buffer"], optim.state_of(i)["momentum_buffer"])


def test_step_updates_parameters_in_place():
    """A step writes new weights and momenta into the device tensors: no new parameter memory. On
    the CPU the weights are the host parameters' own memory, so the host sees them before to_cpu."""
    _, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    optim = samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = utils.trace_graph(model, named_inputs(["x", "y"], mnist_like(64)()), optim)
    names = [p.sn_name for p in model.parameters()] + [
        f"{p.sn_name}__momentum_buffer" for p in model.parameters()
    ]
    store = samba.session.store
    before = {n: (store[n].data_ptr(), store[n].clone()) for n in names}
    for _ in range(2):
        samba.session.run(named_inputs(["x", "y"], mnist_like(64)()), outs)
    for name in names:
        assert store[name].data_ptr() == before[name][0], f"{name} was reallocated"
        assert not torch.equal(store[name], before[name][1]), f"{name} did not change"
    for param in model.parameters():
        assert store[param.sn_name].data_ptr() == param.data_ptr(), f"{param.sn_name} is a copy"


def test_to_rdu_pushes_host_weights_the_app_rebound():
    """`param.data = new` then to_rdu: the device runs on the new values (and, on the CPU, holds
    the new tensor itself); before to_rdu it still ran on the old ones."""
    reference, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    batch = mnist_like(64)()
    outs = utils.trace_graph(
        model, named_inputs(["x", "y"], batch), samba.optim.SGD(model.parameters(), lr=0.1)
    )
    for param, ref in zip(model.parameters(), reference.parameters()):
        param.data = param.detach() * 0.5
        ref.data = ref.detach() * 0.5
    stale, _ = samba.session.run(named_inputs(["x", "y"], batch), outs, section_types=["fwd"])
    samba.session.to_rdu(model)
    fresh, _ = samba.session.run(named_inputs(["x", "y"], batch), outs, section_types=["fwd"])
    want, _ = reference(*batch)
    assert rel_err(fresh, want) < current_tolerance() and rel_err(stale, want) > 1e-3
    assert all(samba.session.store[p.sn_name].data_ptr() == p.data_ptr() for p in model.parameters())


def test_batchnorm_running_statistics_follow_eager():
    model, reference = train_side_by_side(
        BatchNormMLP,
        mnist_like(64),
        lambda m: samba.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        steps=5,
    )
    assert int(model.bn.num_batches_tracked) == 5
    assert rel_err(model.bn.running_mean, reference.bn.running_mean) < current_tolerance()
    assert rel_err(model.bn.running_var, reference.bn.running_var) < current_tolerance()

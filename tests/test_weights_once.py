"""Weights held once on the CPU: the device store owns the host parameters' memory (to_rdu shares
it, the programs update it in place), and to_cpu / to_rdu keep their meaning for apps that call
them. Reference backend; test_training_numerics.py checks the compiled in-place update of shared
memory (test_step_updates_parameters_in_place[inductor]) and to_rdu after `param.data = new` on
both backends (test_to_rdu_pushes_host_weights_the_app_rebound)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sambaflow import samba
from sambaflow.app.gold import test_against_cpu as against_cpu
from sambaflow.samba import utils
from sambaflow.tensors.model import buffer_name

from helpers import current_tolerance, make_pair, named_inputs, rel_err
from models import BatchNormMLP, ResFFNLogReg

BATCH = 16


def batch(features=64):
    return [torch.randn(BATCH, features), torch.randint(10, (BATCH,))]


def traced(model, lr=0.5, momentum=0.0):
    optim = samba.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return utils.trace_graph(model, named_inputs(["x", "y"], batch()), optim)


def host_tensors(model):
    buffers = [(buffer_name(path), b) for path, b in model.named_buffers()]
    return [(p.sn_name, p) for p in model.parameters()] + buffers


def device_values(model):
    names = [p.sn_name for p in model.parameters()]
    return dict(zip(names, samba.session.get_tensors_by_name(names)))


def test_store_holds_the_host_memory_of_parameters_and_buffers():
    _, model = make_pair(lambda: BatchNormMLP())
    traced(model)
    store = samba.session.store
    for name, tensor in host_tensors(model):
        assert store[name].data_ptr() == tensor.data_ptr(), f"{name} is a second copy"
        assert type(store[name]) is torch.Tensor and not store[name].requires_grad


def test_host_weights_show_the_device_values_after_steps_without_to_cpu():
    reference, model = make_pair(lambda: BatchNormMLP())
    outs = traced(model)
    torch_optim = torch.optim.SGD(reference.parameters(), lr=0.5)
    for _ in range(3):
        data = batch()
        samba.session.run(named_inputs(["x", "y"], data), outs)
        torch_optim.zero_grad()
        reference(*data)[0].backward()
        torch_optim.step()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(got, want) < current_tolerance(), f"{name} does not show the device's step"
        assert torch.equal(got.detach(), device_values(model)[got.sn_name].torch())
    assert int(model.bn.num_batches_tracked) == 3  # a buffer the step updates in place
    assert rel_err(model.bn.running_mean, reference.bn.running_mean) < current_tolerance()
    samba.session.to_cpu(model)  # nothing to copy, and harmless
    assert all(
        rel_err(p, q) < current_tolerance() for p, q in zip(model.parameters(), reference.parameters())
    )
    loss, _ = model(*batch())  # the host model still runs in plain eager PyTorch, autograd too
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rebound_param_without_to_rdu_comes_back_with_to_cpu():
    """The device keeps training the memory it was given; to_cpu copies it into the new tensor."""
    _, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    outs = traced(model)
    weight = model.gemm1.weight
    model.gemm1.weight.data = torch.zeros_like(weight)
    samba.session.run(named_inputs(["x", "y"], batch()), outs)
    assert torch.count_nonzero(weight) == 0
    samba.session.to_cpu(model)
    assert torch.equal(weight.detach(), device_values(model)[weight.sn_name].torch())
    assert torch.count_nonzero(weight) > 0


def test_to_rdu_after_load_state_dict_pushes_the_checkpoint():
    reference, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    outs = traced(model, lr=0.0)
    checkpoint = ResFFNLogReg(64, 32, 10).state_dict()
    reference.load_state_dict(checkpoint)
    model.load_state_dict(checkpoint)
    samba.session.to_rdu(model)
    data = batch()
    got, _ = samba.session.run(named_inputs(["x", "y"], data), outs, section_types=["fwd"])
    assert rel_err(got, reference(*data)[0]) < current_tolerance()


class Tied(nn.Module):
    """An embedding and an output layer that share one Parameter (GPT-2's wte and lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(torch.tanh(self.embed(ids)))
        return nn.functional.cross_entropy(logits, labels), logits


def test_tied_weights_are_one_store_entry_in_the_host_memory():
    reference, model = make_pair(Tied)
    optim = samba.optim.SGD(model.parameters(), lr=0.5)
    ids, labels = torch.randint(10, (BATCH,)), torch.randint(10, (BATCH,))
    outs = utils.trace_graph(model, named_inputs(["ids", "labels"], [ids, labels]), optim)
    weight = model.embed.weight
    params = [n for n, t in samba.session.store.items() if t.data_ptr() == weight.data_ptr()]
    assert params == [weight.sn_name] and model.head.weight is weight
    samba.session.run(named_inputs(["ids", "labels"], [ids, labels]), outs)
    torch_optim = torch.optim.SGD(reference.parameters(), lr=0.5)
    reference(ids, labels)[0].backward()
    torch_optim.step()
    assert rel_err(weight, reference.embed.weight) < current_tolerance()


def test_a_tensor_that_cannot_be_shared_is_copied_and_to_cpu_brings_it_back():
    """A transposed (not contiguous) weight and one that views another parameter's memory."""
    _, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    model.gemm2.weight.data = model.gemm2.weight.detach().t().contiguous().t()
    model.gemm3.bias.data = model.gemm1.bias.detach()[:10]  # views gemm1.bias: stored first, shared
    outs = traced(model)
    store = samba.session.store
    assert store[model.gemm2.weight.sn_name].data_ptr() != model.gemm2.weight.data_ptr()
    assert store[model.gemm1.bias.sn_name].data_ptr() == model.gemm1.bias.data_ptr()
    assert store[model.gemm3.bias.sn_name].data_ptr() != model.gemm3.bias.data_ptr()
    before = model.gemm2.weight.detach().clone()
    samba.session.run(named_inputs(["x", "y"], batch()), outs)
    assert torch.equal(model.gemm2.weight, before)  # the device trained its own copy
    samba.session.to_cpu(model)
    device = device_values(model)
    assert torch.equal(model.gemm2.weight.detach(), device[model.gemm2.weight.sn_name].torch())
    assert not torch.equal(model.gemm2.weight, before)


def test_test_command_starts_the_gold_model_from_the_device_weights(capsys):
    """After training steps, `test` compares against eager PyTorch from the device's weights, also
    for a weight the device holds a copy of (the host's is stale until to_cpu)."""
    _, model = make_pair(lambda: ResFFNLogReg(64, 32, 10))
    model.gemm2.weight.data = model.gemm2.weight.detach().t().contiguous().t()
    inputs = named_inputs(["x", "y"], batch())
    utils.trace_graph(model, inputs, samba.optim.SGD(model.parameters(), lr=0.5))
    for _ in range(3):
        samba.session.run(named_inputs(["x", "y"], batch()), model.output_tensors)
    host = copy.deepcopy(model.state_dict())
    assert against_cpu(model, inputs), capsys.readouterr().out
    assert all(torch.equal(v, host[k]) for k, v in model.state_dict().items())  # test changed no weight

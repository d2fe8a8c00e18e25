"""The graph's peak-memory estimate (passes/memory.py) and the fit check trace_graph makes with it.

An op-by-op backend keeps every new weight and optimizer moment until the step ends, where they
are written back; Inductor computes the update inside the kernels that write the stored tensors.
The estimates must tell these apart: the fit check refused a 1.1 B-parameter AdamW step that
Inductor runs in 19.6 GiB (benchmarks/RESULTS.md), on the op-by-op count.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from sambaflow import samba
from sambaflow.backends.inductor import available, compiling
from sambaflow.errors import SambaArgumentError
from sambaflow.host_memory import gib
from sambaflow.passes.memory import peak_computed_bytes
from sambaflow.passes.sections import SectionProgram
from sambaflow.runtime.executable import programs_of
from sambaflow.trace.tracer import trace_step

WIDTH, BATCH = 256, 2


def wide_mlp_step():
    """An AdamW step, clipped to a global norm, where the weights outweigh the activations."""
    torch.manual_seed(0)
    model = samba.from_torch_model_(
        nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
    )
    x = samba.randn(BATCH, WIDTH, name="x", batch_dim=0)
    optim = samba.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01, max_grad_norm=1.0)
    graph = trace_step(model, (x,), [optim])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return programs_of(graph)["step"], weight_bytes


@pytest.fixture(scope="module")
def step_and_weights():
    return wide_mlp_step()


def test_fused_estimate_counts_the_gradients_not_the_updates(step_and_weights):
    step, weights = step_and_weights
    fused = peak_computed_bytes(step.module, fused=True)
    # the global-norm clip needs every gradient at once; the update itself stores nothing new
    assert weights <= fused < weights + weights // 4, (fused, weights)


def test_op_by_op_estimate_keeps_every_new_weight_and_moment(step_and_weights):
    step, weights = step_and_weights
    op_by_op = peak_computed_bytes(step.module)
    # new weights and both new moments wait for the write-back at the end, beside the gradients
    assert op_by_op >= 4 * weights, (op_by_op, weights)
    assert op_by_op > peak_computed_bytes(step.module, fused=True)


def _estimate(fn, *shapes: tuple[int, ...], fused: bool = False) -> int:
    module = make_fx(fn, tracing_mode="fake")(*(torch.randn(s) for s in shapes))
    return peak_computed_bytes(module, fused=fused)


def test_a_view_keeps_its_base_alive_and_costs_nothing():
    def fn(x):
        doubled = x * 2
        flat = doubled.view(-1)  # `doubled`'s last direct use: it must stay, `flat` reads it
        later = x + 1
        return flat.sum() + later.sum()

    size = 1000 * 4
    # doubled and later alive together, then their sums (4 bytes each)
    assert _estimate(fn, (1000,)) == 2 * size + 4
    # both feed reductions only, so they are computed inside them: only the three scalars are stored
    assert _estimate(fn, (1000,), fused=True) == 3 * 4


def test_an_in_place_write_allocates_nothing():
    def fn(w, g):
        return w.copy_(w - 0.1 * g)

    assert _estimate(fn, (1000,), (1000,)) == 2 * 4000  # 0.1 * g, then w - that
    assert _estimate(fn, (1000,), (1000,), fused=True) == 0


def test_an_elementwise_value_a_matmul_reads_is_stored():
    def fn(w, x):
        return (w.to(torch.bfloat16) @ x.to(torch.bfloat16)).float()

    stored = 64 * 64 * 2 * 2 + 64 * 64 * 2  # both casts, and the product; then its float copy
    assert _estimate(fn, (64, 64), (64, 64), fused=True) == stored


def test_compile_examples_hold_no_data():
    """Inductor's example inputs are layouts only: real ones were a second copy of the weights and
    optimizer state while compiling (13.2 GiB more for a 1.1 B-parameter AdamW step)."""
    huge = (2**17, 2**17)  # 64 GiB of float32
    module = make_fx(lambda w: w * 2, tracing_mode="fake")(torch.empty(huge, device="meta"))
    examples = compiling._examples(SectionProgram("p", module, ["w"], ["out"]))
    assert isinstance(examples[0], torch._subclasses.FakeTensor) and examples[0].shape == huge


def test_fit_check_refuses_op_by_op_and_names_inductor(monkeypatch):
    monkeypatch.setenv("SAMBAFLOW_MEMORY_LIMIT", "10K")
    samba.session.reset()
    model = samba.from_torch_model_(nn.Linear(WIDTH, WIDTH))
    x = samba.randn(BATCH, WIDTH, name="x", batch_dim=0)
    optim = samba.optim.AdamW(model.parameters(), lr=0.01)
    with pytest.raises(SambaArgumentError, match="one step .* needs .* the inductor backend, which writes"):
        samba.utils.trace_graph(model, (x,), [optim], backend="reference")


@pytest.mark.skipif(not available()[0], reason=f"inductor unavailable: {available()[1]}")
def test_fit_check_counts_the_optimizer_state_the_store_allocates(monkeypatch):
    """AdamW's two moments are allocated by the device store after the check: they count, and the
    message says how much of the need they are."""
    monkeypatch.setenv("SAMBAFLOW_MEMORY_LIMIT", "10K")
    samba.session.reset()
    model = samba.from_torch_model_(nn.Linear(1024, 1024, bias=False))
    x = samba.randn(1, 1024, name="x", batch_dim=0)
    optim = samba.optim.AdamW(model.parameters(), lr=0.01)
    moments = 2 * 1024 * 1024 * 4
    stored = gib(moments + 4 + 1024 * 4)  # and the 0-d step count, and the input buffer
    with pytest.raises(SambaArgumentError) as refused:
        samba.utils.trace_graph(model, (x,), [optim], backend="inductor")
    message = str(refused.value)
    assert f"and {stored} of optimizer state and inputs the device store allocates" in message
    assert "the stored state is most of it" in message

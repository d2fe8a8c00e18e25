"""What the inductor backend changes in a graph: the ATen rewrites before compiling
(sambaflow/backends/rewrites.py) and the pass Inductor runs after its decompositions
(sambaflow/backends/inductor_passes.py).

These run the rewritten graphs eagerly (no compile): they check the formulas themselves.
tests/test_inductor_backend.py checks the same rewrites after Inductor compiled them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sambaflow.backends.inductor_passes import BlockedBatchSums
from sambaflow.backends.rewrites import rewrite_for_inductor

from helpers import check_tanh, tanh_inputs

aten = torch.ops.aten


def rewritten(fn, *examples: torch.Tensor) -> torch.fx.GraphModule:
    return rewrite_for_inductor(make_fx(fn, tracing_mode="fake")(*examples))


def called(module: torch.fx.GraphModule) -> set:
    return {n.target for n in module.graph.nodes if n.op == "call_function"}


def test_fast_tanh_is_within_a_few_ulp_of_torch_tanh():
    x = tanh_inputs(seed=1)
    module = rewritten(torch.tanh, x)
    assert aten.tanh.default not in called(module)
    check_tanh(module(x), x)
    check_tanh(torch.tanh(x), x, bound=1.2e-7)  # eager's own float32 tanh, for scale


def test_fast_tanh_keeps_nan():
    x = torch.tensor([float("nan"), 1.0, float("nan")])
    assert rewritten(torch.tanh, x)(x).isnan().tolist() == [True, False, True]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tanh_of_other_dtypes_is_left_alone(dtype):
    x = torch.randn(16).to(dtype)
    assert aten.tanh.default in called(rewritten(torch.tanh, x))


def test_tanh_gradient_through_the_rewritten_step():
    """The traced backward reads tanh's output (tanh_backward); it must see the rewritten value."""

    def step(x):
        y = torch.tanh(x * 3)
        (grad,) = torch.autograd.grad(y.sum(), x)
        return y, grad

    x = torch.randn(4096, requires_grad=True)
    module = rewritten(step, x)
    y, grad = module(x.detach())
    torch.testing.assert_close(y, torch.tanh(x.detach() * 3), rtol=3e-7, atol=0)
    # 3 (1 - y^2): y's few-ulp difference shows up absolutely where y^2 is near 1
    torch.testing.assert_close(grad, 3 * (1 - torch.tanh(x.detach() * 3) ** 2), rtol=1e-5, atol=2e-6)
    assert not torch.allclose(grad, 1 - y**2, atol=1e-2), "the gradient lost its factor 3"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_backward_row_sums_are_written_out_exactly(reduction):
    """The rewritten log-softmax backward of an NLL loss gives eager's gradient (up to an ulp of
    `exp`), ignored targets included, and no longer sums over the classes."""

    def step(logits, target, seed):
        loss = torch.nn.functional.cross_entropy(logits, target, reduction=reduction, ignore_index=-100)
        (grad,) = torch.autograd.grad(loss, logits, seed)
        return grad

    logits = torch.randn(64, 1000, requires_grad=True)
    target = torch.randint(1000, (64,))
    target[::5] = -100
    seed = torch.rand(64) if reduction == "none" else torch.rand(())
    module = rewritten(step, logits, target, seed)
    assert aten._log_softmax_backward_data.default not in called(module)
    want = step(logits, target, seed)
    # a lost ignore_index or division by the target count is off by ~1e-5 here
    torch.testing.assert_close(module(logits, target, seed), want, rtol=1e-6, atol=1e-8 * want.abs().max())


def test_weighted_cross_entropy_backward_is_left_alone():
    def step(logits, target, weight):
        loss = torch.nn.functional.cross_entropy(logits, target, weight=weight)
        return torch.autograd.grad(loss, logits)[0]

    examples = torch.randn(8, 10, requires_grad=True), torch.randint(10, (8,)), torch.rand(10)
    module = rewritten(step, *examples)
    assert aten._log_softmax_backward_data.default in called(module)


def test_alpha_becomes_an_explicit_product():
    a, p = torch.randn(8, 4), torch.randn(8, 4)
    module = rewritten(lambda a, p: (a.add(p, alpha=1e-4), a.sub(p, alpha=3.0), a.add(p)), a, p)
    alphas = [n.kwargs.get("alpha") for n in module.graph.nodes if n.op == "call_function"]
    assert alphas == [None] * len(alphas)
    added, subtracted, plain = module(a, p)
    torch.testing.assert_close(added, a + 1e-4 * p, rtol=0, atol=0)
    torch.testing.assert_close(subtracted, a - 3.0 * p, rtol=0, atol=0)
    torch.testing.assert_close(plain, a + p, rtol=0, atol=0)


def adamw_like(p, m, g, step, beta, lr):
    """AdamW's shape: a bias correction from a pow of the step, read by a loop over the parameter."""
    bias = 1 - beta ** (step + 1).to(torch.float64)
    return p - (lr / bias) * (m + (1 - beta) * (g - m)), step + 1


def test_scalar_powers_are_stored_once_for_the_loops_that_read_them():
    args = [torch.randn(4096) for _ in range(3)]
    args += [
        torch.tensor(3.0),
        torch.tensor(0.9, dtype=torch.float64),
        torch.tensor(1e-3, dtype=torch.float64),
    ]
    module = rewritten(adamw_like, *args)
    stored = [n for n in module.graph.nodes if n.target is aten.as_strided.default]
    assert len(stored) == 1, "only the power is costly ((1 - beta), lr / bias and step + 1 stay inline)"
    (node,) = stored
    assert node.args[0].target is aten.pow.Tensor_Tensor and not node.args[0].users.keys() - {node}
    for got, want in zip(module(*args), adamw_like(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rewrite_leaves_the_source_graph_untouched():
    x = torch.randn(8)
    original = make_fx(torch.tanh, tracing_mode="fake")(x)
    rewrite_for_inductor(copy.deepcopy(original))
    assert aten.tanh.default in called(original)


# --- Inductor's post-grad pass: sums over the batch in row blocks --------------------------------------
def batch_sums(x, g):
    return x.sum(0), (x * g).sum(0, keepdim=True), x.sum(1), x[:100].sum(0)


def test_batch_sums_are_split_into_row_blocks():
    x, g = torch.randn(256, 48), torch.randn(256, 48)
    module = make_fx(batch_sums, tracing_mode="fake")(x, g)
    BlockedBatchSums()(module.graph)
    module.recompile()
    sums = [n for n in module.graph.nodes if n.target is aten.sum.dim_IntList]
    shapes = sorted(tuple(n.meta["val"].shape) for n in sums)
    # two sums over 256 rows split (16 partial rows each), the row sum and the 100-row sum left alone
    assert shapes == sorted([(16, 48), (48,), (16, 48), (1, 48), (256,), (48,)]), shapes
    exact = batch_sums(x.double(), g.double())
    for got, want in zip(module(x, g), exact):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_batch_sums_pass_keys_inductors_cache_to_its_source():
    assert BlockedBatchSums().uuid() == BlockedBatchSums().uuid()
    assert isinstance(BlockedBatchSums().uuid(), (str, bytes))


def test_batch_sums_pass_leaves_full_sums_alone():
    x = torch.randn(256, 48)
    module = make_fx(lambda x: (torch.ops.aten.sum.dim_IntList(x, None), x.sum()), tracing_mode="fake")(x)
    before = module.code
    BlockedBatchSums()(module.graph)
    module.recompile()
    assert module.code == before

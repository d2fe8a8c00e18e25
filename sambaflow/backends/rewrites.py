"""ATen graph rewrites the inductor backend applies before TorchInductor compiles a program.

Each one works around what Inductor (torch 2.13, CPU) does with a plain ATen op:

- `explicit_alpha`: Inductor fuses `mm(a, b).add(p, alpha=c)` into `addmm` and loses `alpha`
  (the result is `mm + p`, silently). Writing every `add/sub(x, y, alpha=a)` as `x ± y * a` keeps
  any graph (a user's model, a hand-written optimizer) safe from it.
- `fast_tanh`: Inductor lowers `tanh` to SLEEF's `tanhf16_u10`, about 6x slower than `exp` here
  (a fused LayerNorm + tanh over 1024 x 1024 floats: 1.2 ms, of which ~0.5 ms is the tanh).
  For float32 it is rewritten as `x * p(x^2)` (Taylor, |x| < 0.125) or `sign(x) (1 - t) / (1 + t)`
  with `t = exp(-2|x|)`: within 2.5e-7 relative error of `torch.tanh` everywhere (tiny, huge,
  +-inf, -0.0 and NaN included; eager's own float32 tanh is 6e-8 from the exact value). Inductor's
  own `cpp.use_decompose_tanh` (`2 / (1 + exp(-2x)) - 1`) is not used: near 0 it loses every digit.
- `nll_softmax_backward`: the backward of cross-entropy is `g - exp(log_probs) * sum(g, 1)` with
  `g = nll_loss_backward(...)`, a one-hot of the targets. Inductor fuses the row sum over `g`'s
  formula (it loads nothing along the classes) and vectorises it across rows instead, with a
  scalar loop over the classes: 73 ms of a 157 ms GPT-2 step for a 50257-token vocabulary. Each
  row of `g` holds one non-zero, `-grad / total_weight` (mean) or `-grad` (sum, none), or none
  where the target is `ignore_index`, so the row sum is written out as exactly that value:
  the same bits as the summed row, and no reduction left to mis-vectorise.
- `scalars_computed_once`: a one-element power (AdamW's `beta ** step`) read by a large fused
  loop is recomputed by Inductor inside that loop, once per vector of 16 floats: it does not hoist
  loop-invariant code, and for GPT-2 small that was two double-precision `pow` calls per
  parameter per vector, 5% of the step. An identity `as_strided` after the power makes Inductor
  store it (its lowering materialises its input), so it is computed once; the cheap arithmetic
  after it stays inline (storing whole chains, down to `lr / bias1`, moved Inductor's schedule so
  that the GPT-2 small step held 150 MB more at its peak).
- `vector_matmul`: an `mm`/`addmm` of one row by a transposed weight (`x @ w.t()`, the token
  program of cached generation at batch 1), in bfloat16 or float32. ATen sends it to oneDNN or
  MKL, which read the weight well below the memory bandwidth for one row: in bf16 no faster than
  fp32 (Intel, avx512_bf16 and AMX), so bf16 weights, half the bytes, bought nothing; in fp32 on
  an AMD EPYC, GPT-2's 50257 x 768 LM head at 13 GB/s of a measured 30.
  Written as `(x[:, :, None].float() * w.t()[None].float()).sum(1)`, Inductor streams the weight
  rows once, accumulating in float32 as oneDNN does: bf16 1.2x (768 x 50257) to 1.75x (3072 x
  768) faster (Intel), fp32 the LM head 2x (AMD), each measured one thread, interleaved. Only the
  one-row form with the reduction along the weight's contiguous rows is rewritten: GPT-2's
  `[K, N]` Conv1D weights and more rows than one were slower that way (`KVCacheLM` stores Conv1D
  weights column-major, models/kv_cache.py, so their one-row products take this form too).
  GPT-2-small-like generation with both: fp32 1.20x -> 1.77x HF eager's tokens/s, bf16
  1.17x -> 1.64x (AMD; benchmarks/RESULTS.md).

`SAMBAFLOW_REWRITES_OFF=fast_tanh,...` leaves rewrites out (the compile cache keys on it): `test`
suggests it when one of them changes the value of the first node that differs from PyTorch.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import fx

from sambaflow.errors import SambaBackendError

aten = torch.ops.aten

#: below this |x|, tanh(x) comes from its Taylor series (next term: 62 x^9 / 2835 < 2e-9 relative)
TANH_TAYLOR_BELOW = 0.125
_TANH_TAYLOR = (1.0, -1.0 / 3.0, 2.0 / 15.0, -17.0 / 315.0)  # coefficients of x, x^3, x^5, x^7


#: the dtypes `vector_matmul` rewrites (models/kv_cache.py lays out GPT-2's weights for it in these)
VECTOR_MATMUL_DTYPES = (torch.bfloat16, torch.float32)

#: the rewrites, in the order they apply (by name: `test` tries each one alone, app/bisect.py)
REWRITES = (
    "explicit_alpha",
    "fast_tanh",
    "nll_softmax_backward",
    "scalars_computed_once",
    "vector_matmul",
)
#: names of rewrites to leave out, comma-separated (to rule one out when a compiled program is wrong)
REWRITES_OFF_VARIABLE = "SAMBAFLOW_REWRITES_OFF"


def rewrites_off() -> list[str]:
    """The rewrites `$SAMBAFLOW_REWRITES_OFF` turns off; an unknown name is an error."""
    names = [n.strip() for n in os.environ.get(REWRITES_OFF_VARIABLE, "").split(",") if n.strip()]
    unknown = [n for n in names if n not in REWRITES]
    if unknown:
        raise SambaBackendError(
            f"${REWRITES_OFF_VARIABLE}: unknown rewrite(s) {unknown}; the rewrites are {list(REWRITES)}"
        )
    return names


def rewrite_for_inductor(module: fx.GraphModule) -> fx.GraphModule:
    """Apply every rewrite not turned off to `module` in place and recompile it."""
    off = rewrites_off()
    for name in REWRITES:
        if name not in off:
            apply_rewrite(name, module.graph)
    module.recompile()
    return module


def apply_rewrite(name: str, graph: fx.Graph) -> None:
    # Looked up by name when called, so a test can replace one (tests/test_bisect.py breaks one).
    globals()[name](graph)


def explicit_alpha(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        alpha = node.kwargs.get("alpha", 1) if node.op == "call_function" else 1
        if node.target in (aten.add.Tensor, aten.sub.Tensor) and alpha != 1:
            with graph.inserting_before(node):
                scaled = graph.call_function(aten.mul.Tensor, (node.args[1], alpha))
            scaled.meta = dict(node.args[1].meta) if isinstance(node.args[1], fx.Node) else {}
            node.args = (node.args[0], scaled)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "alpha"}


def fast_tanh(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.tanh.default and _is_float32(node):
            _replace(graph, node, _tanh_nodes, node.args[0])


def _is_float32(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


def _tanh_nodes(graph: fx.Graph, x: fx.Node) -> fx.Node:
    def op(target, *args):
        return graph.call_function(target, args)

    magnitude = op(aten.abs.default, x)
    t = op(aten.exp.default, op(aten.mul.Tensor, magnitude, -2.0))
    large = op(
        aten.div.Tensor, op(aten.add.Tensor, op(aten.neg.default, t), 1.0), op(aten.add.Tensor, t, 1.0)
    )
    signed = op(aten.where.self, op(aten.lt.Scalar, x, 0.0), op(aten.neg.default, large), large)
    square = op(aten.mul.Tensor, x, x)
    series = _TANH_TAYLOR[-1]
    for coefficient in reversed(_TANH_TAYLOR[:-1]):  # Horner in x^2
        series = op(aten.add.Tensor, op(aten.mul.Tensor, square, series), coefficient)
    small = op(aten.mul.Tensor, x, series)
    return op(aten.where.self, op(aten.lt.Scalar, magnitude, TANH_TAYLOR_BELOW), small, signed)


def nll_softmax_backward(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        one_hot = _nll_gradient_of(node)
        if one_hot is not None:
            _replace(graph, node, _nll_gradient_nodes, node, one_hot)


def _nll_gradient_nodes(graph: fx.Graph, node: fx.Node, one_hot: fx.Node) -> fx.Node:
    """`one_hot - exp(log_probs) * row_sums`: the log-softmax gradient of an NLL loss."""
    row_sums = _nll_row_sums(graph, one_hot)
    scaled = graph.call_function(
        aten.mul.Tensor, (graph.call_function(aten.exp.default, (node.args[1],)), row_sums)
    )
    return graph.call_function(aten.sub.Tensor, (one_hot, scaled))


def _nll_gradient_of(node: fx.Node) -> fx.Node | None:
    """`g` when `node` is `_log_softmax_backward_data(g, out, 1, ...)` of an unweighted 2-D NLL loss."""
    if node.op != "call_function" or node.target is not aten._log_softmax_backward_data.default:
        return None
    grad, out, dim = node.args[:3]
    if not isinstance(grad, fx.Node) or grad.target is not aten.nll_loss_backward.default:
        return None
    log_probs, weight = grad.args[1], grad.args[3]
    same = [_value(n) for n in (node, grad, out, log_probs)]
    if weight is not None or dim != 1 or any(v is None for v in same):
        return None
    if len({(v.shape, v.dtype) for v in same}) != 1 or same[0].dim() != 2:
        return None
    return grad


def _nll_row_sums(graph: fx.Graph, one_hot: fx.Node) -> fx.Node:
    """Each row's single non-zero of `nll_loss_backward` (as ATen's kernel computes it), as a column."""

    def op(target, *args):
        return graph.call_function(target, args)

    grad_output, _, target, _, reduction, ignore_index, total_weight = one_hot.args
    if reduction == 1:  # mean
        grad_output = op(aten.div.Tensor, grad_output, total_weight)
    value = op(aten.neg.default, grad_output)
    zero = op(aten.zeros_like.default, value)
    valid = op(aten.ne.Scalar, target, ignore_index)
    return op(aten.unsqueeze.default, op(aten.where.self, valid, value, zero), 1)


#: transcendental math, ~20-40 ns a call in double: costly when redone for every vector of a loop
_COSTLY_SCALAR_OPS = {
    aten.pow.Tensor_Tensor,
    aten.pow.Tensor_Scalar,
    aten.pow.Scalar,
    aten.exp.default,
    aten.log.default,
}


def scalars_computed_once(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _COSTLY_SCALAR_OPS and _is_one_element(node):
            value = _value(node)
            users = list(node.users)
            with graph.inserting_after(node):
                stored = graph.call_function(
                    aten.as_strided.default, (node, list(value.shape), list(value.stride()))
                )
            stored.meta = dict(node.meta)
            for user in users:
                user.replace_input_with(node, stored)


def vector_matmul(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        operands = _row_times_transposed(node)
        if operands is None:
            continue
        _replace(graph, node, _reduction_nodes, *operands)


def _row_times_transposed(node: fx.Node) -> tuple[fx.Node, fx.Node, object] | None:
    """(row, matrix, bias) of `mm(row, matrix)` / `addmm(bias, row, matrix)` worth rewriting."""
    if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
        return None
    if node.target is aten.addmm.default and (node.kwargs or len(node.args) != 3):
        return None  # beta/alpha given: leave it to ATen
    bias, row, matrix = node.args if node.target is aten.addmm.default else (None, *node.args)
    values = [_value(n) for n in (node, row, matrix)]
    if any(v is None for v in values) or any(v.dtype not in VECTOR_MATMUL_DTYPES for v in values):
        return None
    row_value, matrix_value = values[1], values[2]
    if row_value.device.type != "cpu" or row_value.shape[0] != 1 or matrix_value.stride(0) != 1:
        return None
    return row, matrix, bias


def _reduction_nodes(graph: fx.Graph, row: fx.Node, matrix: fx.Node, bias: object) -> fx.Node:
    def op(target, *args):
        return graph.call_function(target, args)

    def float32(node: fx.Node) -> fx.Node:
        if _value(row).dtype == torch.float32:
            return node
        wide = op(aten._to_copy.default, node)
        wide.kwargs = {"dtype": torch.float32}
        return wide

    wide_row = float32(op(aten.unsqueeze.default, row, 2))
    wide_matrix = float32(op(aten.unsqueeze.default, matrix, 0))
    total = op(aten.sum.dim_IntList, op(aten.mul.Tensor, wide_row, wide_matrix), [1])
    if bias is not None:
        total = op(aten.add.Tensor, total, bias)
    if _value(row).dtype == torch.float32:
        return total
    narrow = op(aten._to_copy.default, total)
    narrow.kwargs = {"dtype": _value(row).dtype}
    return narrow


def _replace(graph: fx.Graph, node: fx.Node, build: Callable[..., fx.Node], *args: object) -> None:
    """Put the nodes `build(graph, *args)` makes before `node`, in its place (with its metadata),
    and drop `node`."""
    with graph.inserting_before(node):
        replacement = build(graph, *args)
    replacement.meta = dict(node.meta)
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)


def _is_one_element(node: fx.Node) -> bool:
    value = _value(node)
    return value is not None and value.numel() == 1


def _value(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None

"""The `test` command: run the app's inputs through plain PyTorch ("gold") and through the
compiled graph; compare every output and every parameter's `.grad` with its `.sn_grad`.

The tolerance follows the graph's precision: a bf16 or bf16-mixed step rounds every matrix
product to bf16 (8 significant bits), so it is compared at `BF16_TOLERANCE`; for bf16-mixed
(GraphAMP mp1) the gold forward runs under eager `torch.autocast("cpu", torch.bfloat16)`, the
computation the graph was traced from.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from sambaflow.app.checks import compare
from sambaflow.runtime.session import session
from sambaflow.trace.casts import IndexCasts
from sambaflow.trace.graph import HYPER
from sambaflow.trace.precision import MIXED, is_low_precision


def _dropout_off(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0


def gold_step(
    gold: nn.Module,
    inputs: Sequence[torch.Tensor],
    loss_names: list[str],
    output_names: list[str],
    precision: str = "fp32",
) -> list[torch.Tensor]:
    """Eager forward (under bf16 autocast for bf16-mixed) and loss.backward() on the host model copy."""
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == MIXED else contextlib.nullcontext()
    # IndexCasts: int16 labels and position ids, which the graph accepts, reach eager ops as int64
    with amp, IndexCasts():
        # None stands for a forward argument left at its default, as in the traced input tuple
        outputs = gold(*[None if t is None else t.as_subclass(torch.Tensor).detach().clone() for t in inputs])
    flat = pytree.tree_leaves(outputs)  # as the tracer flattens them (a Hugging Face ModelOutput too)
    losses = [o for o, n in zip(flat, output_names) if n in loss_names]
    if losses:
        torch.autograd.backward(losses)
    return [o.detach() for o in flat]


# fp32 results from another summation order (BLAS threading, fused kernels) differ by ~1e-7 of the
# terms summed; gradients that cancel (LayerNorm weights) then differ by up to ~1e-6 absolute. A
# wrong gradient is off by its own size, far above this.
ABSOLUTE_TOLERANCE = 1e-6
#: relative to a tensor's largest value. fp32: summation order only. bf16: one bf16 rounding is
#: 2**-9 relative, and a compiled backend rounds intermediates at other places than eager does;
#: SambaFlow's own apps test bf16 at 1e-3 to 0.5. A wrong gradient is off by its own size.
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2


def tested_sections(sections: Sequence[str]) -> list[str]:
    """What `test` runs: forward and backward (the optimizer would change the weights compared)."""
    return ["fwd", "bckwd"] if "bckwd" in sections else ["fwd"]


def test_against_cpu(
    model: nn.Module, inputs: Sequence[torch.Tensor], tolerance: float | None = None
) -> bool:
    """Print one line per tensor (name, max abs and rel error, PASS/FAIL); True when all pass.

    `tolerance` None: FP32_TOLERANCE, or BF16_TOLERANCE where the graph computes in bf16.
    """
    graph = session.executable.graph
    low = is_low_precision(graph.precision)
    if tolerance is None:
        tolerance = BF16_TOLERANCE if low else FP32_TOLERANCE
    gold = copy.deepcopy(model)
    session.to_cpu(gold)  # the device's weights, whether or not the host model shares their memory
    _dropout_off(gold)
    training = "bckwd" in graph.sections
    no_dropout = {s.name: 0.0 for s in graph.inputs_with_role(HYPER) if s.name.endswith("__p")}
    session.tracing = False
    device = session.run(
        inputs,
        model.output_tensors,
        hyperparam_dict=no_dropout or None,
        section_types=tested_sections(graph.sections),
    )
    names = [s.name for s in graph.model_outputs]
    expected = gold_step(gold, inputs, graph.loss_names if training else [], names, graph.precision)
    pairs = [(n, d.torch(), e) for n, d, e in zip(names, device, expected)]
    if training:
        pairs += [
            (p.sn_name + "__grad", model_param.sn_grad, p.grad)
            for p, model_param in zip(gold.parameters(), model.parameters())
            if p.grad is not None
        ]
    if low:
        gold_runs = " under torch.autocast('cpu', torch.bfloat16)" if graph.precision == MIXED else ""
        print(f"precision {graph.precision}: the gold model runs{gold_runs}; bf16 tolerance")
    print(
        f"each tensor passes when max_abs_err <= {ABSOLUTE_TOLERANCE:g} + {tolerance:g} x (its largest "
        "expected value); 'bound' is that sum"
    )
    return all(_report(name, got, want, tolerance) for name, got, want in pairs)


def _report(name: str, got: torch.Tensor | None, want: torch.Tensor, tolerance: float) -> bool:
    if got is None:
        print(f"{name:48s} missing on the device                                   FAIL")
        return False
    abs_err, rel_err = compare(got, want)
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    bound = ABSOLUTE_TOLERANCE + tolerance * scale
    ok = abs_err <= bound
    print(
        f"{name:48s} max_abs_err {abs_err:10.3e}  bound {bound:9.2e}  max_rel_err {rel_err:10.3e}  "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return ok

"""The `test` command: run the app's inputs through plain PyTorch ("gold") and through the
compiled graph; compare every output and every parameter's `.grad` with its `.sn_grad`."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from sambaflow.app.checks import compare
from sambaflow.runtime.session import session
from sambaflow.trace.graph import HYPER


def _dropout_off(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0


def gold_step(
    gold: nn.Module, inputs: Sequence[torch.Tensor], loss_names: list[str], output_names: list[str]
) -> list[torch.Tensor]:
    """Eager forward and loss.backward() on the host model copy."""
    outputs = gold(*[t.as_subclass(torch.Tensor).detach().clone() for t in inputs])
    flat = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    losses = [o for o, n in zip(flat, output_names) if n in loss_names]
    if losses:
        torch.autograd.backward(losses)
    return [o.detach() for o in flat]


# fp32 results from another summation order (BLAS threading, fused kernels) differ by ~1e-7 of the
# terms summed; gradients that cancel (LayerNorm weights) then differ by up to ~1e-6 absolute. A
# wrong gradient is off by its own size, far above this.
ABSOLUTE_TOLERANCE = 1e-6


def test_against_cpu(model: nn.Module, inputs: Sequence[torch.Tensor], tolerance: float = 1e-4) -> bool:
    """Print one line per tensor (name, max abs and rel error, PASS/FAIL); True when all pass."""
    graph = session.executable.graph
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
        section_types=["fwd", "bckwd"] if training else ["fwd"],
    )
    names = [s.name for s in graph.model_outputs]
    expected = gold_step(gold, inputs, graph.loss_names if training else [], names)
    pairs = [(n, d.torch(), e) for n, d, e in zip(names, device, expected)]
    if training:
        pairs += [
            (p.sn_name + "__grad", model_param.sn_grad, p.grad)
            for p, model_param in zip(gold.parameters(), model.parameters())
            if p.grad is not None
        ]
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

"""Shared test helpers: train a model through session.run and through eager PyTorch side by side."""

from __future__ import annotations

import copy
import os
from typing import Callable

import torch

from sambaflow import samba
from sambaflow.backends.rewrites import TANH_TAYLOR_BELOW
from sambaflow.samba import utils

# Relative to the tensor's largest value. Compiled fp32 code reorders sums (~1e-6 per step, growing
# over 20 steps); a wrong gradient or update is off by 1e-2 or more and still fails.
TOLERANCE = {"reference": 1e-5, "inductor": 2e-4}


def current_tolerance() -> float:
    return TOLERANCE[os.environ.get("SAMBAFLOW_BACKEND", "reference")]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def named_inputs(names: list[str], tensors: list[torch.Tensor]) -> list[samba.SambaTensor]:
    return [samba.from_torch_tensor(t, name=n, batch_dim=0) for n, t in zip(names, tensors)]


def make_pair(model_fn: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(eager reference, converted copy) with identical weights."""
    reference = model_fn()
    model = copy.deepcopy(reference)
    samba.from_torch_model_(model)
    return reference, model


def train_side_by_side(
    model_fn,
    batch_fn,
    samba_optim_fn,
    torch_optim_fn,
    *,
    steps=20,
    names=("x", "y"),
    clip=None,
    hyper_for_step=None,
    backend=None,
    tol=None,
):
    """Train both ways for `steps` fresh random batches; assert losses, outputs, params agree."""
    tol = tol or current_tolerance()
    reference, model = make_pair(model_fn)
    optim = samba_optim_fn(model)
    outs = utils.trace_graph(model, named_inputs(list(names), batch_fn()), optim, backend=backend)
    torch_optims = torch_optim_fn(reference)
    torch_optims = torch_optims if isinstance(torch_optims, list) else [torch_optims]
    for step in range(steps):
        batch = batch_fn()
        hyper = hyper_for_step(step) if hyper_for_step else None
        results = samba.session.run(named_inputs(list(names), batch), outs, hyperparam_dict=hyper)
        expected = _eager_step(reference, batch, torch_optims, clip, hyper)
        for got, want in zip(results, expected):
            assert rel_err(got, want) < tol, f"step {step}: output differs by {rel_err(got, want):.2e}"
    samba.session.to_cpu(model)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(got, want) < tol, f"{name} differs by {rel_err(got, want):.2e}"
    return model, reference


def _eager_step(model, batch, optims, clip, hyper):
    for opt in optims:
        if hyper and "lr" in hyper:
            for group in opt.param_groups:
                group["lr"] = hyper["lr"]
        opt.zero_grad()
    outputs = model(*batch)
    outputs[0].backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for opt in optims:
        opt.step()
    return [o.detach() for o in outputs]


def eager_grouped_adamw(
    groups: list[list[torch.nn.Parameter]],
    weight_decays: tuple[float, ...],
    loss_of_step: Callable[[int], torch.Tensor],
    steps: int,
    **adamw: float,
) -> list[float]:
    """The apps' optimizer in plain PyTorch: one AdamW per group, each group clipped to norm 1."""
    optims = [torch.optim.AdamW(g, weight_decay=wd, **adamw) for g, wd in zip(groups, weight_decays)]
    losses = []
    for step in range(steps):
        loss = loss_of_step(step)
        for opt in optims:
            opt.zero_grad()
        loss.backward()
        for group, opt in zip(groups, optims):
            torch.nn.utils.clip_grad_norm_(group, 1.0)
            opt.step()
        losses.append(float(loss.detach()))
    return losses


def tanh_inputs(seed: int) -> torch.Tensor:
    """Every range the formula switches on, both signs, and the special values."""
    gen = torch.Generator().manual_seed(seed)
    edge = torch.tensor([TANH_TAYLOR_BELOW, -TANH_TAYLOR_BELOW])
    scales = [3.0, 0.5, TANH_TAYLOR_BELOW, 1e-3, 1e-20]
    parts = [torch.randn(20_000, generator=gen) * s for s in scales]
    near_edge = edge.repeat_interleave(1000) * (1 + 1e-3 * torch.randn(2000, generator=gen))
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 20.0, -20.0, 1e10, -1e10, 1e-40, -1e-40])
    return torch.cat(parts + [near_edge, edge, special])


def check_tanh(got: torch.Tensor, x: torch.Tensor, bound: float = 3e-7) -> None:
    """`got` is tanh(x) within `bound` relative error (a wrong branch or coefficient is off by >1e-6)."""
    exact = torch.tanh(x.double())
    normal = exact.abs() > torch.finfo(torch.float32).tiny
    relative = ((got.double() - exact).abs() / exact.abs())[normal]
    assert relative.max() < bound, (
        f"worst relative error {relative.max():.2e} at x={x[normal][relative.argmax()]}"
    )
    tiny = ~normal
    torch.testing.assert_close(got[tiny], torch.tanh(x)[tiny], rtol=0, atol=0)
    assert torch.equal(torch.signbit(got), torch.signbit(torch.tanh(x))), "sign of -0.0 or a tiny value lost"

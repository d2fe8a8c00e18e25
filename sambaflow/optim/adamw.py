"""AdamW (decoupled weight decay) as torch.optim.AdamW computes it, with optional clipping."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from sambaflow.errors import SambaOptimizerError
from sambaflow.optim.base import Hyper, SambaOptimizer, State, check_settings


class AdamW(SambaOptimizer):
    """`samba.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.997), eps=1e-8, weight_decay=0,
    amsgrad=False, max_grad_norm=None)`: SambaFlow's default beta2 is 0.997, not torch's 0.999.

    `max_grad_norm` clips the global gradient norm (as `torch.nn.utils.clip_grad_norm_`) in a
    `gradnorm` section that runs between `bckwd` and `opt`.
    """

    hyper_names = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.997),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise SambaOptimizerError(
                f"AdamW: betas must be a pair (beta1, beta2), e.g. betas=(0.9, 0.997); got {betas!r}"
            )
        settings = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay}
        lr, beta1, beta2, eps, weight_decay = check_settings("AdamW", settings).values()
        betas = (beta1, beta2)
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise SambaOptimizerError(f"AdamW: max_grad_norm must be positive, got {max_grad_norm}")
        defaults = {
            "lr": lr,
            "beta1": betas[0],
            "beta2": betas[1],
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "max_grad_norm": max_grad_norm,
        }
        self.state_names = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        super().__init__(params, defaults)

    def initial_state(self, param: torch.Tensor) -> State:
        state = {name: torch.zeros_like(param) for name in self.state_names}
        state["step"] = torch.zeros((), dtype=torch.float32)  # torch keeps step as float32
        return state

    def clip_gradients(self, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        max_norm = self.defaults["max_grad_norm"]
        if max_norm is None:
            return None
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        total = torch.linalg.vector_norm(norms)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return [g * scale for g in grads]

    def update(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[State], hyper: Hyper
    ) -> tuple[list[torch.Tensor], list[State]]:
        lr, beta1, beta2 = hyper["lr"], hyper["beta1"], hyper["beta2"]
        new_params, new_states = [], []
        for param, grad, state in zip(params, grads, states):
            step = state["step"] + 1
            param = param * (1 - lr * hyper["weight_decay"])
            exp_avg = _lerp(state["exp_avg"], grad, 1 - beta1)
            exp_avg_sq = _addcmul(state["exp_avg_sq"] * beta2, grad, grad, 1 - beta2)
            step64 = step.to(torch.float64)
            bias1 = 1 - beta1**step64
            bias2_sqrt = (1 - beta2**step64).sqrt()
            new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            second = exp_avg_sq
            if "max_exp_avg_sq" in state:
                second = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
                new_state["max_exp_avg_sq"] = second
            denom = second.sqrt() / bias2_sqrt + hyper["eps"]
            # torch's addcdiv_ order: param + (value * exp_avg) / denom
            new_params.append(_addcdiv(param, exp_avg, denom, -(lr / bias1)))
            new_states.append(new_state)
        return new_params, new_states

    def torch_group_settings(self) -> dict[str, Any]:
        return {
            "lr": self.hyper["lr"],
            "betas": (self.hyper["beta1"], self.hyper["beta2"]),
            "eps": self.hyper["eps"],
            "weight_decay": self.hyper["weight_decay"],
            "amsgrad": self.defaults["amsgrad"],
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "max_grad_norm": self.defaults["max_grad_norm"],
        }


# torch.optim.AdamW's in-place ops (lerp_, addcmul_, addcdiv_) compute in float32 for bfloat16 and
# float16 tensors and round once; written out op by op in that dtype, each op would round, and bf16
# weights would drift from eager's by an ulp on many elements each step. For float32 these are the
# plain formulas.
_NARROW = (torch.bfloat16, torch.float16)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _NARROW else t


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`start.lerp_(end, weight)`: ATen's two-sided formula, one rounding."""
    a, b = _wide(start), _wide(end)
    low = a + weight * (b - a)
    high = b - (b - a) * (1 - weight)
    return torch.where(weight < 0.5, low, high).to(start.dtype)


def _addcmul(base: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`base.addcmul_(t1, t2, value=value)`: one rounding."""
    return (_wide(base) + value * _wide(t1) * _wide(t2)).to(base.dtype)


def _addcdiv(base: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`base.addcdiv_(t1, t2, value=value)`: one rounding."""
    return (_wide(base) + (value * _wide(t1)) / _wide(t2)).to(base.dtype)

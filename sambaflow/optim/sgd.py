"""SGD with momentum, dampening, weight decay and Nesterov, as torch.optim.SGD computes it."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from sambaflow.errors import SambaOptimizerError
from sambaflow.optim.base import Hyper, SambaOptimizer, State, check_settings


class SGD(SambaOptimizer):
    """`samba.optim.SGD(params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False)`."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        settings = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay}
        lr, momentum, dampening, weight_decay = check_settings("SGD", settings).values()
        if nesterov and (momentum <= 0 or dampening != 0):
            raise SambaOptimizerError("SGD: nesterov=True needs momentum > 0 and dampening = 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        # A momentum buffer exists only when momentum was asked for at construction: plain SGD
        # keeps no state, as in torch. `momentum` is then a run-time input like lr.
        self.hyper_names = ("lr", "weight_decay") + (("momentum",) if momentum else ())
        self.state_names = ("momentum_buffer",) if momentum else ()
        if momentum and dampening:
            # torch's first step copies the step into the buffer, undamped; remember whether
            # that first step happened.
            self.state_names += ("momentum_started",)
        super().__init__(params, defaults)

    def initial_state(self, param: torch.Tensor) -> State:
        state = {name: torch.zeros_like(param) for name in self.state_names}
        if "momentum_started" in state:
            state["momentum_started"] = torch.zeros((), dtype=torch.float64)
        return state

    def update(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[State], hyper: Hyper
    ) -> tuple[list[torch.Tensor], list[State]]:
        new_params, new_states = [], []
        for param, grad, state in zip(params, grads, states):
            # `g + wd * p`, never `g.add(p, alpha=wd)`: Inductor drops alpha when it fuses an add
            # into addmm (torch 2.13), which would silently train without weight decay.
            step = grad + hyper["weight_decay"] * param
            if "momentum_buffer" in state:
                state = self._momentum(state, step, hyper["momentum"])
                buffer = state["momentum_buffer"]
                step = step + hyper["momentum"] * buffer if self.defaults["nesterov"] else buffer
            new_params.append(param - hyper["lr"] * step)
            new_states.append(state)
        return new_params, new_states

    def _momentum(self, state: State, step: torch.Tensor, momentum: torch.Tensor) -> State:
        buffer = state["momentum_buffer"]
        if "momentum_started" not in state:
            # torch starts the buffer as a copy of the first step; from a zero buffer this equals it.
            return {"momentum_buffer": momentum * buffer + step}
        started = state["momentum_started"]
        scale = 1.0 - started * self.defaults["dampening"]
        return {
            "momentum_buffer": momentum * buffer + scale * step,
            "momentum_started": torch.ones_like(started),
        }

    def torch_group_settings(self) -> dict[str, Any]:
        return {
            "lr": self.hyper["lr"],
            "momentum": self.hyper.get("momentum", 0.0),
            "dampening": self.defaults["dampening"],
            "weight_decay": self.hyper["weight_decay"],
            "nesterov": self.defaults["nesterov"],
            "maximize": False,
            "foreach": None,
            "differentiable": False,
            "fused": None,
        }

"""Host <-> device transfers that SambaNova's data-parallel modelzoo app drives by hand.

`rdu_train_llm_dp.py` traces a model whose parameters are on the `meta` device with
`trace_graph(..., transfer_device=False)` (nothing moves), builds the model again with real weights,
converts it with `samba.from_torch_model_` and calls `samba.session.to_device()`: the most recently
converted model's weights, and the optimizers' fresh state, go to the device by name. When it fine-
tunes, it loads a checkpoint straight onto the device (`utils.checkpoint.load_sharded_checkpoint`)
after `t.rdu()` on `session._traced_tensors()` and `session.optim_dict`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from sambaflow.errors import SambaRunError
from sambaflow.optim.base import state_name
from sambaflow.tensors import model as tensors_model

_converted: list[weakref.ref] = []  # the model from_torch_model_ converted last


def note_converted(model: nn.Module) -> None:
    """`from_torch_model_` registers each model it converts; `to_device()` takes the latest."""
    _converted[:] = [weakref.ref(model)]


tensors_model._converted_hooks.append(note_converted)


def last_converted() -> nn.Module | None:
    return _converted[0]() if _converted else None


def check_has_values(model: nn.Module, what: str) -> None:
    """Refuse moving a model whose parameters are on the `meta` device (they hold no values)."""
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise SambaRunError(
            f"{what}: {len(meta)} parameters of {type(model).__name__} are on the meta device (e.g. "
            f"'{meta[0]}'), so they hold no values: trace with transfer_device=False, then build the "
            "model with real weights (outside init_empty_weights), convert it with "
            "samba.from_torch_model_ and call samba.session.to_device()"
        )


class Transfers:
    """Mixed into the session: `to_device`, `_traced_tensors`, `optim_dict`."""

    host_model: Any = None

    def to_device(self, model: nn.Module | None = None) -> None:
        """Move the weights of `model` (default: the model `samba.from_torch_model_` converted last)
        and the optimizers' state into the device store, by name."""
        model = model if model is not None else last_converted() or self.host_model
        if model is None:
            raise SambaRunError("session.to_device: no model: call samba.from_torch_model_(model) first")
        check_has_values(model, "session.to_device")
        self.host_model = model
        self.to_rdu(model, self.optimizers)  # type: ignore[attr-defined]

    def _traced_tensors(self) -> list[torch.Tensor]:
        """The model's parameters and buffers the loaded graph reads (their `has_data` says which hold values)."""
        model = self.host_model or last_converted()
        return [] if model is None else [p for _, p in model.named_parameters()]

    @property
    def optim_dict(self) -> dict[str, torch.Tensor]:
        """Optimizer state on the device, by name (`<param>__<state>`)."""
        store = self.store  # type: ignore[attr-defined]
        names = {
            state_name(opt.param_name(j), key)
            for opt in self.optimizers  # type: ignore[attr-defined]
            for j in range(len(opt.params))
            for key in opt.state_names
        }
        return {name: store[name] for name in sorted(names) if name in store}

"""`utils.checkpoint.load_sharded_checkpoint`: a Hugging Face checkpoint folder into a converted model.

Reads `model.safetensors`, `pytorch_model.bin` or their sharded forms (`*.index.json`), checks every
tensor's name and shape against the model (listing what is missing or unexpected), replaces
parameters that are on the `meta` device, copies into the others, and, when a graph is loaded,
moves the weights to the device. `.bin` files load with `weights_only=True` (no pickle code runs).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from sambaflow.errors import SambaIOError
from sambaflow.runtime.session import session
from sambaflow.tensors.sambatensor import SambaParameter

_SINGLE = ("model.safetensors", "pytorch_model.bin")
_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def load_sharded_checkpoint(
    model: nn.Module, folder: str, ignore_dtype_mismatch: bool = False, strict: bool = True, **_: Any
) -> nn.Module:
    state = read_checkpoint(str(folder))
    persistent = set(model.state_dict())  # non-persistent buffers (RoPE tables) are not saved
    targets = {k: v for k, v in (*model.named_parameters(), *model.named_buffers()) if k in persistent}
    missing = sorted(set(targets) - set(state)) if strict else []
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise SambaIOError(
            f"checkpoint {folder} does not fit {type(model).__name__}: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}: load the checkpoint of this model's configuration"
        )
    for name, value in state.items():
        _assign(model, name, targets[name], value, ignore_dtype_mismatch, folder)
    if session.executable is not None:
        session.to_rdu(model)
    return model


def read_checkpoint(folder: str) -> dict[str, torch.Tensor]:
    for index in _INDEX:
        path = os.path.join(folder, index)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                files = sorted(set(json.load(f).get("weight_map", {}).values()))
            return {k: v for name in files for k, v in _read_file(os.path.join(folder, name)).items()}
    for single in _SINGLE:
        path = os.path.join(folder, single)
        if os.path.exists(path):
            return _read_file(path)
    raise SambaIOError(f"no Hugging Face checkpoint in {folder}: expected one of {_SINGLE + _INDEX}")


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _assign(
    model: nn.Module, name: str, target: torch.Tensor, value: torch.Tensor, cast: bool, where: str
) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise SambaIOError(
            f"checkpoint {where}: '{name}' has shape {list(value.shape)}, the model {list(target.shape)}"
        )
    if value.dtype != target.dtype:
        if not cast:
            raise SambaIOError(
                f"checkpoint {where}: '{name}' is {value.dtype}, the model {target.dtype}: "
                "pass ignore_dtype_mismatch=True to cast"
            )
        value = value.to(target.dtype)
    if target.device.type != "meta":
        with torch.no_grad():
            target.copy_(value)
        return
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if leaf in module._parameters:
        sn_name = getattr(target, "sn_name", None)
        module._parameters[leaf] = SambaParameter(value, target.requires_grad, sn_name)
    else:
        module._buffers[leaf] = value

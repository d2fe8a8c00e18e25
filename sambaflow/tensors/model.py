"""`from_torch_model_`: turn a model's parameters into named Samba parameters, in place."""

from __future__ import annotations

from torch import nn

from sambaflow.tensors.sambatensor import SambaParameter


def samba_name(module_path: str, leaf: str) -> str:
    """SambaFlow's naming scheme: module path joined by double underscores (`lin__weight`)."""
    parts = [p for p in module_path.split(".") if p] + [leaf]
    return "__".join(parts)


def buffer_name(path: str) -> str:
    """Samba name of the buffer at module path `a.b.running_mean`: `a__b__running_mean`."""
    module_path, _, leaf = path.rpartition(".")
    return samba_name(module_path, leaf)


def from_torch_model_(model: nn.Module) -> nn.Module:
    """Replace every parameter of `model` by a SambaParameter named after its module path.

    The model keeps working in plain eager PyTorch (the parameters are still `nn.Parameter`s);
    parameters shared between modules stay shared and keep the name of their first path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_torch_model_ expects an nn.Module, got {type(model).__name__}")
    converted: dict[int, SambaParameter] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for leaf, param in list(module._parameters.items()):
            if param is None:
                continue
            module._parameters[leaf] = _converted(param, samba_name(path, leaf), converted)
    for hook in _converted_hooks:
        hook(model)
    return model


#: called with each model `from_torch_model_` converted (the runtime registers `note_converted`)
_converted_hooks: list = []


def _converted(param: nn.Parameter, name: str, converted: dict[int, SambaParameter]) -> SambaParameter:
    if id(param) in converted:
        return converted[id(param)]
    if isinstance(param, SambaParameter):
        new = param
        if new.sn_name is None:  # e.g. made by SambaParameter(shape=..., materializer=...)
            new.sn_name = name
    else:
        new = SambaParameter(param.data, param.requires_grad, name)
    converted[id(param)] = new
    return new


from_torch_ = from_torch_model_

"""What the tracer watches while the model runs: which module is running, and dropout calls.

Dropout's probability becomes a graph input (`<module path>__p`), so `hyperparam_dict={'p': x}`
changes the rate at run time. The dropout is written with a uniform mask, which equals torch's
result exactly at p = 0 and has the same distribution otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass
class DropoutSite:
    name: str
    p: float


@dataclass
class ModuleWatch:
    """Module paths of the running modules, and which module produced which tensor."""

    paths: dict[int, str]
    stack: list[str] = field(default_factory=list)
    # id -> (path, index, tensor): holding the tensor keeps its id from being reused
    producer: dict[int, tuple[str, int, torch.Tensor]] = field(default_factory=dict)

    def pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append(self.paths.get(id(module), type(module).__name__.lower()))

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        path = self.stack.pop() if self.stack else ""
        if not path:
            return
        for index, value in enumerate(torch.utils._pytree.tree_leaves(output)):
            if isinstance(value, torch.Tensor):
                self.producer.setdefault(id(value), (path, index, value))

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ""


@contextlib.contextmanager
def watching_modules(model: nn.Module) -> Iterator[ModuleWatch]:
    """Track module paths (`a.b`) while `model` runs, through global module hooks."""
    paths = {id(m): path for path, m in model.named_modules(remove_duplicate=False) if path}
    watch = ModuleWatch(paths)
    handles = [
        nn.modules.module.register_module_forward_pre_hook(watch.pre),
        nn.modules.module.register_module_forward_hook(watch.post),
    ]
    try:
        yield watch
    finally:
        for handle in handles:
            handle.remove()


class DropoutAsInput(TorchFunctionMode):
    """Replace `F.dropout` by a mask whose probability comes from `probability(site)`."""

    def __init__(self, watch: ModuleWatch, probability: Callable[[DropoutSite], Any]) -> None:
        super().__init__()
        self.watch = watch
        self.probability = probability
        self.sites: list[DropoutSite] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.dropout:
            return func(*args, **kwargs)
        bound = _dropout_arguments(*args, **kwargs)
        if not bound["training"]:
            return bound["input"]
        site = self._site(float(bound["p"]))
        return masked_dropout(bound["input"], self.probability(site))

    def _site(self, p: float) -> DropoutSite:
        path = self.watch.current
        name = f"{path.replace('.', '__')}__p" if path else f"dropout{len(self.sites)}__p"
        site = DropoutSite(name, p)
        self.sites.append(site)
        return site


def _dropout_arguments(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> dict[str, Any]:
    return {"input": input, "p": p, "training": training}


def masked_dropout(x: torch.Tensor, p: Any) -> torch.Tensor:
    keep = torch.rand_like(x) >= p
    return torch.where(keep, x / (1 - p), torch.zeros_like(x))

"""What the tracer watches while the model runs: which module is running, and dropout calls.

Dropout's probability becomes a graph input (`<module path>__p`, attention dropout inside
`F.scaled_dot_product_attention` `<module path>__attention__p`), so `hyperparam_dict={'p': x}`
changes the rate at run time. The dropout is written with a uniform mask, which equals torch's
result exactly at p = 0 and has the same distribution otherwise.
"""

from __future__ import annotations

import contextlib
import math
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
    #: ids of tensors a loss module (`nn.modules.loss._Loss`: CrossEntropyLoss, MSELoss, ...) returned
    from_loss_module: set[int] = field(default_factory=set)

    def pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append(self.paths.get(id(module), type(module).__name__.lower()))

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        path = self.stack.pop() if self.stack else ""
        if not path:
            return
        is_loss = isinstance(module, nn.modules.loss._Loss)
        for index, value in enumerate(torch.utils._pytree.tree_leaves(output)):
            if isinstance(value, torch.Tensor):
                self.producer.setdefault(id(value), (path, index, value))
                if is_loss:
                    self.from_loss_module.add(id(value))

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
    """Make every dropout's probability come from `probability(site)`: `F.dropout`,
    `F.dropout1d/2d/3d` (whole channels) and `F.scaled_dot_product_attention`'s `dropout_p`.

    Attention with `dropout_p > 0` is written out (scores, mask, softmax, dropout, product) so
    the dropout can follow the run-time `p`; with `dropout_p == 0` (eval mode, or a model built
    without attention dropout) it stays one fused attention op.
    """

    def __init__(self, watch: ModuleWatch, probability: Callable[[DropoutSite], Any]) -> None:
        super().__init__()
        self.watch = watch
        self.probability = probability
        self.sites: list[DropoutSite] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        spatial = _CHANNEL_DROPOUTS.get(func)
        if func is not F.dropout and spatial is None:
            return func(*args, **kwargs)
        bound = _dropout_arguments(*args, **kwargs)
        if not bound["training"]:
            return bound["input"]
        site = self._site(float(bound["p"]))
        return masked_dropout(bound["input"], self.probability(site), spatial or 0)

    def _attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if float(dropout_p) == 0.0:
            return F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=attn_mask,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        site = self._site(float(dropout_p), "attention")
        p = self.probability(site)
        return attention_with_dropout(query, key, value, attn_mask, is_causal, scale, enable_gqa, p)

    def _site(self, p: float, kind: str = "") -> DropoutSite:
        path = self.watch.current
        leaf = f"{kind}__p" if kind else "p"
        name = f"{path.replace('.', '__')}__{leaf}" if path else f"dropout{len(self.sites)}__{leaf}"
        site = DropoutSite(name, p)
        self.sites.append(site)
        return site


# F.dropout1d/2d/3d zero whole channels: the mask covers all but the last 1/2/3 dimensions.
_CHANNEL_DROPOUTS = {F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3}


def _dropout_arguments(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> dict[str, Any]:
    return {"input": input, "p": p, "training": training}


def masked_dropout(x: torch.Tensor, p: Any, spatial: int = 0) -> torch.Tensor:
    """Dropout against a uniform mask; `spatial` trailing dimensions share one mask value."""
    shape = x.shape[: x.dim() - spatial] + (1,) * spatial if spatial else x.shape
    keep = torch.rand(shape, dtype=x.dtype, device=x.device) >= p
    return torch.where(keep, x / (1 - p), torch.zeros_like(x))


def attention_with_dropout(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    p: Any,
) -> torch.Tensor:
    """`scaled_dot_product_attention`'s math, with dropout `p` (a float or a 0-d tensor) on the weights."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeats, dim=-3)
        value = value.repeat_interleave(repeats, dim=-3)
    factor = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = (query * factor) @ key.transpose(-2, -1)
    if is_causal:
        length, source = query.shape[-2], key.shape[-2]
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    weights = torch.softmax(scores, dim=-1)
    return masked_dropout(weights, p) @ value

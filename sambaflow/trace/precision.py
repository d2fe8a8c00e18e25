"""Precision of a traced step: SambaFlow's GraphAMP presets, and the name a PEF records.

SambaFlow's compiler takes `--graphamp-preset`: `mp0` leaves the model's dtypes alone, `mp1`
("downcasts the inputs of GEMM-like operators to BF16", the recommended preset) and `mp4`
(everything bf16). Here `mp1` is PyTorch's bf16 autocast: the forward is traced under
`torch.autocast(<device>, torch.bfloat16)`, so matrix products, convolutions and attention
(mm, bmm, addmm, linear, matmul, conv, scaled_dot_product_attention) read bf16 copies of their
fp32 operands, everything else keeps its dtype, and the backward (traced through autograd)
returns fp32 gradients for the fp32 master weights; the optimizer update runs in fp32. That is
what eager `torch.autocast` computes, cast for cast: `make_fx` records autocast's casts as
ordinary `_to_copy` nodes, so the graph holds them and no backend needs to know about autocast.

`mp4` is refused: casting every operator to bf16 while keeping fp32 weights is not what eager
PyTorch offers; the bf16 model itself (`model.bfloat16()`) gives a pure bf16 graph.

The precision a PEF records: `bf16-mixed` (traced with mp1), else the dtype of the model's
floating-point parameters (`fp32`, `bf16`, `fp16`, `fp64`; several joined by `+`).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Sequence

import torch

from sambaflow.errors import SambaArgumentError

PRESETS = ("mp0", "mp1", "mp4")
MIXED = "bf16-mixed"
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
#: what each precision means, for the compile log and `inspect`
MEANINGS = {
    "fp32": "float32 weights and compute",
    "bf16": "bfloat16 weights and compute (the model is bf16)",
    MIXED: "GraphAMP mp1: GEMM-like ops (mm, bmm, addmm, linear, matmul, conv, attention) compute "
    "in bf16 under autocast; fp32 master weights, gradients and optimizer state",
}


def check_preset(preset: str | None) -> str:
    """`preset` as one of PRESETS (None: mp0); a clear error for anything else, mp4 included."""
    if preset is None:
        return "mp0"
    name = str(preset).lower()
    if name == "mp4":
        raise SambaArgumentError(
            "--graphamp-preset mp4 (every operator in bf16) is not implemented: use mp1 for bf16 "
            "mixed precision (bf16 matrix products, fp32 weights), or make the model bf16 yourself "
            "(model.bfloat16(), or torch_dtype=torch.bfloat16 in from_pretrained/from_config) for a "
            "pure bf16 graph"
        )
    if name not in PRESETS:
        raise SambaArgumentError(
            f"--graphamp-preset {preset!r} is not a GraphAMP preset: use mp0 (off, the default) or "
            "mp1 (bf16 mixed precision)"
        )
    return name


def autocast_for(preset: str, tensors: Sequence[torch.Tensor]) -> ContextManager:
    """The context the forward is traced in: bf16 autocast for mp1 (on the tensors' device type)."""
    if check_preset(preset) != "mp1":
        return contextlib.nullcontext()
    device = next((t.device.type for t in tensors), "cpu")
    return torch.autocast(device, dtype=torch.bfloat16)


def precision_name(preset: str, params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> str:
    """What a PEF records: bf16-mixed for mp1, else the floating-point dtypes of the parameters
    (of the inputs where the model has none), fp32 when nothing is floating point."""
    if check_preset(preset) == "mp1":
        return MIXED
    floats = [t.dtype for t in params if t.is_floating_point()]
    floats = floats or [t.dtype for t in inputs if t.is_floating_point()]
    names = sorted({_SHORT.get(d, str(d).replace("torch.", "")) for d in floats})
    return "+".join(names) or "fp32"


def preset_of(precision: str) -> str:
    """The GraphAMP preset a recorded precision was traced with."""
    return "mp1" if precision == MIXED else "mp0"


def is_low_precision(precision: str) -> bool:
    """bf16 or fp16 anywhere in the step: `test` compares with bf16-aware tolerances."""
    return any(part in ("bf16", "fp16") for part in precision.replace("-", "+").split("+"))


def describe(precision: str) -> str:
    meaning = MEANINGS.get(precision)
    return f"{precision} ({meaning})" if meaning else precision

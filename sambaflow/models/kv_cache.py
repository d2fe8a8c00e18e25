"""A static key/value cache around a Hugging Face causal LM, for cached generation compiled ahead of time.

`KVCacheLM(lm, batch_size, max_seq_length)` keeps one key and one value buffer per layer,
`[batch, kv_heads, max_seq_length, head_dim]`. Its `forward(input_ids, position_ids, last_index)`
runs the model on `q` new tokens per sequence at the given positions: each layer writes the new
keys and values into its buffers at those positions (in place) and attends over the whole buffer,
masked to the positions at or before each query's (and inside Mistral's sliding window). It
returns the logits of token `last_index` of each sequence, `[batch, vocab]`.

Traced with `q` = the padded prompt length it is the *prompt* program (fills the cache); with
`q` = 1 it is the *token* program (one new token per sequence). Both read and write the same
buffers, so in the device tensor store both graphs share one cache by name. Shapes are static up to
`max_seq_length`; positions past a sequence's last written one hold stale values that the mask
hides until the sequence writes them.

The model's attention layers reach the cache through the attention-function registry of
`transformers` (`AttentionInterface`): the layer computes queries, keys and values (RoPE
included) as usual and hands them to `cached_attention`, which Llama, Mistral, GPT-2 and the other
models on that registry call. The model is otherwise unchanged, but for one layout: on the CPU,
GPT-2-style `Conv1D` weights become column-major (same shape and values; see
`_column_major_conv1d_weights`).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "sambaflow_kv_cache"


@dataclass
class _ActiveCache:
    """The cache a running forward writes to, and the mask of what each query may attend to."""

    module: KVCacheLM
    positions: torch.Tensor  # [batch, q]
    mask: torch.Tensor  # [batch, 1, q, max_seq_length], True where attending is allowed


_active: contextvars.ContextVar[_ActiveCache | None] = contextvars.ContextVar(
    "sambaflow_kv_cache", default=None
)


class KVCacheLM(nn.Module):
    """A Hugging Face causal LM with a static KV cache in buffers; see the module docstring."""

    def __init__(self, lm: nn.Module, batch_size: int, max_seq_length: int) -> None:
        super().__init__()
        config = lm.config
        _check_sizes(config, batch_size, max_seq_length)
        self.lm = lm
        self.batch_size, self.max_seq_length = batch_size, max_seq_length
        self.num_layers = config.num_hidden_layers
        self.sliding_window = (
            getattr(config, "sliding_window", None) if _uses_sliding_window(config) else None
        )
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        dtype = next(lm.parameters()).dtype
        _column_major_conv1d_weights(lm)
        shape = (batch_size, kv_heads, max_seq_length, head_dim)
        for i in range(self.num_layers):
            # not persistent: a checkpoint of the model holds no cache
            self.register_buffer(f"key_cache_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"value_cache_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
        _register_attention()

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, last_index: torch.Tensor
    ) -> torch.Tensor:
        positions = position_ids.long()
        active = _ActiveCache(self, positions, self._mask(positions))
        with _attending_through(self.lm.config, active):
            hidden = self.lm.base_model(
                input_ids=input_ids.long(), position_ids=positions, use_cache=False, return_dict=True
            ).last_hidden_state
        index = last_index.long().view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        last = hidden.gather(1, index).squeeze(1)
        return self.lm.get_output_embeddings()(last)

    def caches(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"key_cache_{layer}"), getattr(self, f"value_cache_{layer}")

    def _mask(self, positions: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(self.max_seq_length, device=positions.device)
        query = positions.unsqueeze(-1)  # [batch, q, 1]
        allowed = slots <= query
        if self.sliding_window is not None:
            allowed = allowed & (slots > query - self.sliding_window)
        return allowed.unsqueeze(1)

    def reset_cache(self) -> None:
        """Zero the host copy of the cache (the device's is the store's; a prompt run overwrites it)."""
        for name, buffer in self.named_buffers():
            if "_cache_" in name:
                buffer.zero_()


def cached_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function the model's layers call while a `KVCacheLM` runs: write this step's
    keys and values into the layer's cache, attend over the whole cache (the model's own mask is
    for the uncached sequence and is not used)."""
    active = _active.get()
    if active is None:
        raise RuntimeError(
            f"attention '{ATTENTION_NAME}' runs only inside KVCacheLM.forward; call the model through it"
        )
    key_cache, value_cache = active.module.caches(module.layer_idx)
    slots = active.positions[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
    key_cache.scatter_(2, slots, key.to(key_cache.dtype))
    value_cache.scatter_(2, slots, value.to(value_cache.dtype))
    repeats = query.shape[1] // key_cache.shape[1]
    keys, values = _repeat_heads(key_cache, repeats), _repeat_heads(value_cache, repeats)
    out = F.scaled_dot_product_attention(
        query, keys.to(query.dtype), values.to(query.dtype), attn_mask=active.mask, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def _repeat_heads(cache: torch.Tensor, repeats: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head serves `repeats` query heads."""
    if repeats == 1:
        return cache
    batch, heads, length, dim = cache.shape
    return (
        cache[:, :, None]
        .expand(batch, heads, repeats, length, dim)
        .reshape(batch, heads * repeats, length, dim)
    )


@contextlib.contextmanager
def _attending_through(config: Any, active: _ActiveCache) -> Iterator[None]:
    """The model's layers call `cached_attention` for the duration of one forward."""
    saved = config._attn_implementation
    token = _active.set(active)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = saved
        _active.reset(token)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, cached_attention)


#: the dtypes whose one-row products backends/rewrites.py streams (`VECTOR_MATMUL_DTYPES`; the
#: backends come after models in the pipeline, so the pair is named here too)
_STREAMED_DTYPES = (torch.bfloat16, torch.float32)


def _column_major_conv1d_weights(lm: nn.Module) -> None:
    """Store `Conv1D` weights (`[in, out]`, GPT-2's) column-major, in place, on the CPU.

    The token program multiplies one row by each weight. Over `[in, out]` rows ATen sends that
    product to oneDNN or MKL, which read the weight well below the memory bandwidth; with the
    reduction along contiguous memory, the `vector_matmul` rewrite (backends/rewrites.py) streams
    the weight once: GPT-2-small-like generation 1.20x -> 1.77x HF eager's tokens/s in fp32, 1.17x
    -> 1.64x in bf16, same tokens. The weight keeps its shape and values, so the model (and any
    PyTorch code) computes the same; only `weight.stride()` changes. One weight at a time is
    copied, so the peak grows by the largest.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # no transformers, no Conv1D
        return
    for module in lm.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, Conv1D)
            and isinstance(weight, torch.Tensor)
            and weight.dtype in _STREAMED_DTYPES
            and weight.device.type == "cpu"
            and weight.dim() == 2
            and weight.is_contiguous()
        ):
            with torch.no_grad():
                weight.data = weight.data.t().contiguous().t()


def _uses_sliding_window(config: Any) -> bool:
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


def _check_sizes(config: Any, batch_size: int, max_seq_length: int) -> None:
    if batch_size < 1 or max_seq_length < 2:
        raise ValueError(
            f"KVCacheLM: batch_size {batch_size} and max_seq_length {max_seq_length} must be at least 1 and 2"
        )
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and max_seq_length > limit:
        raise ValueError(
            f"KVCacheLM: max_seq_length {max_seq_length} exceeds the model's {limit} positions "
            "(config.max_position_embeddings): compile for at most that length"
        )

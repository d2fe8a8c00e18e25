"""Cached generation from a PEF's `prompt` and `token` graphs (a `KVCacheLM` traced twice).

`cached_graph_inputs(model, prompt_length)` gives the named inputs of both graphs, for
`session.compile` and `trace_graph` (`{'prompt': ..., 'token': ...}`). `CachedGenerator` then
runs them: the prompt program once per batch of prompts (whole padded prompts -> the next token's
logits, the KV cache filled in the device store), the token program once per new token (one token
per sequence -> logits, the cache updated in place). Greedy decoding takes the argmax; sampling
(temperature, top-k, top-p, in Hugging Face's order) runs on the host from the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sambaflow.errors import SambaRunError
from sambaflow.models.kv_cache import KVCacheLM
from sambaflow.runtime.session import session
from sambaflow.tensors.factories import from_torch_tensor
from sambaflow.tensors.sambatensor import SambaTensor

PROMPT, TOKEN = "prompt", "token"


def cached_graph_inputs(model: KVCacheLM, prompt_length: int) -> dict[str, tuple[SambaTensor, ...]]:
    """Named inputs of the prompt graph (`prompt_length` tokens per sequence) and the token graph."""
    if not 1 <= prompt_length < model.max_seq_length:
        raise SambaRunError(
            f"prompt_length {prompt_length} must be at least 1 and below max_seq_length "
            f"{model.max_seq_length} (which leaves room for the generated tokens)"
        )
    return {PROMPT: _inputs(model.batch_size, prompt_length), TOKEN: _inputs(model.batch_size, 1)}


def _inputs(batch: int, length: int) -> tuple[SambaTensor, ...]:
    positions = torch.arange(length, dtype=torch.int32).expand(batch, length).contiguous()
    return (
        from_torch_tensor(torch.zeros(batch, length, dtype=torch.int32), name="input_ids", batch_dim=0),
        from_torch_tensor(positions, name="position_ids", batch_dim=0),
        from_torch_tensor(torch.zeros(batch, dtype=torch.int32), name="last_index", batch_dim=0),
    )


@dataclass
class Sampling:
    """Greedy when `do_sample` is False; else temperature, then top-k (0: off), then top-p (1: off)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise SambaRunError(
                f"sampling: temperature {self.temperature} must be > 0, top_k {self.top_k} >= 0 and "
                f"top_p {self.top_p} in (0, 1]"
            )
        self.generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None

    def next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        probabilities = self.filtered(logits.float() / self.temperature).softmax(-1)
        return torch.multinomial(probabilities, 1, generator=self.generator).squeeze(-1)

    def filtered(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` with the tokens top-k and top-p leave out set to -inf."""
        if self.top_k > 0:
            kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            scores = _top_p(scores, self.top_p)
        return scores


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (at least one)."""
    ordered, order = scores.sort(descending=False)
    cumulative = ordered.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


class CachedGenerator:
    """Generation with the loaded `prompt` and `token` graphs of a `KVCacheLM`."""

    def __init__(self, model: KVCacheLM) -> None:
        missing = [name for name in (PROMPT, TOKEN) if name not in session.graphs]
        if missing:
            raise SambaRunError(
                f"cached generation needs the '{PROMPT}' and '{TOKEN}' graphs loaded; missing {missing} "
                f"(loaded: {sorted(session.graphs) or 'one unnamed graph'}). Compile with "
                "inputs=cached_graph_inputs(model, prompt_length) and trace_graph with the same dict"
            )
        self.model = model
        self.batch_size = model.batch_size
        self.prompt_length = _input_length(PROMPT)
        self.max_seq_length = model.max_seq_length

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> list[list[int]]:
        """The new tokens of each prompt (token ids), stopping at `eos_token_id` (kept) or after
        `max_new_tokens`."""
        lengths = self._check(prompts, max_new_tokens)
        sampling = sampling or Sampling()
        logits = self._prompt(prompts, lengths, pad_token_id)
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        positions = torch.tensor(lengths + [1] * (self.batch_size - len(prompts)), dtype=torch.int32)
        for step in range(max_new_tokens):
            tokens = sampling.next_tokens(logits)
            for row in range(len(prompts)):
                if not done[row]:
                    new[row].append(int(tokens[row]))
                    done[row] = eos_token_id is not None and new[row][-1] == eos_token_id
            if all(done) or step + 1 == max_new_tokens:
                break
            logits = self._token(tokens, positions + step)
        return new

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[int]:
        if not 1 <= len(prompts) <= self.batch_size:
            raise SambaRunError(
                f"{len(prompts)} prompts: the generation graphs were compiled for batch size "
                f"{self.batch_size}; give 1 to {self.batch_size} prompts per call (or recompile with -b)"
            )
        lengths = [len(p) for p in prompts]
        too_long = [i for i, n in enumerate(lengths) if not 1 <= n <= self.prompt_length]
        if too_long:
            raise SambaRunError(
                f"prompt {too_long[0]} has {lengths[too_long[0]]} tokens: the prompt graph was compiled for "
                f"1 to {self.prompt_length} tokens; shorten it or recompile with a longer prompt length"
            )
        if max_new_tokens < 1 or max(lengths) + max_new_tokens - 1 > self.max_seq_length:
            raise SambaRunError(
                f"max_new_tokens {max_new_tokens}: a prompt of {max(lengths)} tokens leaves room for 1 to "
                f"{self.max_seq_length - max(lengths) + 1} new tokens in the compiled KV cache of "
                f"{self.max_seq_length} positions; ask for fewer or recompile with a larger --max-seq-length"
            )
        return lengths

    def _prompt(self, prompts: Sequence[Sequence[int]], lengths: list[int], pad: int) -> torch.Tensor:
        ids = torch.full((self.batch_size, self.prompt_length), pad, dtype=torch.int32)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.int32)
        last = torch.tensor(lengths + [0] * (self.batch_size - len(prompts)), dtype=torch.int32) - 1
        positions = torch.arange(self.prompt_length, dtype=torch.int32).expand_as(ids).contiguous()
        feeds = {"input_ids": ids, "position_ids": positions, "last_index": last.clamp(min=0)}
        return session.run(feeds, graph_name=PROMPT)[0]

    def _token(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = self.batch_size
        feeds = {
            "input_ids": tokens.to(torch.int32).view(batch, 1),
            "position_ids": positions.view(batch, 1),
            "last_index": torch.zeros(batch, dtype=torch.int32),
        }
        return session.run(feeds, graph_name=TOKEN)[0]


def _input_length(graph: str) -> int:
    spec = next(s for s in session.graphs[graph].graph.inputs if s.name == "input_ids")
    return spec.shape[1]

"""Cached generation (KVCacheLM's prompt and token graphs) gives Hugging Face `generate`'s tokens.

Greedy decoding must produce exactly the tokens of `generate(use_cache=True)` on the same weights,
for Llama (RoPE, grouped-query heads), Mistral (a sliding window shorter than the sequence) and
GPT-2, with prompts of different lengths in one batch. The graphs run on the reference backend
here; one inductor test compiles the pair once into a PEF and checks the same tokens from it (the
KV cache updated in place by compiled code).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_report import find, report, text

from sambaflow import samba
from sambaflow.backends.rewrites import VECTOR_MATMUL_DTYPES, rewrite_for_inductor
from sambaflow.errors import SambaRunError, SambaTraceError
from sambaflow.models.kv_cache import _STREAMED_DTYPES
from sambaflow.passes.sections import full_step_program
from sambaflow.pef.file import PefFile
from sambaflow.samba import utils
from sambaflow.samba.generation import CachedGenerator, KVCacheLM, Sampling, cached_graph_inputs
from sambaflow.trace.tracer import trace_step

transformers = pytest.importorskip("transformers")

VOCAB, MAX_LEN, PROMPT_LEN, NEW = 128, 40, 16, 18


def tiny_lm(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return _tiny_lm(kind, seed).to(dtype)


def _tiny_lm(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    common |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    common |= dict(initializer_range=0.2)  # peaked logits: greedy tokens vary, no near-ties
    common |= dict(bos_token_id=None, eos_token_id=None)  # no token ends or is suppressed by generate
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    if kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=6)
        return transformers.MistralForCausalLM(config).eval()
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def prompts(batch: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [5, 11, 16, 1][:batch]
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def hf_greedy(lm: torch.nn.Module, prompt: list[int], new: int = NEW) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = lm.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def loaded(kind: str, batch: int, pef: str | None = None) -> tuple[torch.nn.Module, KVCacheLM]:
    """(an eager copy, the cached model traced and loaded with its prompt and token graphs)."""
    lm = tiny_lm(kind)
    gold = copy.deepcopy(lm)
    cached = KVCacheLM(lm, batch, MAX_LEN)
    samba.from_torch_model_(cached)
    utils.trace_graph(cached, cached_graph_inputs(cached, PROMPT_LEN), pef=pef, backend="reference")
    return gold, cached


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
def test_greedy_equals_hugging_face_generate_with_its_cache(kind):
    gold, cached = loaded(kind, batch=3)
    given = prompts(3)
    got = CachedGenerator(cached).generate(given, NEW)
    for prompt, tokens in zip(given, got):
        expected = hf_greedy(gold, prompt)
        assert tokens == expected, f"{kind}: prompt of {len(prompt)} tokens"
        assert len(set(tokens)) > 3  # a real sequence, not one repeated token


def test_a_batch_smaller_than_compiled_and_a_second_call_reuse_the_cache():
    gold, cached = loaded("llama", batch=3)
    generator = CachedGenerator(cached)
    first, second = prompts(3, seed=5)[:1], prompts(2, seed=6)
    assert generator.generate(first, NEW) == [hf_greedy(gold, first[0])]
    assert generator.generate(second, 4) == [hf_greedy(gold, p, 4) for p in second]


def test_eos_stops_a_sequence_and_keeps_the_eos_token():
    gold, cached = loaded("llama", batch=1)
    prompt = prompts(1)[0]
    expected = hf_greedy(gold, prompt)
    eos = expected[6]
    got = CachedGenerator(cached).generate([prompt], NEW, eos_token_id=eos)[0]
    assert got == expected[: expected.index(eos) + 1]


def test_sampling_follows_hugging_face_top_k_and_top_p():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(4, VOCAB) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.7), (20, 0.5)]:
        kept = Sampling(do_sample=True, top_k=top_k, top_p=top_p).filtered(scores)
        expected = scores.clone()
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        assert torch.equal(kept.isinf(), expected.isinf()), (top_k, top_p)


def test_seeded_sampling_repeats_and_top_k_one_is_greedy():
    gold, cached = loaded("llama", batch=2)
    generator, given = CachedGenerator(cached), prompts(2)
    sampled = [generator.generate(given, 8, Sampling(True, temperature=1.5, seed=3)) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != generator.generate(given, 8)  # hot sampling leaves the greedy path
    assert generator.generate(given, 8, Sampling(True, top_k=1, seed=4)) == generator.generate(given, 8)


def test_bad_requests_name_the_limit():
    _, cached = loaded("llama", batch=2)
    generator = CachedGenerator(cached)
    with pytest.raises(SambaRunError, match="compiled for 1 to 16 tokens"):
        generator.generate([list(range(17))], 2)
    with pytest.raises(SambaRunError, match="compiled for batch size 2"):
        generator.generate(prompts(3), 2)
    with pytest.raises(SambaRunError, match="room for 1 to 25 new tokens"):
        generator.generate([list(range(16))], 26)
    with pytest.raises(SambaRunError, match="no graph named 'tokens'"):
        samba.session.run({}, graph_name="tokens")
    with pytest.raises(SambaRunError, match="temperature"):
        Sampling(True, temperature=0)


def test_dict_inputs_are_forward_only_graphs():
    cached = KVCacheLM(tiny_lm("llama"), 1, MAX_LEN)
    samba.from_torch_model_(cached)
    optim = samba.optim.SGD(cached.parameters(), lr=0.1)
    with pytest.raises(SambaTraceError, match="forward-only"):
        utils.trace_graph(cached, cached_graph_inputs(cached, 8), optim, backend="reference")
    with pytest.raises(SambaTraceError, match="not allowed"):
        utils.trace_graph(cached, {"a/b": cached_graph_inputs(cached, 8)["token"]}, backend="reference")
    with pytest.raises(SambaRunError, match="prompt_length 40"):
        cached_graph_inputs(cached, MAX_LEN)


def test_generation_pef_holds_prompt_and_token_graphs(tmp_path):
    lm = tiny_lm("llama")
    gold = copy.deepcopy(lm)
    cached = KVCacheLM(lm, 2, MAX_LEN)
    samba.from_torch_model_(cached)
    config = {"output_folder": str(tmp_path), "pef_name": "gen"}
    path = samba.session.compile(cached, cached_graph_inputs(cached, PROMPT_LEN), None, config_dict=config)
    assert PefFile(path).kinds == ["prompt", "token"]
    page = report(path, tmp_path, "--measure", "-n", "1")  # the report shows both, times the token graph
    for kind in ("prompt", "token"):
        assert find(page.root, "div", **{"class": "graph", "data-graph": kind})
    assert "tokens/s" in text(find(page.root, "section", id="measured")[0])
    samba.session.reset()
    _, reloaded = gold, KVCacheLM(copy.deepcopy(gold), 2, MAX_LEN)
    samba.from_torch_model_(reloaded)
    utils.trace_graph(reloaded, cached_graph_inputs(reloaded, PROMPT_LEN), pef=path)
    given = prompts(2)
    assert CachedGenerator(reloaded).generate(given, NEW) == [hf_greedy(gold, p) for p in given]
    # a forward-only PEF of one graph has no token program
    samba.session.reset()
    plain = KVCacheLM(copy.deepcopy(gold), 2, MAX_LEN)
    samba.from_torch_model_(plain)
    utils.trace_graph(plain, cached_graph_inputs(plain, PROMPT_LEN)["token"], backend="reference")
    with pytest.raises(SambaRunError, match="needs the 'prompt' and 'token' graphs"):
        CachedGenerator(plain)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "dtype", "batch"),
    [("llama", torch.float32, 2), ("gpt2", torch.float32, 1), ("gpt2", torch.bfloat16, 1)],
)
def test_inductor_pef_generates_hugging_face_tokens(tmp_path, monkeypatch, kind, dtype, batch):
    """fp32 Llama, two sequences; GPT-2 at batch 1, whose token program multiplies one row by
    column-major Conv1D weights (the vector_matmul rewrite), fp32 and bf16."""
    monkeypatch.setenv("SAMBAFLOW_BACKEND", "inductor")
    lm = tiny_lm(kind, dtype=dtype)
    gold = copy.deepcopy(lm)
    cached = KVCacheLM(lm, batch, MAX_LEN)
    samba.from_torch_model_(cached)
    config = {"output_folder": str(tmp_path), "pef_name": "gen"}
    path = samba.session.compile(cached, cached_graph_inputs(cached, PROMPT_LEN), None, config_dict=config)
    samba.session.reset()
    utils.trace_graph(cached, cached_graph_inputs(cached, PROMPT_LEN), pef=path)
    store = samba.session.store
    before = store["key_cache_0"].data_ptr()
    given = prompts(batch)
    assert CachedGenerator(cached).generate(given, NEW) == [hf_greedy(gold, p) for p in given]
    assert store["key_cache_0"].data_ptr() == before  # the cache is written in place
    assert store["key_cache_0"].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_conv1d_weights_turn_column_major_for_the_token_products(dtype):
    """KVCacheLM stores GPT-2's `[in, out]` Conv1D weights column-major (same values), so every
    one-row product of the token program takes the rewrite's streamed form."""
    assert _STREAMED_DTYPES == VECTOR_MATMUL_DTYPES
    lm = tiny_lm("gpt2", dtype=dtype)
    gold = copy.deepcopy(lm)
    cached = KVCacheLM(lm, 1, MAX_LEN)
    conv = [m for m in lm.modules() if isinstance(m, transformers.pytorch_utils.Conv1D)]
    assert len(conv) == 8
    for module in conv:
        rows = module.weight.shape[0]
        assert module.weight.stride() == (1, rows)
    assert all(torch.equal(a, b) for a, b in zip(gold.state_dict().values(), lm.state_dict().values()))
    samba.from_torch_model_(cached)
    token = trace_step(cached, cached_graph_inputs(cached, PROMPT_LEN)["token"], [], backward=False)
    module = rewrite_for_inductor(full_step_program(token).module)
    products = [
        n for n in module.graph.nodes if n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    ]
    assert not products, [n.format_node() for n in products]


def test_conv1d_weights_of_other_dtypes_keep_their_layout():
    half = tiny_lm("gpt2", dtype=torch.float16)
    KVCacheLM(half, 1, MAX_LEN)
    assert all(
        m.weight.is_contiguous() for m in half.modules() if isinstance(m, transformers.pytorch_utils.Conv1D)
    )

"""A tiny Hugging Face GPT-2 through session.run equals eager transformers (reference and inductor).

The model is traced in training mode with GPT-2's dropouts (0.1) and run with `p=0`, so the
graph's dropouts (modules and SDPA's `dropout_p`) must all follow the run-time `p` to match
eager `model.eval()`. Inputs use the dtypes SambaFlow's GPT-2 tutorial feeds: int32 token ids,
int16 position ids and labels.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from test_apps_e2e import load_example
from torch import nn

from sambaflow import samba
from sambaflow.samba import utils

from helpers import rel_err

transformers = pytest.importorskip("transformers")
GPT2_APP = load_example("gpt2_app")  # the tutorial's parameter groups and generation inputs

BATCH, SEQ, VOCAB = 4, 16, 96
TOLERANCE = {"reference": 2e-5, "inductor": 2e-4}


@pytest.fixture(params=["reference", pytest.param("inductor", marks=pytest.mark.slow)])
def backend(request, monkeypatch):
    monkeypatch.setenv("SAMBAFLOW_BACKEND", request.param)
    return request.param


# Semantics that the graph and session decide; the inductor backend runs the same GPT-2 code paths
# in tests/test_gpt2_app.py (per-token loss seeded with a vector `sn_grad`, greedy generation from
# an inference PEF), so these compile nothing (each inductor compile here costs 10-40 s).
reference_only = pytest.mark.parametrize("backend", ["reference"], indirect=True)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=VOCAB, use_cache=False
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).train()


def pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(eager gold in eval mode, converted copy in train mode with dropout 0.1) of one GPT-2."""
    model = tiny_gpt2(seed)
    gold = copy.deepcopy(model).eval()
    samba.from_torch_model_(model)
    return gold, model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = ids.clone()
    labels[:, -3:] = -100  # ignored positions, as padded completions are
    return ids, labels


def tutorial_inputs(ids: torch.Tensor, labels: torch.Tensor, expanded: bool = True) -> tuple:
    """GPT2LMHeadModel.forward's positional arguments, as SambaFlow's tutorial passes them.

    The tutorial's position ids are an expanded (stride-0) view; `expanded=False` feeds them dense.
    """
    positions = torch.arange(ids.shape[1]).short().unsqueeze(0).expand(ids.shape)
    positions = positions if expanded else positions.contiguous()
    return (
        samba.from_torch_tensor(ids.int(), name="input_ids"),
        None,
        None,
        None,
        samba.from_torch_tensor(positions, name="input_position_ids"),
        None,
        None,
        None,
        None,
        samba.from_torch_tensor(labels.short(), name="labels"),
    )


def three_adamw(model: nn.Module, make: type, max_grad_norm: float | None) -> list:
    """The tutorial's grouping (examples/gpt2_app.py): embeddings, decayed weights, biases and
    LayerNorms undecayed."""
    embeddings, decay, no_decay = GPT2_APP.parameter_groups(model)
    clip = {} if make is torch.optim.AdamW else {"max_grad_norm": max_grad_norm}
    settings = dict(lr=2e-3, betas=(0.9, 0.997), eps=1e-8, **clip)
    return [
        # weight decay 0.5 (the tutorial's is 0.1): a lost decay term then moves weights by 1e-2
        make(embeddings, weight_decay=0.5, **settings),
        make(decay, weight_decay=0.5, **settings),
        make(no_decay, weight_decay=0.0, **settings),
    ]


def test_forward_matches_eval_mode_and_dropout_follows_p(backend):
    gold, model = pair()
    ids, labels = batch()
    inputs = tutorial_inputs(ids, labels)
    outputs = utils.trace_graph(model, inputs, None, backend=backend)
    graph = samba.session.executable.graph
    dtypes = {s.name: s.dtype for s in graph.inputs if s.role == "input"}
    assert dtypes == {"input_ids": torch.int32, "input_position_ids": torch.int16, "labels": torch.int16}
    dropouts = [s.name for s in graph.inputs if s.role == "hyper"]
    assert "transformer__h__0__attn__attention__p" in dropouts  # SDPA's dropout_p is an input
    assert "transformer__drop__p" in dropouts and "transformer__h__1__mlp__dropout__p" in dropouts

    loss, logits = samba.session.run(inputs, outputs, hyperparam_dict={"p": 0.0})[:2]
    with torch.no_grad():
        want = gold(ids, labels=labels)
    tol = TOLERANCE[backend]
    assert rel_err(loss, want.loss) < tol and rel_err(logits, want.logits) < tol

    dropped = samba.session.run(inputs, outputs, hyperparam_dict={"p": 0.3})[1]
    assert rel_err(dropped, want.logits) > 1e-2  # dropout is on again: p really is a run-time input
    only_attention = {"p": 0.0, "transformer__h__0__attn__attention__p": 0.5}
    attention = samba.session.run(inputs, outputs, hyperparam_dict=only_attention)[1]
    assert rel_err(attention, want.logits) > 1e-3


def test_ten_adamw_steps_three_groups_with_clipping(backend):
    gold, model = pair()
    initial = [p.detach().clone() for p in gold.parameters()]
    optims = three_adamw(model, samba.optim.AdamW, max_grad_norm=0.5)
    gold_optims = three_adamw(gold, torch.optim.AdamW, None)
    ids, labels = batch()
    outputs = utils.trace_graph(model, tutorial_inputs(ids, labels), optims, backend=backend)
    clipped = 0
    for step in range(10):
        ids, labels = batch()
        inputs = tutorial_inputs(ids, labels, expanded=step % 2 == 0)  # traced expanded, fed both ways
        loss = samba.session.run(inputs, outputs, hyperparam_dict={"p": 0.0})[0]
        for opt in gold_optims:
            opt.zero_grad()
        want = gold(ids, labels=labels).loss
        want.backward()
        for opt in gold_optims:
            params = [p for group in opt.param_groups for p in group["params"]]
            clipped += float(torch.nn.utils.clip_grad_norm_(params, 0.5)) > 0.5
            opt.step()
        assert rel_err(loss, want) < TOLERANCE[backend], f"step {step}"
    assert clipped >= 10, "clipping never engaged: the test would not see it"
    samba.session.to_cpu(model)
    for (name, got), want, start in zip(model.named_parameters(), gold.parameters(), initial):
        # Adam turns a gradient near 0 into a full step of either sign, so a rounding difference can
        # move one element by 2 lr; the change of each tensor, as a whole, must agree closely.
        change = (got.detach() - start).norm() / (want.detach() - start).norm()
        drift = (got.detach() - want.detach()).norm() / (want.detach() - start).norm()
        assert abs(change - 1) < 2e-3 and drift < 2e-3, f"{name}: {drift:.1e}"


class TokenLoss(nn.Module):
    """GPT-2 with a per-token loss (reduction='none') and the logits, like SambaFlow's patched head."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, labels):
        logits = self.lm(input_ids=input_ids, position_ids=position_ids).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="none")
        return loss, logits * 1


@reference_only
def test_per_token_loss_with_a_vector_output_gradient(backend):
    gold_lm, lm = pair()
    gold, model = TokenLoss(gold_lm), TokenLoss(lm)
    optim = samba.optim.AdamW(model.parameters(), lr=0.0)
    ids, labels = batch()
    positions = torch.arange(SEQ).short().unsqueeze(0).expand(BATCH, SEQ)
    names = ("input_ids", "input_position_ids", "labels")
    values = (ids.int(), positions, labels.short())
    inputs = [samba.from_torch_tensor(v, name=n) for n, v in zip(names, values)]
    outputs = utils.trace_graph(model, inputs, optim, backend=backend)
    scale = torch.rand(BATCH * SEQ)
    scale /= scale.sum()
    outputs[0].sn_grad = scale
    loss = samba.session.run(inputs, outputs, hyperparam_dict={"p": 0.0})[0]
    want, _ = gold(ids, positions.long(), labels)
    (want * scale).sum().backward()
    tol = TOLERANCE[backend]
    assert loss.shape == (BATCH * SEQ,) and rel_err(loss, want) < tol
    for (name, param), reference in zip(model.named_parameters(), gold.parameters()):
        assert rel_err(param.sn_grad, reference.grad) < tol * 5, name


@reference_only
def test_greedy_generation_through_session_run_matches_generate(backend, monkeypatch):
    gold, model = pair(seed=3)
    length = 16
    trace_inputs = generation_inputs(torch.zeros(1, length, dtype=torch.long), length)
    outputs = utils.trace_graph(model, trace_inputs, None, backend=backend)
    prompt = torch.randint(0, VOCAB, (1, 5))
    want = gold.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)

    def forward_on_device(self, *args, **kwargs):
        given = kwargs["input_ids"].shape[1]
        inputs = generation_inputs(kwargs["input_ids"], length)
        logits = samba.session.run(inputs, outputs, hyperparam_dict={"p": 0.0}, section_types=["fwd"])[0]
        return transformers.modeling_outputs.CausalLMOutput(logits=logits[:, :given].float())

    monkeypatch.setattr(type(model), "__call__", forward_on_device)
    got = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert got.tolist() == want.tolist()


def generation_inputs(ids: torch.Tensor, length: int) -> tuple:
    """A prompt padded to the compiled length, with its attention mask (as the tutorial feeds it)."""
    return GPT2_APP.generation_inputs(ids, length, pad_id=0)


def test_optimizer_groups_are_disjoint_and_cover_the_model():
    _, model = pair()
    optims = three_adamw(model, samba.optim.AdamW, 1.0)
    owned = list(itertools.chain(*[opt.params for opt in optims]))
    assert len({id(p) for p in owned}) == len(owned) == len(list(model.parameters()))

"""The SambaFlow names SambaNova's GPT-2 tutorial imports: logger, op_fusion, lazy SambaParameter,
OrderedSet and samba.addmm."""

from __future__ import annotations

import copy
import functools
import gc
import itertools
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from sambaflow import samba
from sambaflow.errors import SambaArgumentError, SambaError
from sambaflow.logging import samba_logger, set_log_level
from sambaflow.samba.directives import fusion_directives, fusion_groups, op_fusion
from sambaflow.samba.nn.parameter import SambaParameter
from sambaflow.sambacollections import OrderedSet

from helpers import rel_err


@pytest.fixture
def sambaflow_records():
    """Records that reach the "sambaflow" logger's handlers; level restored afterwards."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("sambaflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    samba_logger.reset_limits()
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def messages(records):
    return [(r.levelname, r.getMessage()) for r in records]


def test_log_limit_counts_per_message_text(sambaflow_records):
    for _ in range(5):
        samba_logger.warning("Warning: Patched GPT2LMhead function used", log_limit=1)
        samba_logger.warning("Warning: No labels provided, returning logits")
        samba_logger.error("seen %d times at most", 3, log_limit=2)
    assert messages(sambaflow_records).count(("WARNING", "Warning: Patched GPT2LMhead function used")) == 1
    assert (
        messages(sambaflow_records).count(("WARNING", "Warning: No labels provided, returning logits")) == 5
    )
    assert messages(sambaflow_records).count(("ERROR", "seen 3 times at most")) == 2
    assert sambaflow_records[0].pathname == __file__  # attributed to the caller, not the wrapper
    with pytest.raises(SambaArgumentError, match="log_limit"):
        samba_logger.info("x", log_limit=-1)


def test_set_log_level_filters_and_filtered_messages_do_not_use_the_limit(sambaflow_records):
    samba_logger.info("hidden at warning", log_limit=1)
    samba_logger.debug("debug hidden")
    set_log_level("DEBUG")
    samba_logger.info("hidden at warning", log_limit=1)
    samba_logger.debug("debug shown")
    set_log_level("error")
    samba_logger.warning("warning hidden")
    samba_logger.critical("critical shown")
    assert messages(sambaflow_records) == [
        ("INFO", "hidden at warning"),
        ("DEBUG", "debug shown"),
        ("CRITICAL", "critical shown"),
    ]
    with pytest.raises(SambaArgumentError, match="debug, info, warning, error, critical"):
        set_log_level("verbose")


def test_default_is_warning_on_stderr_in_a_fresh_process():
    code = (
        "from sambaflow.logging import samba_logger as log\n"
        "log.info('hidden')\n"
        "for _ in range(3): log.warning('shown %s', 'once', log_limit=1)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr == "[sambaflow] WARNING: shown once\n" and result.stdout == ""


def test_messages_follow_the_current_stderr(capsys, sambaflow_records):
    samba_logger.reset_limits()
    samba_logger.warning("to stderr %s", "now", log_limit=1)
    samba_logger.warning("to stderr %s", "now", log_limit=1)
    assert capsys.readouterr().err.count("[sambaflow] WARNING: to stderr now") == 1


def test_op_fusion_is_recorded_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    x = torch.randn(3, 4)
    want = model(x)
    assert op_fusion(model[1], "Encoder") is model[1]
    layers = [model[0], model[1][1]]
    assert op_fusion(layers, "Head") is layers
    assert model[1].sn_op_fusion == "Encoder" and model[1][1].sn_op_fusion == "Head"
    assert ("Encoder", model[1]) in [(n, m) for n, m in fusion_directives()]
    assert fusion_groups(model) == {"Head": ["0", "1.1"], "Encoder": ["1"]}
    assert fusion_groups(copy.deepcopy(model)) == fusion_groups(model)
    assert torch.equal(model(x), want)


def test_op_fusion_registry_keeps_no_module_alive():
    op_fusion(nn.Linear(2, 2), "Gone")
    gc.collect()
    assert "Gone" not in [name for name, _ in fusion_directives()]


@pytest.mark.parametrize(
    "args, match",
    [
        (("not a module", "Encoder"), "expected an nn.Module"),
        (([], "Encoder"), "expected an nn.Module"),
        ((nn.Linear(2, 2), ""), "non-empty string"),
        ((nn.Linear(2, 2), 3), "non-empty string"),
    ],
)
def test_op_fusion_bad_arguments(args, match):
    with pytest.raises(SambaArgumentError, match=match):
        op_fusion(*args)


def transpose_materializer(tensor, original_tensor):
    return original_tensor.torch_tensor().transpose(1, 0)


class TiedHead(nn.Module):
    """The tutorial's pattern: lm_head holds a lazily materialized transpose of the embedding."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(7, 5)
        samba.from_torch_model_(self)
        original = self.wte.weight
        self.head = SambaParameter(
            shape=reversed(original.shape),
            dtype=original.dtype,
            materializer=functools.partial(transpose_materializer, original_tensor=original),
            requires_grad=original.requires_grad,
        )

    def forward(self, ids):
        return samba.addmm(None, self.wte(ids), self.head)


def test_lazy_sambaparameter_is_the_materialized_transpose_and_gets_a_name():
    model = TiedHead()
    head = model.head
    assert SambaParameter is samba.SambaParameter and isinstance(head, nn.Parameter)
    assert head.shape == (5, 7) and head.requires_grad and head.sn_name is None
    assert torch.equal(head, model.wte.weight.detach().t())
    assert head.data_ptr() != model.wte.weight.data_ptr()  # a copy, filled right away
    samba.from_torch_model_(model)
    assert model.head is head and head.sn_name == "head" and model.wte.weight.sn_name == "wte__weight"
    logits = model(torch.tensor([[0, 3, 6]]))
    logits.sum().backward()
    assert logits.shape == (1, 3, 7) and head.grad is not None and head.grad.shape == (5, 7)


def test_lazy_sambaparameter_errors_and_dtype():
    half = SambaParameter(shape=[2, 3], dtype=torch.float16, materializer=lambda t: torch.ones(2, 3))
    assert half.dtype == torch.float16 and torch.equal(half, torch.ones(2, 3, dtype=torch.float16))
    assert torch.equal(SambaParameter(shape=iter([2])), torch.zeros(2))
    with pytest.raises(SambaArgumentError, match=r"returned shape \(3, 2\).*shape=\(2, 3\)"):
        SambaParameter(shape=(2, 3), materializer=lambda t: torch.ones(3, 2))
    with pytest.raises(SambaArgumentError, match="not a tensor"):
        SambaParameter(shape=(2,), materializer=lambda t: [1.0, 2.0])
    with pytest.raises(SambaArgumentError, match="need shape="):
        SambaParameter(materializer=lambda t: t)
    with pytest.raises(SambaArgumentError, match="either data or shape"):
        SambaParameter(torch.ones(2), shape=(2,))
    with pytest.raises(SambaArgumentError, match="non-negative ints"):
        SambaParameter(shape=(2, -1))
    legacy = SambaParameter(torch.ones(2), False, "w")  # the positional form still works
    assert legacy.sn_name == "w" and not legacy.requires_grad


def test_ordered_set_is_identity_keyed_and_ordered():
    a, b = torch.zeros(3), torch.zeros(3)  # equal values, different tensors
    s = OrderedSet([b, a, b])
    assert len(s) == 2 and list(s)[0] is b and list(s)[1] is a
    assert a in s and torch.zeros(3) not in s and "x" not in s and [1] not in s
    s.discard(b)
    assert list(s) == [a] and repr(s).startswith("OrderedSet([tensor(")
    s.update([b], [a])
    assert [id(t) for t in s] == [id(a), id(b)]


def test_ordered_set_of_name_parameter_pairs_like_the_tutorial():
    model = nn.ModuleDict({"emb": nn.Embedding(4, 3), "lin": nn.Linear(3, 3), "pos": nn.Embedding(4, 3)})
    with torch.no_grad():
        model["pos"].weight.copy_(model["emb"].weight)  # equal values must not merge them
    emb_params = OrderedSet(itertools.chain(*[model[k].parameters() for k in ("emb", "pos")]))
    assert len(emb_params) == 2 and model["lin"].weight not in emb_params
    rest = OrderedSet([(n, p) for n, p in model.named_parameters() if p not in emb_params])
    assert [n for n, _ in rest] == ["lin.weight", "lin.bias"]
    assert ("lin.weight", model["lin"].weight) in rest
    assert ("lin.weight", model["lin"].weight.detach()) not in rest
    assert ("lin.bias", model["lin"].weight) not in rest
    assert OrderedSet([1, (2, "x"), 1]) == {1, (2, "x")}  # plain values hash as usual


@pytest.mark.parametrize("is_transposed", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_addmm_matches_torch_on_3d_input(is_transposed, with_bias):
    x = samba.randn(4, 6, 8, name="x", batch_dim=0)
    weight = torch.randn(16, 8) if is_transposed else torch.randn(8, 16)
    param = samba.SambaParameter(weight, name="w")
    bias = samba.SambaParameter(torch.randn(16), name="b") if with_bias else None
    got = samba.addmm(bias, x, param, is_transposed=is_transposed)
    w64 = weight.double().t() if is_transposed else weight.double()
    want = x.torch().double() @ w64 + (bias.torch().double() if with_bias else 0)
    assert got.shape == (4, 6, 16) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("is_transposed", [True, False])
def test_addmm_gradients_match_torch(is_transposed):
    x = torch.randn(3, 5, 8, requires_grad=True)
    shape = (6, 8) if is_transposed else (8, 6)
    weight = SambaParameter(torch.randn(*shape), name="w")
    bias = SambaParameter(torch.randn(6), name="b")
    upstream = torch.randn(3, 5, 6)
    (samba.addmm(bias, x, weight, is_transposed=is_transposed) * upstream).sum().backward()
    x2, w2, b2 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    w_used = w2.t() if is_transposed else w2
    ((x2 @ w_used + b2) * upstream.double()).sum().backward()
    for got, want in ((x.grad, x2.grad), (weight.grad, w2.grad), (bias.grad, b2.grad)):
        assert rel_err(got, want) < 1e-6


def test_addmm_traces_with_make_fx_and_rejects_mismatched_shapes():
    def step(bias, x, weight):
        return samba.addmm(bias, x, weight, is_transposed=True)

    args = (torch.randn(4), torch.randn(2, 3, 5), torch.randn(4, 5))
    graph = make_fx(step, tracing_mode="fake")(*args)
    assert "aten" in graph.code and rel_err(graph(*args), step(*args)) < 1e-6
    with pytest.raises(SambaArgumentError, match="flip is_transposed") as info:
        samba.addmm(None, torch.randn(2, 5), torch.randn(4, 5), is_transposed=False)
    assert isinstance(info.value, SambaError)

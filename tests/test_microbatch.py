"""Micro-batching (-mb) and gradient accumulation (--grad-accumulation-steps): a step made of parts
equals the step on the whole batch, against the full-batch step and eager PyTorch, on fresh data."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sambaflow import samba
from sambaflow.app.compile import compile_pef
from sambaflow.errors import SambaTraceError
from sambaflow.samba import utils

from helpers import named_inputs, rel_err
from models import LeNet, ResFFNLogReg

BATCH = 16


def ffn() -> nn.Module:
    return ResFFNLogReg(32, 24, 5)


def ffn_batch(generator: torch.Generator, batch: int = BATCH) -> list[torch.Tensor]:
    return [torch.randn(batch, 32, generator=generator), torch.randint(0, 5, (batch,), generator=generator)]


def lenet_batch(generator: torch.Generator, batch: int = 8) -> list[torch.Tensor]:
    return [
        torch.randn(batch, 1, 28, 28, generator=generator),
        torch.randint(0, 10, (batch,), generator=generator),
    ]


def sgd(model: nn.Module):
    return samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def adamw_clipped(model: nn.Module):
    return samba.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)


def train(make_model, make_optim, batches, backend="reference", **trace_kwargs):
    """Parameters after a run per batch, and every run's outputs."""
    torch.manual_seed(0)
    model = make_model()
    samba.from_torch_model_(model)
    optim = make_optim(model)
    outs = utils.trace_graph(
        model, named_inputs(["x", "y"], batches[0]), optim, backend=backend, **trace_kwargs
    )
    results = []
    for batch in batches:
        results.append([t.clone() for t in samba.session.run(named_inputs(["x", "y"], batch), outs)])
    samba.session.to_cpu(model)
    return [p.detach().clone() for p in model.parameters()], results


def assert_close(got, want, tol):
    worst = max(rel_err(a, b) for a, b in zip(got, want))
    assert worst < tol, f"differs by {worst:.2e}"


@pytest.mark.parametrize("make_optim", [sgd, adamw_clipped], ids=["sgd", "adamw_clip"])
def test_microbatched_ffn_equals_full_batch(make_optim):
    generator = torch.Generator().manual_seed(1)
    batches = [ffn_batch(generator) for _ in range(10)]
    want, want_out = train(ffn, make_optim, batches)
    got, got_out = train(ffn, make_optim, batches, microbatch_size=4)
    assert_close(got, want, 1e-5)
    for step, (a, b) in enumerate(zip(got_out, want_out)):
        assert a[0].shape == b[0].shape == () and a[1].shape == b[1].shape == (BATCH, 5), step
        assert_close(a, b, 1e-5)  # the loss is the whole batch's mean; logits the whole batch's
    unsplit, _ = train(ffn, make_optim, [batches[0]] * 10)
    assert max(rel_err(a, b) for a, b in zip(unsplit, want)) > 1e-2  # fresh batches do matter


def test_microbatched_lenet_equals_full_batch():
    generator = torch.Generator().manual_seed(2)
    batches = [lenet_batch(generator) for _ in range(10)]
    want, _ = train(LeNet, sgd, batches)
    got, _ = train(LeNet, sgd, batches, microbatch_size=2)
    assert_close(got, want, 1e-5)


@pytest.mark.slow
def test_microbatched_steps_on_inductor():
    generator = torch.Generator().manual_seed(3)
    batches = [ffn_batch(generator) for _ in range(10)]
    want, _ = train(ffn, adamw_clipped, batches)
    got, _ = train(ffn, adamw_clipped, batches, backend="inductor", microbatch_size=8)
    assert_close(got, want, 2e-4)
    lenet_batches = [lenet_batch(generator) for _ in range(10)]
    want, _ = train(LeNet, sgd, lenet_batches)
    got, _ = train(LeNet, sgd, lenet_batches, backend="inductor", microbatch_size=4)
    assert_close(got, want, 2e-4)


def test_microbatch_size_must_divide_the_batch():
    model = ffn()
    samba.from_torch_model_(model)
    inputs = named_inputs(["x", "y"], ffn_batch(torch.Generator().manual_seed(0)))
    with pytest.raises(SambaTraceError, match=r"micro-batch size 3 does not divide the batch size 16.*-mb"):
        utils.trace_graph(model, inputs, sgd(model), microbatch_size=3)


class SumLoss(nn.Module):
    """A loss that sums over the batch: micro-batch losses must add up, not average."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5))
        self.criterion = nn.CrossEntropyLoss(reduction="sum")

    def forward(self, x, y):
        logits = self.body(x)
        return self.criterion(logits, y), logits


class PerSampleLoss(nn.Module):
    """reduction='none': the app seeds the per-sample losses itself (out.sn_grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5))
        self.criterion = nn.CrossEntropyLoss(reduction="none")

    def forward(self, x, y):
        return self.criterion(self.body(x), y)


def test_sum_loss_keeps_its_meaning():
    generator = torch.Generator().manual_seed(4)
    batches = [ffn_batch(generator) for _ in range(10)]
    want, want_out = train(SumLoss, sgd, batches)
    got, got_out = train(SumLoss, sgd, batches, microbatch_size=4)
    assert_close(got, want, 1e-5)
    assert_close([o[0] for o in got_out], [o[0] for o in want_out], 1e-5)


def test_per_sample_loss_with_output_gradients():
    generator = torch.Generator().manual_seed(5)
    batches = [ffn_batch(generator) for _ in range(10)]
    weights = torch.rand(BATCH, generator=generator)

    def run(**kwargs):
        torch.manual_seed(0)
        model = PerSampleLoss()
        samba.from_torch_model_(model)
        optim = sgd(model)
        outs = utils.trace_graph(model, named_inputs(["x", "y"], batches[0]), optim, **kwargs)
        for batch in batches:
            samba.session.run(named_inputs(["x", "y"], batch), outs, grad_of_outputs=[weights])
        samba.session.to_cpu(model)
        return list(model.parameters())

    assert_close(run(microbatch_size=4), run(), 1e-5)


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 5))
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x, y):
        logits = self.body(x)
        return self.criterion(logits, y), logits


def test_batchnorm_statistics_follow_micro_batches_like_eager_accumulation():
    """Running statistics are updated once per micro-batch, as eager gradient accumulation does."""
    generator = torch.Generator().manual_seed(6)
    batches = [ffn_batch(generator) for _ in range(5)]
    torch.manual_seed(0)
    eager = BatchNormNet()
    optim = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for x, y in batches:
        optim.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            (eager(xs, ys)[0] / 4).backward()
        optim.step()
    torch.manual_seed(0)
    model = BatchNormNet()
    samba.from_torch_model_(model)
    outs = utils.trace_graph(model, named_inputs(["x", "y"], batches[0]), sgd(model), microbatch_size=4)
    for batch in batches:
        samba.session.run(named_inputs(["x", "y"], batch), outs)
    samba.session.to_cpu(model)
    assert_close(list(model.parameters()), list(eager.parameters()), 1e-5)
    assert_close(list(model.buffers())[:2], list(eager.buffers())[:2], 1e-5)  # running mean, var
    assert int(model.body[1].num_batches_tracked) == int(eager.body[1].num_batches_tracked) == 20


def test_microbatched_pef_runs_as_compiled(tmp_path):
    """A PEF compiled with -mb: the app traces the whole batch at run time and the PEF matches it."""
    generator = torch.Generator().manual_seed(7)
    batches = [ffn_batch(generator) for _ in range(5)]
    torch.manual_seed(0)
    model = ffn()
    samba.from_torch_model_(model)
    config = {"pef": str(tmp_path / "mb.pef"), "microbatch_size": 4, "backend": "reference"}
    path = compile_pef(model, named_inputs(["x", "y"], batches[0]), sgd(model), config_dict=config)
    log = (tmp_path / "mb.compile.log").read_text()
    assert "4 micro-batches of 4 per step" in log and "(mean)" in log
    want, _ = train(ffn, sgd, batches)
    got, _ = train(ffn, sgd, batches, pef=path)
    assert_close(got, want, 1e-5)


# ---------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("make_optim", [sgd, adamw_clipped], ids=["sgd", "adamw_clip"])
def test_accumulating_four_runs_equals_one_step_on_their_batches(make_optim):
    generator = torch.Generator().manual_seed(8)
    parts = [ffn_batch(generator, 4) for _ in range(8)]
    joined = [[torch.cat([p[i] for p in parts[k : k + 4]]) for i in range(2)] for k in (0, 4)]
    want, _ = train(ffn, make_optim, joined)
    got, _ = train(ffn, make_optim, parts, grad_accumulation_steps=4)
    assert_close(got, want, 1e-5)
    every_run, _ = train(ffn, make_optim, parts)
    assert max(rel_err(a, b) for a, b in zip(every_run, want)) > 1e-2


def test_accumulation_updates_only_on_the_kth_run():
    generator = torch.Generator().manual_seed(9)
    torch.manual_seed(0)
    model = ffn()
    samba.from_torch_model_(model)
    outs = utils.trace_graph(
        model, named_inputs(["x", "y"], ffn_batch(generator, 4)), sgd(model), grad_accumulation_steps=3
    )
    start = samba.session.get_tensors_by_name("gemm1__weight")[0]
    seen = []
    for _ in range(6):
        samba.session.run(named_inputs(["x", "y"], ffn_batch(generator, 4)), outs)
        seen.append(not torch.equal(samba.session.get_tensors_by_name("gemm1__weight")[0], start))
        start = samba.session.get_tensors_by_name("gemm1__weight")[0]
    assert seen == [False, False, True, False, False, True]


def test_pef_records_accumulation_and_run_may_override_it(tmp_path):
    generator = torch.Generator().manual_seed(10)
    parts = [ffn_batch(generator, 4) for _ in range(4)]
    torch.manual_seed(0)
    model = ffn()
    samba.from_torch_model_(model)
    config = {"pef": str(tmp_path / "acc.pef"), "grad_accumulation_steps": 2, "backend": "reference"}
    path = compile_pef(model, named_inputs(["x", "y"], parts[0]), sgd(model), config_dict=config)
    joined2 = [[torch.cat([p[i] for p in parts[k : k + 2]]) for i in range(2)] for k in (0, 2)]
    got, _ = train(ffn, sgd, parts, pef=path)  # the PEF's 2
    assert {"grads", "update"} <= set(samba.session.executable.programs)  # compiled into the PEF
    want, _ = train(ffn, sgd, joined2)
    assert_close(got, want, 1e-5)
    got4, _ = train(ffn, sgd, parts, pef=path, grad_accumulation_steps=4)
    joined4 = [[torch.cat([p[i] for p in parts]) for i in range(2)]]
    want4, _ = train(ffn, sgd, joined4)
    assert_close(got4, want4, 1e-5)


def test_app_compiles_with_mb_and_accumulation_and_trains_like_eager(tmp_path):
    """The CLI path: `compile -b 32 -mb 8 --grad-accumulation-steps 2`, then `run -p`: the losses
    are eager's on the same batches (one update per two batches of 32, each split in four)."""
    from test_apps_e2e import app, load_example

    from sambaflow.app import datasets

    argv = ["-b", "32", "--backend", "reference"]
    compiled = app(
        "ffn_app",
        "compile",
        *argv,
        "-mb",
        "8",
        "--grad-accumulation-steps",
        "2",
        "--pef-name",
        "m",
        cwd=tmp_path,
    )
    assert "4 micro-batches of 8 per step" in compiled and "no effect" not in compiled
    app("ffn_app", "run", *argv, "-p", "out/m/m.pef", "-e", "1", "--log-losses", "l.json", cwd=tmp_path)
    got = json.loads((tmp_path / "l.json").read_text())

    utils.set_seed(0)  # the app's seed and initial weights
    model = load_example("ffn_app").ResFFNLogReg(784, 256, 10)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x_train, y_train, _, _ = datasets.load(None)
    batches = datasets.batches(
        x_train.reshape(len(x_train), -1), y_train, 32, True, torch.Generator().manual_seed(0)
    )
    want = []
    for i, (images, labels) in enumerate(batches):
        loss, _ = model(images, labels)
        (loss / 2).backward()
        want.append(float(loss))
        if i % 2 == 1:
            optim.step()
            optim.zero_grad()
    assert len(got) == len(want)
    assert max(abs(a - b) / b for a, b in zip(got, want)) < 1e-4

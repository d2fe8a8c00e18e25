"""The example apps end to end, as a user runs them: compile in one process, run/test/measure in others."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sambaflow.app import datasets
from sambaflow.samba import utils

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BACKEND = ["--backend", "reference"]


def app(name: str, *args: str, cwd: Path, env: dict | None = None) -> str:
    """Run an example app as a user does; its stdout and stderr together."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{name} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eager_losses(
    model,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    flat: bool,
    epochs: int = 1,
    seed: int = 0,
) -> list[float]:
    """The same training, batches and initial weights in plain PyTorch."""
    x_train, y_train, _, _ = datasets.load(None)
    if flat:
        x_train = x_train.reshape(len(x_train), -1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(1000 * seed + epoch)
        for images, labels in datasets.batches(x_train, y_train, batch_size, True, generator):
            optimizer.zero_grad()
            loss, _ = model(images, labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    return losses


CASES = {
    "ffn_app": dict(
        batch=64, build=lambda m: m.ResFFNLogReg(784, 256, 10), lr=0.1, momentum=0.9, wd=1e-4, flat=True
    ),
    "logreg_app": dict(
        batch=32, build=lambda m: m.LogReg(784, 10), lr=0.05, momentum=0.0, wd=1e-4, flat=True
    ),
    "lenet_app": dict(batch=32, build=lambda m: m.LeNet(10), lr=0.05, momentum=0.9, wd=1e-4, flat=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_example_app_end_to_end(name, tmp_path):
    case = CASES[name]
    batch = str(case["batch"])
    compiled = app(name, "compile", "-b", batch, "--pef-name", "model", *BACKEND, cwd=tmp_path)
    pef = tmp_path / "out" / "model" / "model.pef"
    assert pef.is_file() and "wrote out/model/model.pef" in compiled
    assert (tmp_path / "out" / "model" / "model.compile.log").is_file()

    ran = app(
        name, "run", "-b", batch, "-p", str(pef), "-e", "1", "--log-losses", "losses.json", cwd=tmp_path
    )
    assert "Epoch [1/1]" in ran and "Test Accuracy:" in ran
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, "training loss falls"

    module = load_example(name)
    utils.set_seed(0)
    expected = eager_losses(
        case["build"](module), case["batch"], case["lr"], case["momentum"], case["wd"], case["flat"]
    )
    assert len(losses) == len(expected)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, expected)) < 1e-4

    tested = app(name, "test", "-b", batch, "-p", str(pef), cwd=tmp_path)
    assert "test passed" in tested and "__weight__grad" in tested and "FAIL" not in tested

    measured = app(
        name,
        "measure-performance",
        "-b",
        batch,
        "-p",
        str(pef),
        "-n",
        "5",
        "--json",
        "perf.json",
        cwd=tmp_path,
    )
    assert "e2e_throughput:" in measured and "measured over 5 iterations" in measured
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["throughput"] > 0 and report["n_iterations"] == 5

    sections = app(name, "measure-sections", "-b", batch, "-p", str(pef), "-n", "3", cwd=tmp_path)
    for row in ("fwd", "bckwd", "opt", "whole step"):
        assert any(line.startswith(row) for line in sections.splitlines()), row


@pytest.mark.slow
def test_seed_commands_work_as_written(tmp_path):
    """The seed document's exact commands: compile -b=64 -mb=4 --inference -p <app.pef>, then run."""
    compiled = app(
        "ffn_app", "compile", "-b=64", "-mb=4", "--inference", "-p", "app.pef", *BACKEND, cwd=tmp_path
    )
    assert (tmp_path / "app.pef").is_file()
    assert "-mb/--microbatch-size 4: accepted but had no effect" in compiled
    ran = app("ffn_app", "run", "-b=64", "-mb=4", "--inference", "-p", "app.pef", cwd=tmp_path)
    assert "Inference accuracy on 320 test samples" in ran


@pytest.mark.slow
def test_training_pef_runs_inference_after_training(tmp_path):
    """LeNet tutorial flow: a training PEF, trained, checkpointed, then run forward-only."""
    app("ffn_app", "compile", "-b", "64", "--pef-name", "ffn", *BACKEND, cwd=tmp_path)
    pef = str(tmp_path / "out" / "ffn" / "ffn.pef")
    app("ffn_app", "run", "-b", "64", "-p", pef, "-e", "2", "--save-checkpoint", "ckpt.pt", cwd=tmp_path)
    ran = app(
        "ffn_app", "run", "-b", "64", "-p", pef, "--inference", "--load-checkpoint", "ckpt.pt", cwd=tmp_path
    )
    accuracy = float(ran.split("test samples: ")[1].split()[0])
    assert accuracy > 90.0


@pytest.mark.slow
def test_inductor_pef_end_to_end_compiles_nothing_at_run(tmp_path):
    """The default backend: AOT binaries in the PEF; run, test and measure load them and compile nothing."""
    sized = ("-b", "32", "--hidden-size", "64")
    compiled = app(
        "ffn_app",
        "compile",
        *sized,
        "--pef-name",
        "ffn",
        "--backend",
        "inductor",
        cwd=tmp_path,
        env={"SAMBAFLOW_DEBUG": "1"},
    )
    assert "with the inductor backend" in compiled and "cache" in compiled
    assert "compile event: inductor program 'step'" in compiled  # the debug output does show compiles
    pef = str(tmp_path / "out" / "ffn" / "ffn.pef")
    loaded = (*sized, "-p", pef)
    debug = {"SAMBAFLOW_DEBUG": "1"}
    manifest_text = subprocess.run(
        [sys.executable, "-m", "sambaflow", "inspect", pef], capture_output=True, text=True, check=True
    ).stdout
    assert "backend inductor on cpu" in manifest_text and "binary graphs/train/step.bin" in manifest_text
    ran = app("ffn_app", "run", *loaded, "-e", "1", "--log-losses", "losses.json", cwd=tmp_path, env=debug)
    assert "compile event" not in ran, "run must load the PEF's binaries, not compile"
    losses = json.loads((tmp_path / "losses.json").read_text())
    module = load_example("ffn_app")
    utils.set_seed(0)
    expected = eager_losses(module.ResFFNLogReg(784, 64, 10), 32, 0.1, 0.9, 1e-4, flat=True)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, expected)) < 2e-3
    tested = app("ffn_app", "test", *loaded, cwd=tmp_path, env=debug)
    assert "test passed" in tested and "compile event" not in tested
    measured = app("ffn_app", "measure-performance", *loaded, "-n", "5", cwd=tmp_path)
    # programs read from a PEF (meta example values) run in the memory pool too
    assert "memory pool on (keeps up to" in measured and "e2e_throughput:" in measured

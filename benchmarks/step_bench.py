"""Training-step and inference benchmark: eager PyTorch, torch.compile, our PEF, and the GEMM floor.

    python benchmarks/step_bench.py                      # everything (many minutes; see --list)
    python benchmarks/step_bench.py --quick              # one config per model, few steps (smoke test)
    python benchmarks/step_bench.py --configs 'ffn-h256-*,lenet-b16' --steps 600 --rounds 30
    python benchmarks/step_bench.py --list               # the config names

Models: the seed's ResFFNLogReg (examples/ffn_app.py: 784 features, 10 classes, hidden 256 and
1024, batch 16, 64, 256, 1024) and LeNet (examples/lenet_app.py: 1x28x28 images, batch 16 and 64),
fp32 on the CPU, SGD with lr 0.1, momentum 0.9, weight decay 1e-4.

Training-step variants (forward, backward, optimizer update):
  eager       the model + torch.optim.SGD (its default: the single-tensor loop on the CPU);
              zero_grad, forward, loss.backward(), step
  compile     torch.compile(model) (default mode) with the same eager torch.optim.SGD
  fullgraph   one torch.compile(fullgraph=True) function: forward, loss.backward() and the
              functional foreach SGD (torch.optim._functional.sgd(..., foreach=True)), with
              torch._dynamo.config.trace_autograd_ops = True. If that form does not compile, the
              next one in --fullgraph-forms is used and the output says which
  ours        a PEF compiled by samba.session.compile(..., backend 'inductor'), loaded with
              utils.trace_graph(model, inputs, optim, pef=path), stepped with samba.session.run
              (hyperparameters left at their compile-time values)
  floor       the step's matrix products alone: torch.addmm / torch.mm into preallocated outputs
              (ResFFNLogReg: 3 forward + 5 backward GEMMs of the Linear layers; LeNet: the same for
              its 3 Linear layers plus its 2 convolutions as im2col GEMMs on pre-unfolded
              inputs, im2col/col2im not counted). No variant can be faster than this.
Inference variants (forward only: loss and logits, no gradients): eager under torch.no_grad(),
torch.compile(model) under torch.no_grad(), our inference PEF (compile(..., inference=True),
trace_graph with optim None, session.run(..., section_types=['fwd'])), and the forward GEMMs floor.

Method: per config and phase (training, then inference), all variants in ONE process, interleaved:
each round runs a block of steps of every variant (the starting variant rotates each round), every
step timed on its own; inputs rotate over 8 pre-generated batches; medians over all timed steps
(after a warm-up; Python's garbage collector is paused while timing, as timeit does). The share
of CPU time other processes took while timing is recorded (/proc/stat), with a warning above 3%:
on 2 cores a busy neighbour slows OpenMP code by up to 100x.

Before timing, each variant is checked: 3 training steps from the same initial weights and batches
must leave the parameters equal to eager's (max |p - p_eager| / max |p_eager| per tensor <= 1e-4)
and the parameter *change* d = p - p_initial within 1e-3 of eager's (||d - d_eager|| / ||d_eager||
per tensor). The second catches a lost weight-decay term (5e-3 to 0.7 there, but only ~6e-5 in
the parameters); correct compiled float32 code stays below 5e-5. For inference, loss and logits must
match eager. A variant that fails is marked WRONG and left out of "best torch.compile"; the exit
status is 1 if ours is wrong or a config fails. (Seen on torch 2.13 CPU: torch.compile(LeNet)
training gives all-zero gradients for both convolutions, so its row is marked WRONG.)

The `run` start-up (a fresh process: imports, build the model, trace_graph with pef=, the first
session.run) is timed in subprocesses, from just before the process is spawned to the end of the
first step.

Progress goes to stderr, the tables to stdout, everything to --json. Ratios: eager/ours and
best-torch.compile/ours above 1 mean ours is faster; ours/floor is 1.0 at the floor. Only ratios
from one interleaved run mean much on a noisy machine. Inductor compiles take 5-20 s each here;
PEFs are cached by sambaflow in ~/.cache/sambaflow/inductor ($SAMBAFLOW_CACHE_DIR), and
torch.compile caches in /tmp/torchinductor_$USER, so a second run compiles much less.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from ffn_app import ResFFNLogReg  # noqa: E402  (examples/ffn_app.py, the seed's model)
from harness import fmt, machine, measure, medians, ratio, summary, warm_up  # noqa: E402,F401  (benchmarks/harness.py)
from lenet_app import LeNet  # noqa: E402  (examples/lenet_app.py)

import sambaflow.samba.utils as utils  # noqa: E402
from sambaflow import samba  # noqa: E402
from sambaflow.app.cpu_load import cpu_seconds, other_cpu_share  # noqa: E402
from sambaflow.backends import counters  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
NUM_FEATURES, NUM_CLASSES = 784, 10
N_BATCHES = 8
PARAM_TOL, UPDATE_TOL, OUTPUT_TOL = 1e-4, 1e-3, 1e-4
STARTUP_TARGET_S = 2.0
OTHER_CPU_WARN = 0.03
T0 = time.perf_counter()

Step = Callable[[int], Any]


def say(message: str) -> None:
    print(f"[step_bench {time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- configurations -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    model: str  # "ffn" or "lenet"
    batch: int
    hidden: int = 0

    @property
    def name(self) -> str:
        return f"ffn-h{self.hidden}-b{self.batch}" if self.model == "ffn" else f"lenet-b{self.batch}"

    @property
    def model_name(self) -> str:
        return "ResFFNLogReg" if self.model == "ffn" else "LeNet"

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.model == "ffn":
            return ResFFNLogReg(NUM_FEATURES, self.hidden, NUM_CLASSES)
        return LeNet(NUM_CLASSES)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.batch, NUM_FEATURES) if self.model == "ffn" else (self.batch, 1, 28, 28)

    def batches(self, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed + 1)
        return [
            (
                torch.randn(self.image_shape, generator=gen),
                torch.randint(NUM_CLASSES, (self.batch,), generator=gen),
            )
            for _ in range(N_BATCHES)
        ]

    def samba_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            samba.randn(*self.image_shape, name="image", batch_dim=0),
            samba.randint(NUM_CLASSES, (self.batch,), name="label", batch_dim=0),
        )

    def gemms(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int, bool]]]:
        """(forward, backward) matrix products as (m, k, n): [m, k] @ [k, n].

        Backward entries add whether [m, k] is a transposed view (weight grads: grad_out^T @ act)
        or contiguous (input grads: grad_out @ W), as in autograd.
        """
        b, c = self.batch, NUM_CLASSES
        if self.model == "ffn":
            h, f = self.hidden, NUM_FEATURES
            forward = [(b, f, h), (b, h, h), (b, h, c)]
            # weight grads g^T @ a for all three; input grads g @ W for gemm3 and gemm2 only
            backward = [(c, b, h, True), (b, c, h, False), (h, b, h, True), (b, h, h, False), (h, b, f, True)]
            return forward, backward
        # LeNet: conv1 (1->6, 5x5, pad 2: 28x28 out), conv2 (6->16, 5x5: 10x10 out), fc 400-120-84-10
        p1, p2 = b * 28 * 28, b * 10 * 10
        forward = [(p1, 25, 6), (p2, 150, 16), (b, 400, 120), (b, 120, 84), (b, 84, c)]
        backward = [
            (6, p1, 25, True),  # conv1 weight (no input grad: the image)
            (16, p2, 150, True),
            (p2, 16, 150, False),  # conv2 weight and input (columns) grads
            (120, b, 400, True),
            (b, 120, 400, False),
            (84, b, 120, True),
            (b, 84, 120, False),
            (c, b, 84, True),
            (b, c, 84, False),
        ]
        return forward, backward


def all_configs() -> list[Config]:
    ffn = [Config("ffn", b, h) for h in (256, 1024) for b in (16, 64, 256, 1024)]
    return ffn + [Config("lenet", b) for b in (16, 64)]


QUICK_CONFIGS = ("ffn-h256-b16", "lenet-b16")


def pick_configs(patterns: str | None, quick: bool) -> list[Config]:
    configs = all_configs()
    if patterns is None:
        return [c for c in configs if c.name in QUICK_CONFIGS] if quick else configs
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [c for c in configs if any(fnmatch.fnmatch(c.name, p) for p in wanted)]
    unmatched = [p for p in wanted if not any(fnmatch.fnmatch(c.name, p) for c in configs)]
    if unmatched or not chosen:
        raise SystemExit(f"--configs: {unmatched or wanted} match none of {[c.name for c in configs]}")
    return chosen


# --- training-step variants -----------------------------------------------------------------------
def sgd_kwargs() -> dict[str, float]:
    return {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}


def host_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().as_subclass(torch.Tensor).clone() for n, p in model.named_parameters()}


def eager_train_step(model: nn.Module, forward: Callable, batches) -> Step:
    opt = torch.optim.SGD(model.parameters(), **sgd_kwargs())

    def step(i: int) -> Any:
        x, y = batches[i % N_BATCHES]
        opt.zero_grad()
        loss, _ = forward(x, y)
        loss.backward()
        opt.step()
        return loss

    return step


def fullgraph_train_step(model: nn.Module, batches, form: str) -> Step:
    """One torch.compile(fullgraph=True) function: forward, gradients, functional foreach SGD."""
    params = list(model.parameters())
    buffers = [torch.zeros_like(p) for p in params]  # momentum 0.9, dampening 0: buf_1 = grad_1
    sgd = torch.optim._functional.sgd
    options = dict(sgd_kwargs(), dampening=0.0, nesterov=False, maximize=False)

    def with_backward(foreach: bool) -> Callable:
        def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            for p in params:
                p.grad = None
            loss, out = model(x, y)
            loss.backward()
            grads = [p.grad for p in params]
            with torch.no_grad():
                sgd(params, grads, buffers, foreach=foreach, **options)
            return loss.detach(), out.detach()

        return step

    def with_autograd_grad(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, out = model(x, y)
        grads = list(torch.autograd.grad(loss, params))
        with torch.no_grad():
            sgd(params, grads, buffers, foreach=True, **options)
        return loss.detach(), out.detach()

    forms = {
        "backward": with_backward(foreach=True),
        "autograd_grad": with_autograd_grad,
        "backward_single_tensor": with_backward(foreach=False),
    }
    compiled = torch.compile(forms[form], fullgraph=True)

    def step(i: int) -> Any:
        return compiled(*batches[i % N_BATCHES])

    return step


FULLGRAPH_FORMS = ("backward", "autograd_grad", "backward_single_tensor")
FULLGRAPH_DESCRIPTION = {
    "backward": "fullgraph: forward + loss.backward() + foreach functional SGD",
    "autograd_grad": "fullgraph: forward + torch.autograd.grad + foreach functional SGD",
    "backward_single_tensor": "fullgraph: forward + loss.backward() + single-tensor functional SGD",
}


def floor_step(config: Config, forward_only: bool) -> Step:
    """The matrix products alone, each into a preallocated output (bias adds as addmm)."""
    gen = torch.Generator().manual_seed(7)
    fwd, bwd = config.gemms()
    products = []
    for m, k, n in fwd:
        # a @ W^T with W stored [n, k], like nn.Linear
        products.append(
            (
                torch.addmm,
                torch.randn(n, generator=gen),
                torch.randn(m, k, generator=gen),
                torch.randn(n, k, generator=gen).t(),
                torch.empty(m, n),
            )
        )
    for m, k, n, transposed in [] if forward_only else bwd:
        products.append(
            (
                torch.mm,
                None,
                torch.randn(k, m, generator=gen).t() if transposed else torch.randn(m, k, generator=gen),
                torch.randn(k, n, generator=gen),
                torch.empty(m, n),
            )
        )

    def step(i: int) -> Any:
        for op, bias, a, b, out in products:
            if bias is None:
                op(a, b, out=out)
            else:
                op(bias, a, b, out=out)
        return out

    return step


# --- our PEF --------------------------------------------------------------------------------------
def compile_pef(config: Config, seed: int, folder: str, inference: bool) -> tuple[str, float]:
    model = config.build(seed)
    samba.from_torch_model_(model)
    optim = None if inference else samba.optim.SGD(model.parameters(), **sgd_kwargs())
    name = config.name.replace("-", "_") + ("" if inference else "_train")  # compile adds "_inf"
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # sambaflow's compile log: progress, not results
        path = samba.session.compile(
            model,
            config.samba_inputs(),
            optim,
            name=name,
            inference=inference,
            init_output_grads=not inference,
            config_dict={"output_folder": folder, "backend": "inductor"},
        )
    return path, time.perf_counter() - start


def load_pef(config: Config, seed: int, path: str, inference: bool) -> tuple[nn.Module, list]:
    """What an app's `run` does: model, inputs, optimizer, trace_graph(pef=)."""
    model = config.build(seed)
    samba.from_torch_model_(model)
    optim = None if inference else samba.optim.SGD(model.parameters(), **sgd_kwargs())
    with contextlib.redirect_stdout(sys.stderr):
        outputs = utils.trace_graph(
            model, config.samba_inputs(), optim, pef=path, init_output_grads=not inference
        )
    return model, outputs


def samba_batches(batches) -> list[list[torch.Tensor]]:
    return [
        [
            samba.from_torch_tensor(x, name="image", batch_dim=0),
            samba.from_torch_tensor(y, name="label", batch_dim=0),
        ]
        for x, y in batches
    ]


def ours_step(outputs: list, batches, inference: bool) -> Step:
    feeds = samba_batches(batches)
    run = samba.session.run
    if inference:
        fwd = ["fwd"]

        def step(i: int) -> Any:
            return run(input_tensors=feeds[i % N_BATCHES], output_tensors=outputs, section_types=fwd)
    else:

        def step(i: int) -> Any:
            return run(input_tensors=feeds[i % N_BATCHES], output_tensors=outputs)

    return step


# --- correctness -------------------------------------------------------------------------------------
def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], l2: bool = False) -> float:
    """Worst tensor's max |got - want| / max |want| (or ||got - want|| / ||want||); NaN/inf: inf."""
    worst = 0.0
    for name, w in want.items():
        g = got[name].to(w.dtype)
        if not torch.isfinite(g).all():
            return math.inf
        if l2:
            worst = max(worst, float((g - w).norm() / w.norm().clamp_min(1e-30)))
        else:
            worst = max(worst, float((g - w).abs().max() / w.abs().max().clamp_min(1e-30)))
    return worst


def three_steps(step: Step) -> None:
    for i in range(3):
        step(i)


# --- timing -----------------------------------------------------------------------------------------


def plan(estimate: dict[str, float], args: argparse.Namespace) -> tuple[int, int]:
    """(rounds, block): about --steps timed steps per variant, within --phase-seconds."""
    per_step = sum(estimate.values())
    steps = min(args.steps, max(args.min_steps, int(args.phase_seconds / per_step)))
    rounds = max(1, min(args.rounds, steps))
    return rounds, max(1, steps // rounds)


# --- one config -----------------------------------------------------------------------------------
def train_phase(config: Config, args: argparse.Namespace, pef: str, result: dict) -> None:
    seed = args.seed
    batches = config.batches(seed)
    torch._dynamo.reset()
    base = config.build(seed)
    want_initial = host_params(base)
    steps: dict[str, Step] = {}
    params_of: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    compile_s: dict[str, float] = {}
    verify: dict[str, dict[str, Any]] = {}
    notes: list[str] = []

    def add(name: str, step: Step, params: Callable[[], dict[str, torch.Tensor]]) -> None:
        start = time.perf_counter()
        three_steps(step)  # compiles (torch.compile) on the first call
        compile_s[name] = time.perf_counter() - start
        steps[name], params_of[name] = step, params

    say(f"{config.name}: training: eager")
    eager_model = copy.deepcopy(base)
    add("eager", eager_train_step(eager_model, eager_model, batches), lambda: host_params(eager_model))

    say(f"{config.name}: training: torch.compile(model) + eager SGD (compiles on the first step)")
    compile_model = copy.deepcopy(base)
    compiled_forward = torch.compile(compile_model)
    add(
        "compile",
        eager_train_step(compile_model, compiled_forward, batches),
        lambda: host_params(compile_model),
    )

    forms = [f.strip() for f in args.fullgraph_forms.split(",") if f.strip()]
    chosen: list[str] = []
    for form in forms:
        if chosen and not args.all_fullgraph_forms:
            break
        say(f"{config.name}: training: torch.compile(fullgraph=True) step, form '{form}' (compiles)")
        fg_model = copy.deepcopy(base)
        name = "fullgraph" if not chosen else f"fullgraph_{form}"
        try:
            add(name, fullgraph_train_step(fg_model, batches, form), lambda m=fg_model: host_params(m))
        except Exception as exc:  # a form dynamo cannot trace: say so, try the next one
            why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            notes.append(f"fullgraph form '{form}' does not compile here ({why})")
            say(f"  form '{form}' failed: {why}")
            torch._dynamo.reset()
            continue
        chosen.append(form)
    if not chosen:
        notes.append("no fullgraph form compiled: the fullgraph row is missing")
    result["fullgraph_form"] = chosen[0] if chosen else None
    result["fullgraph_description"] = FULLGRAPH_DESCRIPTION.get(chosen[0]) if chosen else None

    say(f"{config.name}: training: ours, loading {pef}")
    before = counters.compiles
    start = time.perf_counter()
    ours_model, outputs = load_pef(config, seed, pef, inference=False)
    ours = ours_step(outputs, batches, inference=False)
    compile_s["ours_load"] = time.perf_counter() - start

    def ours_params() -> dict[str, torch.Tensor]:
        samba.session.to_cpu(ours_model)
        return host_params(ours_model)

    add("ours", ours, ours_params)
    result["ours_compiles_during_run"] = counters.compiles - before
    steps["floor"] = floor_step(config, forward_only=False)

    want = params_of["eager"]()
    want_change = {n: want[n] - want_initial[n] for n in want}
    for name in params_of:
        got = params_of[name]()
        param_err = relative_error(got, want)
        change_err = relative_error({n: got[n] - want_initial[n] for n in got}, want_change, l2=True)
        ok = param_err <= PARAM_TOL and change_err <= UPDATE_TOL
        verify[name] = {"param_rel_err": param_err, "change_rel_err": change_err, "ok": ok}
        if not ok:
            say(f"  WRONG: {name} after 3 steps: param err {param_err:.1e}, change err {change_err:.1e}")
    say(
        f"{config.name}: training: verified ("
        + ", ".join(f"{n} {v['param_rel_err']:.0e}" for n, v in verify.items())
        + "); warming up"
    )
    timed_phase(config, "training", steps, args, result)
    result.update(compile_s=compile_s, verify=verify, notes=notes)


def infer_phase(config: Config, args: argparse.Namespace, pef: str, result: dict) -> None:
    seed = args.seed
    batches = config.batches(seed)
    torch._dynamo.reset()
    base = config.build(seed)
    steps: dict[str, Step] = {}
    compile_s: dict[str, float] = {}

    def no_grad_step(forward: Callable) -> Step:
        def step(i: int) -> Any:
            with torch.no_grad():
                return forward(*batches[i % N_BATCHES])

        return step

    say(f"{config.name}: inference: eager, torch.compile(model) (compiles)")
    eager_model = copy.deepcopy(base).eval()
    compile_model = copy.deepcopy(base).eval()
    steps["eager"] = no_grad_step(eager_model)
    steps["compile"] = no_grad_step(torch.compile(compile_model))

    say(f"{config.name}: inference: ours, loading {pef}")
    before = counters.compiles
    start = time.perf_counter()
    _, outputs = load_pef(config, seed, pef, inference=True)
    steps["ours"] = ours_step(outputs, batches, inference=True)
    compile_s["ours_load"] = time.perf_counter() - start
    result["ours_compiles_during_run"] = counters.compiles - before

    verify: dict[str, dict[str, Any]] = {}
    want: dict[str, torch.Tensor] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        loss, logits = step(0)
        compile_s.setdefault(name, time.perf_counter() - start)
        got = {
            "loss": loss.as_subclass(torch.Tensor).clone(),
            "logits": logits.as_subclass(torch.Tensor).clone(),
        }
        want = want or got
        err = relative_error(got, want)
        verify[name] = {"output_rel_err": err, "ok": err <= OUTPUT_TOL}
        if err > OUTPUT_TOL:
            say(f"  WRONG: {name} inference outputs differ from eager's: {err:.1e}")
    steps["floor"] = floor_step(config, forward_only=True)
    timed_phase(config, "inference", steps, args, result)
    result.update(compile_s=compile_s, verify=verify)


def timed_phase(config: Config, phase: str, steps: dict[str, Step], args: argparse.Namespace, result: dict):
    estimate = warm_up(steps, args.warmup, args.warmup_seconds)
    rounds, block = plan(estimate, args)
    expected = rounds * block * sum(estimate.values())
    say(
        f"{config.name}: {phase}: timing {rounds} rounds x {block} steps per variant, interleaved "
        f"(about {expected:.0f} s; warm-up estimate "
        + ", ".join(f"{n} {t * 1e6:.0f} µs" for n, t in estimate.items())
        + ")"
    )
    before = cpu_seconds()
    samples = measure(steps, rounds, block)
    result["other_cpu"] = other_cpu_share(before, cpu_seconds())
    if result["other_cpu"] > OTHER_CPU_WARN:
        say(f"WARNING: other processes took {result['other_cpu']:.0%} of the CPUs while timing this phase")
    result["timing"] = {name: summary(times) for name, times in samples.items()}
    result["rounds"], result["block"] = rounds, block


# --- start-up in a fresh process ---------------------------------------------------------------------
def startup_child(spec: dict[str, Any]) -> None:
    """Runs in the fresh process: build the app, load the PEF, run one step; print timings."""
    config = Config(spec["model"], spec["batch"], spec["hidden"])
    imported = time.time()
    inference = spec["inference"]
    before = counters.compiles
    model, outputs = load_pef(config, spec["seed"], spec["pef"], inference)
    loaded = time.time()
    x, y = config.batches(spec["seed"])[0]
    feeds = samba_batches([(x, y)])[0]
    sections = ["fwd"] if inference else None
    loss = samba.session.run(input_tensors=feeds, output_tensors=outputs, section_types=sections)[0]
    done = time.time()
    report = {
        "imported": imported,
        "loaded": loaded,
        "done": done,
        "loss": float(loss),
        "compiles": counters.compiles - before,
    }
    print("STARTUP " + json.dumps(report), flush=True)


def measure_startup(config: Config, pef: str, inference: bool, seed: int, runs: int) -> dict[str, Any]:
    spec = {
        "model": config.model,
        "batch": config.batch,
        "hidden": config.hidden,
        "pef": pef,
        "inference": inference,
        "seed": seed,
    }
    totals, parts = [], []
    for _ in range(runs):
        started = time.time()
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--startup-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("STARTUP ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"start-up subprocess failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        child = json.loads(lines[-1][len("STARTUP ") :])
        totals.append(child["done"] - started)
        parts.append(
            {
                "total_s": child["done"] - started,
                "process_and_imports_s": child["imported"] - started,
                "build_and_load_pef_s": child["loaded"] - child["imported"],
                "first_step_s": child["done"] - child["loaded"],
                "compiles": child["compiles"],
            }
        )
    best = parts[totals.index(statistics.median_low(totals))]
    return {"median_total_s": statistics.median(totals), "runs": parts, "median_run": best}


def import_reference(runs: int) -> dict[str, float]:
    """Fresh-process time of the imports alone, for scale: `import torch`, then with sambaflow."""
    reference = {}
    for label, code in (
        ("python -c 'import torch'", "import torch"),
        ("python -c 'import torch, sambaflow.samba.utils'", "import torch, sambaflow.samba.utils"),
    ):
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            times.append(time.perf_counter() - started)
        reference[label] = statistics.median(times)
    return reference


# --- reporting ---------------------------------------------------------------------------------------


def add_ratios(entry: dict) -> None:
    for phase_name in ("train", "infer"):
        phase = entry.get(phase_name)
        if not phase or "timing" not in phase:
            continue
        med = medians(phase)
        good = {n for n, v in phase.get("verify", {}).items() if v["ok"]}
        compiled = {
            n: t for n, t in med.items() if (n == "compile" or n.startswith("fullgraph")) and n in good
        }
        best = min(compiled, key=compiled.get) if compiled else None
        phase["best_torch_compile"] = best
        phase["ratios"] = {
            "eager/ours": ratio(med.get("eager"), med.get("ours")),
            "best_torch_compile/ours": ratio(compiled.get(best), med.get("ours")) if best else None,
            "ours/floor": ratio(med.get("ours"), med.get("floor")),
        }


def print_tables(entries: list[dict], import_times: dict[str, float] | None = None) -> None:
    for phase_name, title, columns in (
        ("train", "TRAINING STEP", ("eager", "compile", "fullgraph", "ours", "floor")),
        ("infer", "INFERENCE (forward only)", ("eager", "compile", "ours", "floor")),
    ):
        rows = [e for e in entries if phase_name in e and "timing" in e[phase_name]]
        if not rows:
            continue
        print(f"\n{title}: median µs per step (interleaved, one process); ratios > 1: ours faster")
        head = f"{'config':15}" + "".join(f"{c:>11}" for c in columns)
        head += f"{'eager/ours':>12}{'bestTC/ours':>12}{'ours/floor':>11}  {'bestTC':22}steps  check"
        print(head)
        for e in rows:
            phase = e[phase_name]
            med = medians(phase)
            wrong = [n for n, v in phase.get("verify", {}).items() if not v["ok"]]
            cells = [fmt(med.get(c), 0) + ("!" if c in wrong else "") for c in columns]
            line = f"{e['config']:15}" + "".join(f"{cell:>11}" for cell in cells)
            r = phase["ratios"]
            line += (
                f"{fmt(r['eager/ours']):>12}{fmt(r['best_torch_compile/ours']):>12}{fmt(r['ours/floor']):>11}"
            )
            line += f"  {phase.get('best_torch_compile') or '-':22}"
            line += f"{phase['timing']['ours']['n'] if 'ours' in phase['timing'] else 0:5d}"
            line += "  " + ("WRONG: " + ",".join(wrong) if wrong else "ok")
            print(line)
    forms = sorted(
        {
            (e["train"].get("fullgraph_form"), e["train"].get("fullgraph_description"))
            for e in entries
            if "train" in e
        },
        key=str,
    )
    flag = "set to True" if hasattr(torch._dynamo.config, "trace_autograd_ops") else "NOT in this torch"
    for form, description in forms:
        print(
            f"  fullgraph = {description or 'none compiled'}"
            + (f" [form '{form}']" if form else "")
            + f"; torch._dynamo.config.trace_autograd_ops {flag}"
        )
    for e in entries:
        for note in e.get("train", {}).get("notes", []):
            print(f"  {e['config']}: {note}")
    if any(
        not v["ok"]
        for e in entries
        for p in ("train", "infer")
        for v in e.get(p, {}).get("verify", {}).values()
    ):
        print("  !: this variant's results differ from eager's (see 'check'); it is left out of bestTC")
    print(
        "  floor: the matrix products alone (torch.mm/addmm into preallocated outputs; LeNet convs as im2col GEMMs)"
    )
    rows = [e for e in entries if e.get("startup")]
    if rows:
        print("\nRUN START-UP (fresh process -> first step done; median over runs), seconds")
        print(
            f"{'config':15}{'PEF':>10}{'total':>8}{'python+imports':>16}{'trace+load':>12}{'first step':>12}{'compiles':>10}"
        )
        for e in rows:
            for kind, s in e["startup"].items():
                m = s["median_run"]
                print(
                    f"{e['config']:15}{kind:>10}{s['median_total_s']:8.2f}{m['process_and_imports_s']:16.2f}"
                    f"{m['build_and_load_pef_s']:12.2f}{m['first_step_s']:12.3f}{m['compiles']:10d}"
                )
        for label, seconds in (import_times or {}).items():
            print(f"  for scale, a fresh {label}: {seconds:.2f} s")


def check_targets(entries: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets, where the configs they name were measured."""
    by_name = {e["config"]: e for e in entries}
    checks: list[dict[str, Any]] = []

    def train_ratio(name: str, key: str) -> float | None:
        return by_name.get(name, {}).get("train", {}).get("ratios", {}).get(key)

    def add(what: str, value: float | None, ok: bool | None) -> None:
        checks.append({"target": what, "value": value, "met": ok})

    v = train_ratio("ffn-h256-b16", "eager/ours")
    add("ffn-h256-b16 training: eager/ours >= 2.5", v, None if v is None else v >= 2.5)
    v = train_ratio("ffn-h256-b16", "best_torch_compile/ours")
    add("ffn-h256-b16 training: best torch.compile/ours >= 1.15", v, None if v is None else v >= 1.15)
    v = train_ratio("ffn-h1024-b256", "eager/ours")
    add("ffn-h1024-b256 training: eager/ours >= 1.2", v, None if v is None else v >= 1.2)
    for e in entries:
        v = e.get("train", {}).get("ratios", {}).get("best_torch_compile/ours")
        add(
            f"{e['config']} training: no slower than best torch.compile (>= 1.0)",
            v,
            None if v is None else v >= 1.0,
        )
    v = train_ratio("ffn-h1024-b1024", "ours/floor")
    add("ffn-h1024-b1024 training: ours/floor <= 1.25", v, None if v is None else v <= 1.25)
    for e in entries:
        for kind, s in e.get("startup", {}).items():
            v = s["median_total_s"]
            add(f"{e['config']} {kind} PEF: run start-up < {STARTUP_TARGET_S} s", v, v < STARTUP_TARGET_S)
    return [c for c in checks if c["value"] is not None]


def print_targets(checks: list[dict[str, Any]]) -> None:
    if checks:
        print("\nTARGETS (issue 4)")
        for c in checks:
            print(f"  {'met ' if c['met'] else 'MISS'}  {c['target']}: {c['value']:.3f}")


# --- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one config per model, fewer steps (smoke test)")
    parser.add_argument("--configs", help="comma-separated names or globs, e.g. 'ffn-h256-*,lenet-b16'")
    parser.add_argument("--list", action="store_true", help="print the config names and exit")
    parser.add_argument(
        "--steps", type=int, help="timed steps per variant and phase (default 1000; quick 100)"
    )
    parser.add_argument("--rounds", type=int, help="interleaving rounds (default 25; quick 10)")
    parser.add_argument(
        "--min-steps", type=int, help="never fewer timed steps than this (default 100; quick 30)"
    )
    parser.add_argument(
        "--phase-seconds",
        type=float,
        help="cap the timed part of a phase near this many seconds (fewer steps for big configs; "
        "default 45, quick 10)",
    )
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps per variant (after the check)")
    parser.add_argument("--warmup-seconds", type=float, default=2.0, help="cap warm-up time per variant")
    parser.add_argument("--startup-runs", type=int, help="fresh processes per PEF (default 3; quick 1)")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    parser.add_argument("--no-inference", action="store_true", help="training steps only")
    parser.add_argument(
        "--fullgraph-forms",
        default=",".join(FULLGRAPH_FORMS),
        help="fullgraph step forms to try in order; the first that compiles is timed",
    )
    parser.add_argument("--all-fullgraph-forms", action="store_true", help="time every form that compiles")
    parser.add_argument("--pef-dir", help="keep the PEFs here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", default=str(ROOT / "benchmarks" / "results.json"), help="write results here"
    )
    parser.add_argument("--startup-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    for key, full, small in (
        ("steps", 1000, 100),
        ("rounds", 25, 10),
        ("min_steps", 100, 30),
        ("phase_seconds", 45.0, 10.0),
        ("startup_runs", 3, 1),
    ):
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if quick:
        args.warmup = min(args.warmup, 10)
    return args


def run_config(config: Config, args: argparse.Namespace, folder: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "config": config.name,
        "model": config.model_name,
        "hidden": config.hidden or None,
        "batch": config.batch,
    }
    say(f"{config.name}: compiling the training PEF (inductor; 4 step/section programs + inference graph)")
    train_pef, seconds = compile_pef(config, args.seed, folder, inference=False)
    entry["pef_compile_s"] = {"train": seconds}
    say(f"{config.name}: training PEF ready in {seconds:.1f} s")
    inf_pef = None
    if not args.no_inference:
        inf_pef, seconds = compile_pef(config, args.seed, folder, inference=True)
        entry["pef_compile_s"]["infer"] = seconds
        say(f"{config.name}: inference PEF ready in {seconds:.1f} s")
    entry["train"] = {}
    train_phase(config, args, train_pef, entry["train"])
    if inf_pef:
        entry["infer"] = {}
        infer_phase(config, args, inf_pef, entry["infer"])
    torch._dynamo.reset()
    if not args.no_startup:
        say(f"{config.name}: run start-up in fresh processes ({args.startup_runs} per PEF)")
        entry["startup"] = {
            "training": measure_startup(config, train_pef, False, args.seed, args.startup_runs)
        }
        if inf_pef:
            entry["startup"]["inference"] = measure_startup(
                config, inf_pef, True, args.seed, args.startup_runs
            )
    add_ratios(entry)
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.startup_child:
        startup_child(json.loads(args.startup_child))
        return 0
    configs = pick_configs(args.configs, args.quick)
    if args.list:
        print("\n".join(c.name for c in all_configs()))
        return 0
    has_flag = hasattr(torch._dynamo.config, "trace_autograd_ops")
    if has_flag:
        torch._dynamo.config.trace_autograd_ops = True  # lets the fullgraph step trace loss.backward()
    else:
        say("torch._dynamo.config.trace_autograd_ops does not exist in this torch; fullgraph forms may fail")
    # Every config compiles the model's forward again; do not let dynamo's recompile limit fall back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096
    )
    say(
        f"{len(configs)} configs: {', '.join(c.name for c in configs)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    before = cpu_seconds()
    time.sleep(0.5)
    busy = other_cpu_share(before, cpu_seconds())
    if busy > 0.1:
        say(f"WARNING: other processes are using {busy:.0%} of the CPUs now; timings will be noisy")
    started = time.time()
    entries: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        folder = args.pef_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="step_bench-"))
        for k, config in enumerate(configs):
            say(f"=== config {k + 1}/{len(configs)}: {config.name}")
            try:
                entries.append(run_config(config, args, folder))
            except Exception:
                say(f"{config.name} FAILED:\n{traceback.format_exc()}")
                entries.append({"config": config.name, "error": traceback.format_exc()})
    import_times = None
    if not args.no_startup:
        say("timing the imports alone in fresh processes (for scale)")
        import_times = import_reference(args.startup_runs)
    measured = [e for e in entries if "error" not in e]
    print_tables(measured, import_times)
    targets = check_targets(measured)
    print_targets(targets)
    wrong = [
        (e["config"], p, n, v)
        for e in measured
        for p in ("train", "infer")
        for n, v in e.get(p, {}).get("verify", {}).items()
        if not v["ok"]
    ]
    failed = [e["config"] for e in entries if "error" in e]
    if wrong:
        print()
    for config, phase, name, v in wrong:
        errors = ", ".join(f"{k} {x:.1e}" for k, x in v.items() if k != "ok")
        who = "OURS" if name == "ours" else "baseline"
        print(f"WRONG RESULTS ({who}): {config} {phase} '{name}' vs eager: {errors}")
    for name in failed:
        print(f"FAILED: {name} (see the JSON / stderr)")
    busy = [
        f"{e['config']} {p} {e[p]['other_cpu']:.0%}"
        for e in measured
        for p in ("train", "infer")
        if e.get(p, {}).get("other_cpu", 0.0) > OTHER_CPU_WARN
    ]
    if busy:
        print(
            "\nWARNING: other processes used the CPUs while timing (share of all CPU time): "
            + ", ".join(busy)
            + ". On 2 cores that slows OpenMP code by up to 100x: rerun on a quiet machine."
        )
    result = {
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k != "startup_child"},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "sgd": sgd_kwargs(),
        "tolerances": {"param_rel": PARAM_TOL, "change_rel": UPDATE_TOL, "output_rel": OUTPUT_TOL},
        "import_reference_s": import_times,
        "trace_autograd_ops": has_flag,
        "configs": entries,
        "targets": targets,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    say(f"wrote {args.json}; total {time.time() - started:.0f} s")
    return 1 if failed or any(name == "ours" for _, _, name, _ in wrong) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Probe: one training step of the seed's ResFFNLogReg, eager vs our backends, one interleaved run.

    python benchmarks/inductor_probe.py [--hidden 256] [--batch 16] [--rounds 40] [--block 25]

Variants (each a full training step: forward, backward, SGD momentum 0.9, weight decay 1e-4):
  eager          torch model + torch.optim.SGD (the single-tensor loop users get on the CPU)
  reference      our traced 'step' program, run op by op (the reference backend)
  jit            'step' through torch._inductor.compile_fx.compile_fx (InductorBackend(mode='jit'))
  aot            'step' AOT-compiled to a .pt2 package, loaded, called with loader.boxed_run
  aot_run        as aot, through the loader's `run` entry (no stride guard)
  aot_boxed_raw  as aot, loader.boxed_run without our stride guard
  aot_call       as aot, through the public AOTICompiledModel.__call__ (pytree flatten/unflatten)
  aot_inplace    'step' after passes.inplace: parameters/momentum written into the inputs
  jit_inplace    the in-place program through compile_fx
  session_run    samba.session.run on a graph traced with backend 'inductor' (user-visible path)
  floor_mm       the step's eight matrix products alone (what no backend can beat)

Program variants run as the runtime does: args = [store[n] for n in inputs]; store.update(outputs).
All variants start from the same weights; after 3 steps their weights are checked against eager.
Prints median µs per step, ratios to eager, AOT compile and load times; writes JSON with --json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sambaflow import samba
from sambaflow.app.tracing import trace_graph
from sambaflow.backends.inductor import InductorBackend, available, compile_jit
from sambaflow.backends.reference import ReferenceBackend
from sambaflow.passes.inplace import update_inputs_in_place

LR, MOMENTUM, WD = 0.01, 0.9, 1e-4


# The seed's model, exactly as the example app defines it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from ffn_app import ResFFNLogReg  # noqa: E402


def trace(hidden: int, batch: int, backend: str = "reference"):
    torch.manual_seed(0)
    model = ResFFNLogReg(784, hidden, 10)
    host = copy.deepcopy(model)
    samba.from_torch_model_(model)
    image = samba.randn(batch, 784, name="image", batch_dim=0)
    label = samba.randint(10, (batch,), name="label", batch_dim=0)
    optim = samba.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    outputs = trace_graph(model, (image, label), optim, backend=backend)
    return host, outputs


def initial_store() -> dict[str, torch.Tensor]:
    session = samba.session
    return {n: t.clone() for n, t in (session.store | session._seed_defaults).items()}


def program_step(compiled, inputs, outputs, store, batches) -> Callable[[int], object]:
    def step(i: int) -> object:
        store["image"], store["label"] = batches[i % len(batches)]
        results = compiled([store[n] for n in inputs])
        store.update(zip(outputs, results))
        return results

    return step


def eager_step(model: nn.Module, batches) -> Callable[[int], object]:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)

    def step(i: int) -> object:
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        loss, _ = model(x, y)
        loss.backward()
        opt.step()
        return loss

    return step


def floor_step(hidden: int, batch: int) -> Callable[[int], object]:
    shapes = [
        (batch, 784, hidden),
        (batch, hidden, hidden),
        (batch, hidden, 10),
        (10, batch, hidden),
        (batch, 10, hidden),
        (hidden, batch, hidden),
        (batch, hidden, hidden),
        (hidden, batch, 784),
    ]
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]

    def step(i: int) -> object:
        return [a @ b for a, b in pairs]

    return step


def session_step(batches) -> Callable[[int], object]:
    tensors = [
        (samba.from_torch_tensor(x, name="image"), samba.from_torch_tensor(y, name="label"))
        for x, y in batches
    ]

    def step(i: int) -> object:
        return samba.session.run(input_tensors=tensors[i % len(tensors)])

    return step


def timed(label: str, fn: Callable[[], object], notes: dict[str, float]) -> object:
    start = time.perf_counter()
    result = fn()
    notes[label] = time.perf_counter() - start
    print(f"  {label}: {notes[label]:.3f} s", flush=True)
    return result


def build(args) -> tuple[dict[str, Callable[[int], object]], dict[str, dict], dict[str, float], nn.Module]:
    torch.manual_seed(1)
    batches = [(torch.randn(args.batch, 784), torch.randint(10, (args.batch,))) for _ in range(8)]
    host, _ = trace(args.hidden, args.batch, backend="inductor")
    program = samba.session.executable.programs["step"]
    inplace = update_inputs_in_place(program)
    backend = InductorBackend(use_cache=not args.no_cache)
    notes: dict[str, float] = {}
    print("compiling:", flush=True)
    blob = timed("aot export (step)", lambda: backend.export(program), notes)
    print("   ", backend.last_report.as_text())
    aot = timed("aot load (step)", lambda: backend.load(program, blob), notes)
    blob_ip = timed("aot export (step, in place)", lambda: backend.export(inplace.program), notes)
    print("   ", backend.last_report.as_text())
    aot_ip = timed("aot load (step, in place)", lambda: backend.load(inplace.program, blob_ip), notes)
    jit = timed("compile_fx (step)", lambda: compile_jit(program), notes)
    jit_ip = timed("compile_fx (step, in place)", lambda: compile_jit(inplace.program), notes)
    notes["package MB"] = len(blob) / 1e6
    notes["_blob"] = blob  # type: ignore[assignment]
    entries = _loader_entries(blob)
    names = ("reference", "jit", "aot", *entries, "aot_inplace", "jit_inplace")
    stores = {k: initial_store() for k in names}
    full = (program.inputs, program.outputs)
    part = (program.inputs, inplace.program.outputs)
    steps = {
        "eager": eager_step(host, batches),
        "reference": program_step(ReferenceBackend().compile(program), *full, stores["reference"], batches),
        "jit": program_step(jit, *full, stores["jit"], batches),
        "aot": program_step(aot, *full, stores["aot"], batches),
        **{k: program_step(fn, *full, stores[k], batches) for k, fn in entries.items()},
        "aot_inplace": program_step(aot_ip, *part, stores["aot_inplace"], batches),
        "jit_inplace": program_step(jit_ip, *part, stores["jit_inplace"], batches),
        "session_run": session_step(batches),
        "floor_mm": floor_step(args.hidden, args.batch),
    }
    stores["session_run"] = samba.session.store
    return steps, stores, notes, host


def _loader_entries(blob: bytes) -> dict[str, Callable]:
    """The loader's other entry points, to compare with our runner (boxed_run + stride guard)."""
    from torch._inductor.package.package import AOTICompiledModel

    from sambaflow.backends.inductor import _load_loader

    loader = _load_loader(blob)
    model = AOTICompiledModel(loader)
    return {
        "aot_run": lambda tensors: loader.run(list(tensors)),
        "aot_boxed_raw": lambda tensors: loader.boxed_run(list(tensors)),
        "aot_call": lambda tensors: model(*tensors),
    }


def check(steps, stores, host: nn.Module) -> dict[str, float]:
    """3 steps each from the same start; largest relative weight difference to eager."""
    for name, step in steps.items():
        if name != "floor_mm":
            for i in range(3):
                step(i)
    host_params = {n.replace(".", "__"): p.detach() for n, p in host.named_parameters()}
    errors = {}
    for name, store in stores.items():
        errors[name] = max(
            ((store[n] - p).abs().max() / p.abs().max().clamp_min(1e-12)).item()
            for n, p in host_params.items()
        )
    return errors


def measure(steps, rounds: int, block: int, warmup: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for name in names:
        for i in range(warmup):
            steps[name](i)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            step, out = steps[name], samples[name]
            for i in range(block):
                start = time.perf_counter()
                step(i)
                out.append(time.perf_counter() - start)
    return samples


STARTUP = """
import time
t0 = time.perf_counter()
import sys
sys.path.insert(0, "benchmarks")
import torch
import inductor_probe as p
from sambaflow import samba
from sambaflow.backends.inductor import InductorBackend
t1 = time.perf_counter()
p.trace({hidden}, {batch})
program = samba.session.executable.programs["step"]
t2 = time.perf_counter()
run = InductorBackend().load(program, open({blob!r}, "rb").read())
t3 = time.perf_counter()
store = p.initial_store()
run([store[n] for n in program.inputs])
t4 = time.perf_counter()
print(dict(imports=t1 - t0, trace=t2 - t1, load=t3 - t2, first_step=t4 - t3))
"""


def fresh_process_startup(hidden: int, batch: int, blob: bytes) -> dict[str, float]:
    """What `run` start-up costs in a new process: imports, trace, load the package, first step."""
    with tempfile.NamedTemporaryFile(suffix=".pt2") as f:
        f.write(blob)
        f.flush()
        code = STARTUP.format(hidden=hidden, batch=batch, blob=f.name)
        root = Path(__file__).resolve().parents[1]
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return eval(done.stdout.strip().splitlines()[-1])  # our own dict literal


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--block", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--no-cache", action="store_true", help="always compile (skip the package cache)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    ok, why = available()
    print(f"inductor available: {ok} ({why}); torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    if not ok:
        sys.exit(1)
    steps, stores, notes, host = build(args)
    errors = check(steps, stores, host)
    samples = measure(steps, args.rounds, args.block, args.warmup)
    startup = fresh_process_startup(args.hidden, args.batch, notes.pop("_blob"))
    report(args, samples, errors, notes, startup)


def report(args, samples, errors, notes, startup) -> None:
    med = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
    print(
        f"\nResFFNLogReg hidden {args.hidden} batch {args.batch}: {args.rounds} rounds x {args.block} "
        f"steps per variant, interleaved; median µs per step"
    )
    print(f"{'variant':14} {'median µs':>10} {'p10':>8} {'p90':>8} {'eager/x':>8} {'3-step err':>11}")
    for name, value in med.items():
        q = statistics.quantiles(samples[name], n=10)
        err = f"{errors[name]:.1e}" if name in errors else "-"
        print(
            f"{name:14} {value:10.1f} {q[0] * 1e6:8.1f} {q[-1] * 1e6:8.1f} {med['eager'] / value:8.2f} {err:>11}"
        )
    print("compile/load:", {k: round(v, 3) for k, v in notes.items()})
    print("fresh process start-up (s):", {k: round(v, 3) for k, v in startup.items()})
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "median_us": med,
                    "errors": errors,
                    "notes": notes,
                    "startup_s": startup,
                    "args": vars(args) | {"json": str(args.json)},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

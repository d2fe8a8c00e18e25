"""Peak memory and step time of micro-batching (-mb m) for micro-batch sizes m = B, B/2, B/4.

    python benchmarks/microbatch_bench.py                       # MLP, batch 512, width 2048
    python benchmarks/microbatch_bench.py --batch 256 --width 1024 --backend reference

The model is a deep MLP whose activations dominate memory (ResFFNLogReg's layers, repeated):
batch B x width W floats per saved activation. For each m a PEF is compiled with -mb m in its own
process; then a fresh process loads it (trace_graph with pef=) and runs a few warm-up steps before
timing. "added peak" is that process's peak resident set while the timed steps run (VmHWM, reset
after the warm-up) minus its resident set before them: what a step adds (activations, gradients,
workspace) on top of the weights and optimizer state. The child runs with glibc's mmap threshold
fixed at 64 KiB, so freed activations leave the resident set. "graph" is the compile log's
estimate of the step's computed tensors at their peak (`passes/memory.py`, program order). Step
time is the median of the timed steps; times from separate processes are rougher than the
interleaved ratios of the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn


class DeepMLP(nn.Module):
    def __init__(self, features: int, width: int, depth: int, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(features, width), nn.Tanh()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.Tanh()]
        self.body = nn.Sequential(*layers, nn.Linear(width, classes))
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return self.criterion(logits, y), logits


def _setup(args: argparse.Namespace):
    from sambaflow import samba

    torch.manual_seed(0)
    model = DeepMLP(args.features, args.width, args.depth)
    samba.from_torch_model_(model)
    optim = samba.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = samba.randn(args.batch, args.features, name="x", batch_dim=0)
    y = samba.randint(10, (args.batch,), name="y", batch_dim=0)
    return model, optim, [x, y]


def child_compile(args: argparse.Namespace) -> None:
    from sambaflow import samba

    model, optim, inputs = _setup(args)
    config = {"pef": args.pef, "microbatch_size": args.mb, "backend": args.backend}
    samba.session.compile(model, inputs, optim, config_dict=config)


def child_measure(args: argparse.Namespace) -> None:
    from sambaflow import samba
    from sambaflow.samba import utils

    model, optim, inputs = _setup(args)
    outs = utils.trace_graph(model, inputs, optim, pef=args.pef)
    for _ in range(args.warmup):  # loads the compiled code, makes OpenMP's threads, sizes workspaces
        samba.session.run(inputs, outs)
    _reset_peak()
    before = _status_kib("VmRSS")
    times = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        samba.session.run(inputs, outs)
        times.append(time.perf_counter() - begin)
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {"added_peak_mib": (peak - before) / 1024, "median_step_ms": statistics.median(times) * 1e3}
        )
    )


def _reset_peak() -> None:
    """Linux: restart the process's peak resident set (VmHWM) from its current size."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def _child(mode: str, args: argparse.Namespace, mb: int, pef: str) -> str:
    argv = [sys.executable, __file__, "--child", mode, "--mb", str(mb), "--pef", pef]
    for name in ("batch", "width", "depth", "features", "steps", "warmup", "backend"):
        argv += [f"--{name}", str(getattr(args, name))]
    # Blocks of 64 KiB and more come from mmap and go back to the OS when freed (glibc's default
    # threshold grows, and freed activations would then stay resident): RSS follows live memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{mode} with -mb {mb} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", choices=["compile", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--mb", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pef", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"compile": child_compile, "measure": child_measure}[args.child](args)
        return
    activation = args.batch * args.width * 4 / 2**20
    print(
        f"DeepMLP {args.features}-{args.width}x{args.depth}-10, batch {args.batch}, {args.backend}; "
        f"one activation of the batch is {activation:.1f} MiB"
    )
    print(f"{'micro-batch':>12}{'parts':>7}{'graph (MiB)':>16}{'added peak (MiB)':>18}{'step (ms)':>11}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for mb in (args.batch, args.batch // 2, args.batch // 4):
            pef = os.path.join(folder, f"mb{mb}.pef")
            _child("compile", args, mb, pef)
            log = open(os.path.splitext(pef)[0] + ".compile.log").read()
            estimate = float(re.search(r"peak at about ([0-9.]+) MiB", log).group(1))
            result = json.loads(_child("measure", args, mb, pef).strip().splitlines()[-1])
            rows.append({"microbatch_size": mb, "graph_estimate_mib": estimate, **result})
            print(
                f"{mb:>12}{args.batch // mb:>7}{estimate:>16.1f}{result['added_peak_mib']:>18.1f}"
                f"{result['median_step_ms']:>11.1f}"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()

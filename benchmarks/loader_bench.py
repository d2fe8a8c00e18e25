"""SambaLoader overlap benchmark: per-batch cost of a training loop with and without SambaLoader.

    python benchmarks/loader_bench.py                       # the default (L, S) pairs
    python benchmarks/loader_bench.py --pairs 40:40,10:40 --batches 20 --rounds 7
    python benchmarks/loader_bench.py --quick               # fewer rounds (smoke test)

A DataLoader makes each batch in L ms (its collate_fn), and each step takes S ms. Variants:
  plain        for x, y in dataloader: step(named(x), named(y))     -- about L + S per batch
  sambaloader  for x, y in SambaLoader(dataloader, names): step(x, y) -- about max(L, S) with overlap
Kinds of work (--kinds):
  sleep   batch making sleeps L ms (I/O, decoding in C code); the step is a real session.run of a
          small traced model (reference backend) padded with sleep to S ms: both release the GIL
          as device work does
  cpu     both are real torch compute on this machine's cores: making a batch runs torch ops
          (flip, normalise, pool a batch of 3x64x64 images), the step is session.run of a bigger
          model, each repeated to about L and S ms (calibrated first). Each uses --threads
          torch threads, so with 1 (the default) the two can run on two cores at once.

Two more variants measure what L and S really were: "make" iterates the DataLoader alone,
"step" runs the steps alone on batches made beforehand (a busy machine stretches both).

Method: one process; per (kind, L, S) the four variants run interleaved, one epoch of --batches
batches each per round (the starting variant rotates), after one warm-up epoch each; the cost
per batch is an epoch's loop time / batches; medians over --rounds. Ratios: plain/sambaloader
(above 1: SambaLoader is faster), plain/(make+step) (about 1: no overlap without it) and
sambaloader/max(make, step) (1.0 is perfect overlap; an epoch's first batch cannot overlap, so
the floor is 1 + 1/batches when make >= step). The share
of CPU time other processes took is printed: on a busy machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sambaflow.samba.utils as utils  # noqa: E402
from sambaflow import samba  # noqa: E402
from sambaflow.app.cpu_load import cpu_seconds, other_cpu_share  # noqa: E402
from sambaflow.samba.sambaloader import SambaLoader  # noqa: E402

DEFAULT_PAIRS = "10:10,40:40,10:40,40:10"
T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[loader_bench {time.perf_counter() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


class Model(nn.Module):
    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return self.criterion(out, y), out


class Samples(torch.utils.data.Dataset):
    def __init__(self, n: int, features: int, classes: int) -> None:
        self.x, self.y = torch.randn(n, features), torch.randint(classes, (n,))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def traced(features: int, hidden: int, batch: int) -> Callable[[Any, Any], Any]:
    """A training step of a traced model on the reference backend: one session.run."""
    samba.session.reset()
    model = Model(features, hidden, 10)
    samba.from_torch_model_(model)
    x = samba.randn(batch, features, name="x", batch_dim=0)
    y = samba.randint(10, (batch,), name="y", batch_dim=0)
    optim = samba.optim.SGD(model.parameters(), lr=0.01)
    with contextlib.redirect_stdout(sys.stderr):  # sambaflow's progress lines, not results
        outputs = utils.trace_graph(model, [x, y], optim, backend="reference")
    return lambda xs, ys: samba.session.run([xs, ys], outputs)


def repeats_for(work: Callable[[], Any], target_s: float) -> int:
    """How many calls of `work` take about `target_s` (median of a few timings)."""
    work()
    times = []
    for _ in range(5):
        begin = time.perf_counter()
        work()
        times.append(time.perf_counter() - begin)
    return max(1, round(target_s / statistics.median(times)))


def sleep_kind(make_s: float, step_s: float, batch: int) -> tuple[Callable, Callable]:
    run = traced(64, 64, batch)

    def collate(samples: list) -> Any:
        time.sleep(make_s)
        return default_collate(samples)

    def step(x: Any, y: Any) -> None:
        begin = time.perf_counter()
        run(x, y)
        time.sleep(max(0.0, step_s - (time.perf_counter() - begin)))

    return collate, step


def cpu_kind(make_s: float, step_s: float, batch: int) -> tuple[Callable, Callable]:
    run = traced(512, 1024, batch)
    image = torch.randn(batch, 3, 64, 64)
    mean, std = torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1) + 0.5

    def augment() -> torch.Tensor:
        flipped = torch.flip(image, dims=[3])
        return torch.nn.functional.avg_pool2d((flipped - mean) / std, 2).sum()

    x, y = torch.randn(batch, 512), torch.randint(10, (batch,))
    sx, sy = samba.from_torch_tensor(x, name="x"), samba.from_torch_tensor(y, name="y")
    make_n = repeats_for(augment, make_s)
    step_n = repeats_for(lambda: run(sx, sy), step_s)

    def collate(samples: list) -> Any:
        for _ in range(make_n):
            augment()
        return x, y

    def step(xs: Any, ys: Any) -> None:
        for _ in range(step_n):
            run(xs, ys)

    return collate, step


def epochs(data: DataLoader, step: Callable) -> dict[str, Callable[[], None]]:
    made = [(samba.from_torch_tensor(x, name="x"), samba.from_torch_tensor(y, name="y")) for x, y in data]

    def make_only() -> None:  # the batches alone: the L actually reached
        for _ in data:
            pass

    def step_only() -> None:  # the steps alone, on batches made beforehand: the S actually reached
        for x, y in made:
            step(x, y)

    def plain() -> None:
        for x, y in data:
            step(samba.from_torch_tensor(x, name="x"), samba.from_torch_tensor(y, name="y"))

    def sambaloader() -> None:
        for x, y in SambaLoader(data, ["x", "y"]):
            step(x, y)

    return {"make": make_only, "step": step_only, "plain": plain, "sambaloader": sambaloader}


def measure(kind: str, make_ms: float, step_ms: float, args: argparse.Namespace) -> dict[str, Any]:
    build = sleep_kind if kind == "sleep" else cpu_kind
    collate, step = build(make_ms / 1e3, step_ms / 1e3, args.batch)
    data = DataLoader(
        Samples(args.batches * args.batch, 512 if kind == "cpu" else 64, 10),
        batch_size=args.batch,
        collate_fn=collate,
    )
    variants = epochs(data, step)
    for run in variants.values():
        run()  # warm-up epoch
    samples: dict[str, list[float]] = {name: [] for name in variants}
    before = cpu_seconds()
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            begin = time.perf_counter()
            variants[name]()
            samples[name].append((time.perf_counter() - begin) / args.batches * 1e3)
    row = {name: statistics.median(values) for name, values in samples.items()}
    row |= {"kind": kind, "make_ms": make_ms, "step_ms": step_ms}
    row["other_cpu"] = other_cpu_share(before, cpu_seconds())
    row["plain/sambaloader"] = row["plain"] / row["sambaloader"]
    row["sambaloader/max"] = row["sambaloader"] / max(row["make"], row["step"])
    row["plain/sum"] = row["plain"] / (row["make"] + row["step"])
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print("ms per batch (medians); L, S: asked; make, step: measured alone")
    print(
        f"{'kind':<6}{'L':>5}{'S':>5}{'make':>8}{'step':>8}{'plain':>8}{'samba':>8}"
        f"{'plain/samba':>13}{'plain/(make+step)':>19}{'samba/max(make,step)':>22}{'other cpu':>11}"
    )
    for r in rows:
        print(
            f"{r['kind']:<6}{r['make_ms']:5.0f}{r['step_ms']:5.0f}{r['make']:8.1f}{r['step']:8.1f}"
            f"{r['plain']:8.1f}{r['sambaloader']:8.1f}{r['plain/sambaloader']:13.2f}"
            f"{r['plain/sum']:19.2f}{r['sambaloader/max']:22.2f}{r['other_cpu']:11.0%}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="L:S pairs in ms, comma-separated")
    parser.add_argument("--kinds", default="sleep,cpu", help="sleep, cpu or both")
    parser.add_argument("--batches", type=int, default=20, help="batches per epoch")
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs per variant")
    parser.add_argument("--batch", type=int, default=16, help="samples per batch")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 10 batches")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads for the steps and batch making (default 1: on a busy 2-core "
        "machine two OpenMP threads make a step's own time erratic; 0: torch's default)",
    )
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batches = 3, 10
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [tuple(float(v) for v in p.split(":")) for p in args.pairs.split(",") if p.strip()]
    say(
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, pairs {pairs}, kinds {args.kinds}"
    )
    rows = []
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        for make_ms, step_ms in pairs:
            say(f"{kind} L={make_ms:.0f} ms S={step_ms:.0f} ms")
            rows.append(measure(kind, make_ms, step_ms, args))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

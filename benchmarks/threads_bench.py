"""One ffn_app training step from an Inductor PEF under OpenMP thread settings, quiet and busy.

    python benchmarks/threads_bench.py                 # 300 timed steps per variant, ~2-3 minutes
    python benchmarks/threads_bench.py --steps 20      # a smoke run
    python benchmarks/threads_bench.py --json out.json

Compiles one PEF (examples/ffn_app.py, the inductor backend, compile cache as usual), then times
`--steps` whole steps (`samba.session.run`) in a fresh process per variant: each environment
below, once on a quiet machine and once with `--busy` competing processes that this script starts
and stops afterwards (`--busy-kind`: PyTorch matrix products on their own OpenMP threads, or a
Python loop). Prints the median step time, busy / quiet, and each
variant against the default environment on a quiet machine.

Why these variants. torch's CPU wheels use GNU OpenMP (torch/lib/libgomp.so.1; Intel's
KMP_BLOCKTIME has no effect there). A thread that reaches a barrier first spins for
GOMP_SPINCOUNT iterations (300,000 by default, about a millisecond; OMP_WAIT_POLICY=PASSIVE makes
it 0, ACTIVE makes it unbounded) and then sleeps on a futex. With as many threads as cores and
another busy process, one of the step's threads is often descheduled: every parallel loop (an
Inductor kernel, a GEMM) then waits at its barrier for the kernel scheduler to run that thread
again (a time slice, milliseconds), while its partner spins on a core the straggler could use.
PASSIVE / GOMP_SPINCOUNT=0 stop the spinning but not the wait; OMP_NUM_THREADS=1 (or
--num-threads 1) removes the barriers. Inductor's own code follows the run-time thread count
when the PEF was compiled with as many threads as the machine has cores (it writes a bare
`#pragma omp parallel`); a PEF compiled with another count has it fixed in its loops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "ffn_app.py"

NUM_THREADS = "THREADS_BENCH_NUM_THREADS"  # the worker applies it as parse_app_args applies --num-threads
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "--num-threads 1": {NUM_THREADS: "1"},  # torch.set_num_threads(1) in the process, as the apps do
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=0": {"GOMP_SPINCOUNT": "0"},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
}
BUSY_KINDS = {
    # a single-threaded Python loop
    "python": "while True: pass",
    # another PyTorch process with its own OpenMP threads (a second training run, a test suite)
    "torch": "import torch\na = torch.randn(256, 256)\nwhile True: torch.relu(a @ a)",
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed steps per variant (default: 300)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--hidden-size", type=int, default=256, help="ffn_app hidden size (default: 256)")
    p.add_argument("--busy", type=int, default=1, help="competing busy processes (default: 1)")
    p.add_argument(
        "--busy-kind",
        choices=sorted(BUSY_KINDS),
        default="torch",
        help="what each busy process runs: a Python loop, or PyTorch matrix products on its own "
        "OpenMP threads (default: torch)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: time one variant
    return p.parse_args()


# ---------------------------------------------------------------------------- one variant


def worker(args: argparse.Namespace) -> None:
    """Load the PEF, one untimed step, then `--steps` timed steps; print one JSON line."""
    sys.path.insert(0, str(ROOT / "examples"))
    import torch
    from ffn_app import ResFFNLogReg

    import sambaflow.samba.utils as utils
    from sambaflow import samba
    from sambaflow.app.args import apply_num_threads
    from sambaflow.app.cpu_load import cpu_seconds, other_cpu_share

    apply_num_threads(int(os.environ[NUM_THREADS]) if NUM_THREADS in os.environ else None)
    utils.set_seed(0)
    model = ResFFNLogReg(784, args.hidden_size, 10)
    samba.from_torch_model_(model)
    image = samba.randn(args.batch_size, 784, name="image", batch_dim=0)
    label = samba.randint(10, (args.batch_size,), name="label", batch_dim=0)
    optim = samba.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    outputs = utils.trace_graph(model, (image, label), optim, pef=args.worker)
    samba.session.run([image, label], outputs)
    times = []
    before = cpu_seconds()
    for _ in range(args.steps):
        start = time.perf_counter()
        samba.session.run([image, label], outputs)
        times.append(time.perf_counter() - start)
    share = other_cpu_share(before, cpu_seconds())
    result = {
        "median_ms": statistics.median(times) * 1e3,
        "threads": torch.get_num_threads(),
        "others": share,
    }
    print("RESULT " + json.dumps(result), flush=True)


def time_variant(pef: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", pef, "--steps", str(args.steps)]
    command += ["-b", str(args.batch_size), "--hidden-size", str(args.hidden_size)]
    done = subprocess.run(command, env=dict(os.environ, **env), capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({env}):\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---------------------------------------------------------------------------- the table


def compile_pef(folder: str, args: argparse.Namespace) -> str:
    command = [sys.executable, str(APP), "compile", "-b", str(args.batch_size)]
    command += ["--hidden-size", str(args.hidden_size), "--pef-name", "ffn", "--backend", "inductor"]
    subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return os.path.join(folder, "out", "ffn", "ffn.pef")


def with_busy(count: int, kind: str, run):
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_KINDS[kind]]) for _ in range(count)]
    try:
        time.sleep(0.5)
        return run()
    finally:
        for process in busy:
            process.kill()
            process.wait()


def measure_all(pef: str, args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    results = {}
    for name in args.variants.split(","):
        env = VARIANTS[name]
        quiet = time_variant(pef, env, args)
        busy = with_busy(args.busy, args.busy_kind, lambda env=env: time_variant(pef, env, args))
        results[name] = {"quiet": quiet, "busy": busy}
        print(f"  {name}: quiet {quiet['median_ms']:.3f} ms, busy {busy['median_ms']:.3f} ms", flush=True)
    return results


def print_table(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    base = results.get("default", next(iter(results.values())))["quiet"]["median_ms"]
    print(
        f"\nffn_app step, batch {args.batch_size}, hidden {args.hidden_size}, {os.cpu_count()} CPUs, "
        f"{args.busy} busy process(es) ({args.busy_kind}), {args.steps} steps, median ms"
    )
    header = f"{'variant':<26}{'threads':>8}{'quiet':>10}{'busy':>10}{'busy/quiet':>12}{'quiet/default':>15}"
    print(header + f"{'others quiet':>14}{'others busy':>13}")
    for name, r in results.items():
        quiet, busy = r["quiet"], r["busy"]
        print(
            f"{name:<26}{quiet['threads']:>8}{quiet['median_ms']:>10.3f}{busy['median_ms']:>10.3f}"
            f"{busy['median_ms'] / quiet['median_ms']:>12.2f}{quiet['median_ms'] / base:>15.2f}"
            f"{quiet['others']:>14.0%}{busy['others']:>13.0%}"
        )


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="threads-bench-") as folder:
        print("compiling the PEF (inductor) ...", flush=True)
        pef = compile_pef(folder, args)
        results = measure_all(pef, args)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()

"""Data parallel on torch.distributed (gloo, this CPU): replicas in subprocesses.

Two replicas with half the batch each must end where one process with the whole batch ends
(SGD; AdamW with clipping by the global norm); the example apps run under torchrun and under
mpirun-style variables; a killed replica stops the other with its rank named; replicas that
differ are refused at start-up. Run as a script, this file is the replica (`worker`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FFN_APP = os.path.join(ROOT, "examples", "ffn_app.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
BATCH, STEPS, FEATURES, HIDDEN, CLASSES = 8, 10, 16, 32, 4
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
)


# ---------------------------------------------------------------------------- one replica


def make_optimizer(kind: str, model: torch.nn.Module):
    from sambaflow import samba

    if kind == "sgd":
        return samba.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    clip = None if kind == "adamw-unclipped" else 0.05
    return samba.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01, max_grad_norm=clip)


def train(kind: str, rank: int, world: int, batch: int = BATCH, parallel: bool = False) -> dict:
    """STEPS steps on rank's share of fixed batches; the trained parameters by name."""
    from sambaflow import samba
    from sambaflow.samba import utils

    from models import ResFFNLogReg

    samba.session.reset()
    torch.manual_seed(0)
    model = ResFFNLogReg(FEATURES, HIDDEN, CLASSES)
    samba.from_torch_model_(model)
    data = torch.Generator().manual_seed(1)
    xs, ys = (
        torch.randn(STEPS, BATCH, FEATURES, generator=data),
        torch.randint(0, CLASSES, (STEPS, BATCH), generator=data),
    )
    share = slice(rank * (BATCH // world), (rank + 1) * (BATCH // world))
    xs, ys = xs[:, share, :][:, :batch], ys[:, share][:, :batch]

    def inputs(step: int) -> list:
        return [
            samba.from_torch_tensor(xs[step], name="x", batch_dim=0),
            samba.from_torch_tensor(ys[step], name="y", batch_dim=0),
        ]

    optim = make_optimizer(kind, model)
    outs = utils.trace_graph(model, inputs(0), optim, backend="reference")
    for step in range(STEPS):
        samba.session.run(inputs(step), outs, data_parallel=parallel)
    samba.session.to_cpu(model)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def worker(mode: str, out: str) -> None:
    """A replica: 'train' (in a process group it makes itself) saves both optimizers' results,
    'mismatch' traces another batch size on rank 1, 'forever' trains until killed."""
    import torch.distributed as dist

    from sambaflow.runtime import communicator

    rank, world = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    if mode == "train":  # as an app that makes its own group: the communicator must use it
        dist.init_process_group("gloo", rank=rank, world_size=world)
        results = {kind: train(kind, rank, world, parallel=True) for kind in ("sgd", "adamw")}
        seen = {
            "initialized": dist.is_initialized(),
            "rank": dist.get_rank(),
            "world": communicator.current().world_size,
        }
        torch.save({"params": results, "seen": seen}, f"{out}.{rank}")
    elif mode == "mismatch":
        train("sgd", rank, world, batch=BATCH // world - rank, parallel=True)
    else:
        while True:
            train("sgd", rank, world, parallel=True)
            print("trained", flush=True)


# ---------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(
        SAMBAFLOW_BACKEND="reference", PYTHONPATH=os.pathsep.join([ROOT, HERE]), OMP_NUM_THREADS="1", **extra
    )
    return env


def mpi_style(
    argv: list[str], port: int, world: int = 2, env_extra: dict[str, str] | None = None, **popen
) -> list[subprocess.Popen]:
    """Start `world` processes as mpirun would: only OMPI_COMM_WORLD_* set, plus MASTER_ADDR/PORT."""
    return [
        subprocess.Popen(
            [sys.executable, *argv],
            env=clean_env(
                OMPI_COMM_WORLD_RANK=str(r),
                OMPI_COMM_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                **(env_extra or {}),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        for r in range(world)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append((proc.returncode, out, err))
    return results


# ---------------------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dp") / "params")
    results = finish(mpi_style([__file__, "train", out], free_port()))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    return [torch.load(f"{out}.{r}") for r in range(2)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_two_replicas_with_half_batches_match_one_process(two_replicas, kind):
    one = train(kind, rank=0, world=1)  # the whole batch, no data parallel: the fused step
    alone = train(kind, rank=0, world=2)  # rank 0's half without averaging: must differ
    for replica in two_replicas:
        got = replica["params"][kind]
        for name, expected in one.items():
            assert rel(got[name], expected) < 1e-5, (kind, name, rel(got[name], expected))
    assert max(rel(alone[n], one[n]) for n in one) > 1e-3  # the check can fail
    assert all(r["seen"] == {"initialized": True, "rank": i, "world": 2} for i, r in enumerate(two_replicas))


def test_adamw_clipping_engages(two_replicas):
    """max_grad_norm=0.05 changes the result, so the test above checks the global-norm clip."""
    unclipped = train("adamw-unclipped", rank=0, world=1)
    clipped = two_replicas[0]["params"]["adamw"]
    assert max(rel(clipped[n], unclipped[n]) for n in unclipped) > 1e-3


# ---------------------------------------------------------------------------- faults


def test_replicas_with_different_batch_sizes_are_refused_at_start_up(tmp_path):
    results = finish(mpi_style([__file__, "mismatch", str(tmp_path / "x")], free_port()), timeout=90)
    for rc, _, err in results:
        assert rc != 0
        assert "replicas do not match" in err and "rank(s) [1]" in err, err[-2000:]
        assert "batch inputs" in err and "[4, 16]" in err and "[3, 16]" in err, err[-2000:]


def test_killed_rank_stops_the_other_naming_it_within_60_s(tmp_path):
    procs = mpi_style([__file__, "forever", str(tmp_path / "x")], free_port())
    try:
        for line in procs[1].stdout:  # mid-run: once rank 1 trained a model, it keeps on training
            if line.strip() == "trained":
                break
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rc, _, err = finish(procs[:1], timeout=60)[0]
        elapsed = time.monotonic() - killed
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert rc != 0 and elapsed < 60
    assert "lost rank 1 of 2" in err, err[-2000:]
    assert "SambaRunError" in err


# ---------------------------------------------------------------------------- the example app


@pytest.fixture(scope="module")
def ffn_pef(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ffn_dp")
    pef = str(folder / "ffn_dp.pef")
    argv = [
        sys.executable,
        FFN_APP,
        "compile",
        "-b",
        "32",
        "--hidden-size",
        "32",
        "--data-parallel",
        "-ws",
        "2",
        "-p",
        pef,
    ]
    done = subprocess.run(argv, env=clean_env(), cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return pef


def run_args(pef: str, folder) -> list[str]:
    return [FFN_APP, "run", "-b", "32", "--hidden-size", "32", "-e", "2", "--data-parallel", "--reduce-on-rdu", "-p", pef,
            "--save-checkpoint", str(folder / "ck.pt"), "--log-losses", str(folder / "losses.json")]  # fmt: skip


def check_app_output(out: str, folder) -> None:
    """Rank 0 alone prints each epoch and the accuracy and writes the files; 2 x 32 per step."""
    assert out.count("Epoch [1/2], Step [22/22]") == 1 and out.count("Epoch [2/2]") == 1, out
    assert out.count("Test Accuracy:") == 1, out
    losses = json.loads((folder / "losses.json").read_text())
    assert len(losses) == 2 * 22 and losses[-1] < losses[0]
    assert set(torch.load(folder / "ck.pt")) == {"model", "optimizer", "completed_epochs"}


def test_pef_records_data_parallel(ffn_pef):
    from sambaflow.pef.file import PefFile

    metadata = PefFile(ffn_pef).manifest["pef_metadata"]
    assert metadata["data_parallel"] is True and metadata["world_size"] == 2


def test_ffn_app_under_torchrun(ffn_pef, tmp_path):
    argv = [TORCHRUN, "--standalone", "--nproc_per_node", "2", *run_args(ffn_pef, tmp_path)]
    done = subprocess.run(argv, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    check_app_output(done.stdout, tmp_path)


def test_ffn_app_under_mpirun_style_variables(ffn_pef, tmp_path):
    results = finish(mpi_style(run_args(ffn_pef, tmp_path), free_port(), cwd=tmp_path))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert results[1][1].strip() == "" or "Epoch" not in results[1][1]
    check_app_output(results[0][1], tmp_path)


def test_ffn_app_replica_that_loses_its_peer_says_so_on_stderr(ffn_pef, tmp_path):
    """parse_app_args joins the replicas, so torch.distributed's excepthook wraps the app's error
    hook: the one-line error must still reach stderr, with torch's rank prefix."""
    argv = [FFN_APP, "run", "-b", "32", "--hidden-size", "32", "-e", "100000", "--data-parallel", "-p", ffn_pef]  # fmt: skip
    procs = mpi_style(argv, free_port(), cwd=tmp_path, env_extra={"PYTHONUNBUFFERED": "1"})
    try:
        for line in procs[0].stdout:  # rank 0 prints each epoch: the replicas are mid-run
            if line.startswith("Epoch [1/"):
                break
        procs[1].send_signal(signal.SIGKILL)
        rc, _, err = finish(procs[:1], timeout=60)[0]
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert rc == 2, err[-2000:]
    assert "[rank0]: error: data-parallel run: lost rank 1 of 2" in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]


def test_measure_performance_reports_the_combined_throughput(ffn_pef, tmp_path):
    argv = [
        FFN_APP,
        "measure-performance",
        "-b",
        "32",
        "--hidden-size",
        "32",
        "--data-parallel",
        "-p",
        ffn_pef,
        "-n",
        "5",
    ]
    results = finish(mpi_style(argv, free_port(), cwd=tmp_path))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    out = results[0][1]
    assert "Measuring performance with world size:  2" in out
    assert "NOTE: This is the combined throughput for 2 workers" in out
    assert "e2e_latency:" in out and "samples/s, measured over 5 iterations." in out
    assert "Measuring performance" not in results[1][1]


# ---------------------------------------------------------------------------- launch environment


def test_launch_environments_are_read():
    from sambaflow.runtime.launch_env import detect

    torchrun = detect(
        {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    )
    assert (torchrun.launcher, torchrun.rank, torchrun.world_size, torchrun.local_rank) == (
        "torchrun",
        1,
        4,
        1,
    )
    ompi = detect({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                   "MASTER_ADDR": "h", "MASTER_PORT": "1234"})  # fmt: skip
    assert (ompi.rank, ompi.world_size, ompi.master_port) == (2, 3, 1234)
    pmi = detect({"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert pmi.launcher == "mpirun (PMI)" and pmi.world_size == 2
    assert not detect({}).launched and detect({}).world_size == 1


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"},
            "MASTER_ADDR and MASTER_PORT are not set",
        ),
        ({"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT is not set"),
        (
            {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            "RANK=2 is not below WORLD_SIZE=2",
        ),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"}, "not a TCP port"),
    ],
)
def test_launch_environment_errors_say_what_to_set(env, message):
    from sambaflow.errors import SambaRunError
    from sambaflow.runtime.launch_env import detect

    with pytest.raises(SambaRunError, match=message):
        detect(env)


def test_gradients_go_in_few_large_buckets():
    from sambaflow.runtime.communicator import buckets

    tensors = [
        torch.zeros(1000),
        torch.zeros(10),
        torch.zeros(500, dtype=torch.float64),
        torch.zeros(3000),
        torch.zeros(2),
    ]
    grouped = buckets(tensors, limit=4 * 1200)
    assert [[t.numel() for t in b] for b in grouped] == [[1000, 10], [3000], [2], [500]]


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    worker(sys.argv[1], sys.argv[2])

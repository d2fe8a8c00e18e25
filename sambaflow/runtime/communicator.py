"""The replicas of a data-parallel run, on `torch.distributed`: gradient averaging and start-up checks.

`current()` joins the process group the launcher describes (torchrun, or mpirun with MASTER_ADDR
and MASTER_PORT: `launch_env.py`) on first use, or uses the default group an app made itself. It
uses torch.distributed's default group, so `dist.is_initialized()` and `dist.get_rank()` work in
apps. gloo carries CPU tensors and NCCL CUDA ones.

Gradients are averaged in a few large all-reduces (tensors flattened into ~25 MB buckets, all
started before the first is waited on) instead of one per tensor. A replica that is lost (killed,
or ended by an exception) ends the others' waits with a `SambaRunError` naming its rank, found
from heartbeats (`liveness.py`), instead of a hang.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from sambaflow.errors import SambaError, SambaRunError
from sambaflow.runtime import launch_env
from sambaflow.runtime.liveness import SILENT_AFTER_S, Liveness

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size: few, large messages
WAIT_SLICE = timedelta(seconds=1)  # how often a long wait looks for lost replicas
# How long a replica waits for a live but stuck peer (SAMBAFLOW_DIST_TIMEOUT); lost ones are found in seconds.
DEFAULT_TIMEOUT_S = 1800.0
# How long the replicas wait for each other to join (SAMBAFLOW_DIST_START_TIMEOUT): one that died
# before joining has no heartbeat to miss.
DEFAULT_START_TIMEOUT_S = 600.0


class Communicator:
    """This process's place among the replicas; a world of one averages nothing."""

    def __init__(self, rank: int = 0, world_size: int = 1, liveness: Liveness | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.liveness = liveness
        self._checks = 0

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size})"

    # --- gradients ------------------------------------------------------------------------------
    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, with its mean over all replicas."""
        if self.world_size == 1 or not tensors:
            return
        pending = []
        for bucket in buckets(tensors, BUCKET_BYTES):
            flat = bucket[0] if _whole(bucket) else torch.cat([t.reshape(-1) for t in bucket])
            pending.append((bucket, flat, self._start(dist.all_reduce, flat)))
        for bucket, flat, work in pending:  # copying one back overlaps the next one's reduction
            self._wait(work, flat, "the gradient all-reduce")
            flat.div_(self.world_size)
            if flat is not bucket[0]:
                for tensor, piece in zip(bucket, flat.split([t.numel() for t in bucket])):
                    tensor.copy_(piece.view_as(tensor))

    def _start(self, collective: Any, *args: Any) -> Any:
        try:
            return collective(*args, async_op=True)
        except RuntimeError as error:
            raise self._lost_error(error, "starting a collective") from None

    def _wait(self, work: Any, tensor: torch.Tensor, during: str) -> None:
        """Wait for `work`; every WAIT_SLICE, look for lost replicas (gloo waits can be sliced;
        a CUDA wait is left whole: NCCL's own watchdog ends it after the process-group timeout)."""
        try:
            if tensor.is_cuda or self.liveness is None:
                work.wait()
                return
            while not _waited(work):
                lost = self.liveness.left() or self.liveness.silent()
                if lost:
                    _stuck.append(work)  # see _exit_without_finalizing
                    raise SambaRunError(self._lost_message(lost, during, None))
        except RuntimeError as error:
            raise self._lost_error(error, during) from None

    # --- start-up -------------------------------------------------------------------------------
    def check_replicas(self, description: dict[str, Any]) -> None:
        """Raise `SambaRunError` unless every replica describes its run the same way (one PEF,
        one batch shape, one model): the averaged gradients would be meaningless otherwise."""
        if self.world_size == 1:
            return
        self._checks += 1
        text = json.dumps(description, sort_keys=True, default=str)
        self._store_set(f"replica/{self._checks}/{self.rank}", text)  # read only if they differ
        digests = self._gather_digests(hashlib.sha256(text.encode()).digest())
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        if differing:
            raise SambaRunError(self._mismatch_message(differing))

    def _gather_digests(self, digest: bytes) -> list[bytes]:
        words = torch.tensor(
            [int.from_bytes(digest[i : i + 8], "little", signed=True) for i in range(0, 32, 8)]
        )
        words = words.to(_collective_device())
        gathered = [torch.empty_like(words) for _ in range(self.world_size)]
        work = self._start(dist.all_gather, gathered, words)
        self._wait(work, words, "the start-up check of the replicas")
        return [b"".join(int(w).to_bytes(8, "little", signed=True) for w in g.tolist()) for g in gathered]

    def _mismatch_message(self, differing: list[int]) -> str:
        ours = self._description(0)
        lines = []
        for rank in differing[:3]:
            theirs = self._description(rank)
            for key in sorted(set(ours) | set(theirs)):
                if ours.get(key) != theirs.get(key):
                    lines.append(
                        f"{key}: rank {rank} has {_short(theirs.get(key))}, rank 0 has {_short(ours.get(key))}"
                    )
        more = f" (and {len(differing) - 3} more ranks)" if len(differing) > 3 else ""
        return (
            f"data-parallel replicas do not match: rank(s) {differing[:3]}{more} differ from rank 0 in "
            + "; ".join(lines)
            + ". Every replica must run the same PEF with the same model, optimizer and "
            "-b/--batch-size (the global batch is that times the world size): start them all "
            "with one command line"
        )

    def _description(self, rank: int) -> dict[str, Any]:
        return json.loads(self._store_get(f"replica/{self._checks}/{rank}"))

    # --- lost replicas --------------------------------------------------------------------------
    def _lost_error(self, error: Exception, during: str) -> SambaRunError:
        try:
            lost = self.liveness.lost() if self.liveness else {}
        except Exception:  # the store itself is unreachable: its host is gone
            lost = {0: "is unreachable, and so is the rendezvous store (kept by rank 0 or the launcher)"}
        return SambaRunError(self._lost_message(lost, during, error))

    def _lost_message(self, lost: dict[int, str], during: str, error: Exception | None) -> str:
        who = "; ".join(f"rank {rank} {how}" for rank, how in sorted(lost.items())) or (
            "a peer closed its connection (every rank still sends heartbeats)"
        )
        names = ", ".join(str(r) for r in sorted(lost)) or "unknown"
        cause = f" (torch.distributed: {str(error).splitlines()[0][:300]})" if error is not None else ""
        return (
            f"data-parallel run: lost rank {names} of {self.world_size} during {during}: {who}. "
            f"This replica (rank {self.rank}) stops too. Look at the lost rank's output for why it "
            f"ended, then restart every replica (from a checkpoint){cause}"
        )

    # --- the store ------------------------------------------------------------------------------
    def _store_set(self, key: str, value: str) -> None:
        store = _sambaflow_store()
        if store is not None:
            store.set(key, value)

    def _store_get(self, key: str) -> str:
        store = _sambaflow_store()
        return "{}" if store is None else store.get(key).decode()


def buckets(tensors: Sequence[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, up to `limit` bytes a bucket (a larger tensor
    is a bucket of its own). The order is the same on every replica, as all-reduce needs."""
    done: list[list[torch.Tensor]] = []
    open_: dict[tuple[Any, Any], tuple[list[torch.Tensor], int]] = {}
    for tensor in tensors:
        key, size = (tensor.dtype, tensor.device), tensor.numel() * tensor.element_size()
        bucket, used = open_.get(key, ([], 0))
        if bucket and used + size > limit:
            done.append(bucket)
            bucket, used = [], 0
        open_[key] = (bucket + [tensor], used + size)
    return done + [bucket for bucket, _ in open_.values()]


def _whole(bucket: list[torch.Tensor]) -> bool:
    """One contiguous tensor: reduce it where it is, no copy."""
    return len(bucket) == 1 and bucket[0].is_contiguous()


def _waited(work: Any) -> bool:
    """True once `work` finished; False when WAIT_SLICE passed first (gloo's wait then raises
    'timed out' and may be waited on again)."""
    try:
        work.wait(timeout=WAIT_SLICE)
        return True
    except RuntimeError as error:
        if "timed out" in str(error).lower():
            return False
        raise


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def _collective_device() -> torch.device:
    """CPU unless the default group has NCCL alone (an app that set it up itself)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sambaflow_store() -> Any:
    """Our keys in the default group's store (any launcher's rendezvous has one), or None."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None
    return dist.PrefixStore("sambaflow/", store)


# ---------------------------------------------------------------------------- joining


_current: Communicator | None = None


def current() -> Communicator:
    """The process's communicator: joins the launcher's process group on first use."""
    global _current
    solo = _current is not None and _current.world_size == 1 and _current.liveness is None
    if _current is None or (solo and dist.is_initialized()):  # an app may make its group later
        _current = _join()
    return _current


_stuck: list[Any] = []  # collectives a silent peer will never finish


def _exit_without_finalizing() -> None:
    """atexit, registered on joining (so it runs after the handlers registered later): after a
    silent peer was found, a collective still waits on it, and the process group's destructor
    would wait for it at interpreter exit (gloo cannot abort it), so leave without finalizing.
    Status 2 for an uncaught SambaError (as app/error_hook.py), else 1: the run lost a replica."""
    if not _stuck:
        return
    error = getattr(sys, "last_value", None)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(2 if isinstance(error, SambaError) else 1)


def _join() -> Communicator:
    if not dist.is_available():
        return Communicator()
    if not dist.is_initialized():
        env = launch_env.detect()
        if not env.launched:
            return Communicator()
        _init_group(env)
    rank, size = dist.get_rank(), dist.get_world_size()
    atexit.register(_exit_without_finalizing)
    store = _sambaflow_store()
    liveness = Liveness(store, rank, size) if store is not None and size > 1 else None
    return Communicator(rank, size, liveness)


def _init_group(env: launch_env.LaunchEnv) -> None:
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    try:
        start, steady = _timeout("SAMBAFLOW_DIST_START_TIMEOUT", DEFAULT_START_TIMEOUT_S), _timeout()
        dist.init_process_group(
            backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=start
        )
        dist.distributed_c10d._set_pg_timeout(steady)  # joined: now the collectives' timeout
    except (RuntimeError, ValueError) as error:
        raise SambaRunError(
            f"could not join the data-parallel group at {env.master_addr}:{env.master_port} as rank "
            f"{env.rank} of {env.world_size} ({env.launcher}): {str(error).splitlines()[0].rstrip('.')}. Start "
            "every replica with the same MASTER_ADDR, MASTER_PORT and world size (a replica that "
            "ended before it joined: see its output)"
        ) from None


def _timeout(variable: str = "SAMBAFLOW_DIST_TIMEOUT", default: float = DEFAULT_TIMEOUT_S) -> timedelta:
    text = os.environ.get(variable, "")
    try:
        seconds = float(text) if text else default
    except ValueError:
        seconds = -1.0
    if not seconds > SILENT_AFTER_S:
        raise SambaRunError(
            f"{variable}={text!r}: expected a number of seconds above {SILENT_AFTER_S:.0f} "
            "(how long a replica waits for its peers)"
        )
    return timedelta(seconds=seconds)


def reset() -> None:
    """Forget the communicator (tests); the process group, if any, is left as it is."""
    global _current
    if _current is not None and _current.liveness is not None:
        _current.liveness.stop()
    _current = None

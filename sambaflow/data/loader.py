"""SambaLoader: a producer thread turns a torch DataLoader's batches into named SambaTensors.

Why a thread: a training step's real work (torch operators, device runs) releases the GIL, so a
thread that makes batch i+1 (collation, `function_hook`, conversion, pinning, the host-to-device
copy) while step i runs gives real overlap, without pickling batches between processes. It runs
at most `maxsize` batches ahead.

Lifetime: the thread, and a DataLoader's worker processes, start on the first `next()` and end
when the loop ends, breaks, raises, or its iterator is dropped. The thread never blocks for good
on a full queue (it polls a stop event), and the consumer joins it.

Errors: an exception in the producer reaches the consumer as itself (its type and traceback)
with a note naming the loader and the batch; waiting longer than `timeout` raises SambaRunError.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from sambaflow.errors import SambaArgumentError, SambaRunError
from sambaflow.logging import samba_logger
from sambaflow.tensors.current import current_session
from sambaflow.tensors.sambatensor import SambaTensor

POLL_S = 0.05  # how often a producer blocked on a full queue looks at the stop event
JOIN_S = 5.0  # how long closing waits for a producer that is still inside a (slow) batch
CPU_PINNING_NOTE = (
    "session.enable_pinned_memory(): there is no GPU here, so SambaLoader leaves batches in "
    "ordinary host memory; pinned memory changes nothing on the CPU"
)
_DONE = object()


class SambaLoader:
    """Iterate `dataloader`, yielding lists of SambaTensors named `names` (and the batch if asked).

    `function_hook(batch)` turns a DataLoader batch into the tensors to name (in the producer
    thread); `maxsize` is how many batches the thread may run ahead (0: no limit, as for
    `queue.Queue`); `timeout` is how many seconds the loop waits for one batch before it raises.
    """

    def __init__(
        self,
        dataloader: Iterable[Any],
        names: Sequence[str],
        maxsize: int = 10,
        function_hook: Callable[[Any], Any] | None = None,
        return_original_batch: bool = False,
        timeout: float = 900,
        batch_dim: int = 0,
    ) -> None:
        if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
            raise SambaArgumentError(f"SambaLoader: names must be a non-empty list of strings, got {names!r}")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise SambaArgumentError(
                f"SambaLoader: maxsize must be an int >= 0 (0: no limit), got {maxsize!r}"
            )
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise SambaArgumentError(f"SambaLoader: timeout must be a number of seconds > 0, got {timeout!r}")
        self.dataloader = dataloader
        self.names = list(names)
        self.maxsize = maxsize
        self.function_hook = function_hook
        self.return_original_batch = return_original_batch
        self.timeout = timeout
        self.batch_dim = batch_dim

    def __repr__(self) -> str:
        return f"SambaLoader(names={self.names})"

    def __len__(self) -> int:
        return len(self.dataloader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        # A generator: its `finally` runs on exhaustion, on an exception, on `break` (the for
        # loop drops it) and when an abandoned iterator is garbage collected.
        producer = _Producer(self, _stager())
        producer.thread.start()
        try:
            for index in itertools.count():
                batch = producer.next(index)
                if batch is _DONE:
                    return
                named = producer.stager.ready(batch)
                yield (named, batch.original) if self.return_original_batch else named
        finally:
            producer.close()

    def convert(self, batch: Any, stager: _Stager) -> _Batch:
        """One DataLoader batch -> staged, named SambaTensors (runs in the producer thread)."""
        original = batch
        if self.function_hook is not None:
            batch = self.function_hook(batch)
        tensors = self._tensors(batch)
        staged, token = stager.stage(tensors)
        named = [SambaTensor(t, name=n, batch_dim=self.batch_dim) for t, n in zip(staged, self.names)]
        return _Batch(named, original, token)

    def _tensors(self, batch: Any) -> list[torch.Tensor]:
        tensors = [batch] if isinstance(batch, torch.Tensor) else batch
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise SambaRunError(
                f"{self!r}: a batch must be a tensor or a list/tuple of tensors, got "
                f"{_kinds(tensors)}; convert it with function_hook="
            )
        if len(tensors) != len(self.names):
            raise SambaRunError(
                f"{self!r}: a batch has {len(tensors)} tensors but {len(self.names)} names "
                f"were given; give one name per tensor (or select tensors with function_hook=)"
            )
        return list(tensors)


@dataclass
class _Batch:
    named: list[SambaTensor]
    original: Any
    token: Any  # what the consumer waits on before using the tensors (a CUDA event), or None


@dataclass
class _Failure:
    error: BaseException
    index: int


class _Producer:
    """The thread that makes batches, the queue it fills, and the event that stops it."""

    def __init__(self, loader: SambaLoader, stager: _Stager) -> None:
        self.loader = loader
        self.stager = stager
        self.queue: queue.Queue = queue.Queue(maxsize=loader.maxsize)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"{loader!r} producer", daemon=True)

    def _run(self) -> None:
        batches, index = None, 0
        try:
            batches = iter(self.loader.dataloader)
            for batch in batches:
                if self.stop.is_set() or not self._put(self.loader.convert(batch, self.stager)):
                    return
                index += 1
            self._put(_DONE)
        except BaseException as error:  # handed to the consumer and raised there
            self._put(_Failure(error, index))
        finally:
            _shut_down(batches, self.loader.dataloader)

    def _put(self, item: Any) -> bool:
        """Queue `item`, waiting while the queue is full; False once the consumer has stopped us."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def next(self, index: int) -> Any:
        """Batch `index`, `_DONE`, or raise the producer's exception or a timeout (consumer side)."""
        try:
            item = self.queue.get(timeout=self.loader.timeout)
        except queue.Empty:
            raise SambaRunError(self._timeout_message(index)) from None
        if isinstance(item, _Failure):
            item.error.add_note(
                f"raised in {self.loader!r} while making batch {item.index} (in its producer "
                "thread: the data loader, function_hook or the conversion to SambaTensors)"
            )
            raise item.error
        return item

    def _timeout_message(self, index: int) -> str:
        t = self.loader.timeout
        return (
            f"{self.loader!r}: batch {index} did not arrive within timeout={t} s; the data loader "
            f"(its dataset, collate_fn or workers) or function_hook is stuck or slower than that. "
            f"If batches really take this long, pass a larger timeout, e.g. SambaLoader(..., "
            f"timeout={max(2 * t, 1)})"
        )

    def close(self) -> None:
        self.stop.set()
        if self.thread is threading.current_thread():
            return  # the garbage collector, running in the producer, dropped the iterator
        self.thread.join(JOIN_S)
        if self.thread.is_alive():
            samba_logger.warning(
                f"{self.loader!r}: its producer is still inside a batch after {JOIN_S} s; it "
                "stops (and shuts down the data loader's workers) when that batch is made"
            )


def _shut_down(batches: Any, dataloader: Any) -> None:
    """End a DataLoader's worker processes now, not whenever the garbage collector finds the
    iterator: an exception's traceback (handed to the consumer) keeps it alive."""
    if batches is None or getattr(dataloader, "persistent_workers", False):
        return  # persistent workers are the DataLoader's to keep for its next epoch
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()
    close = getattr(batches, "close", None)  # a generator
    if callable(close):
        close()


def _kinds(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {[type(v).__name__ for v in value]}"
    return type(value).__name__


# --- staging: where a batch's tensors go ----------------------------------------------------------
class _Stager:
    """Without pinned memory: the tensors stay as the data loader made them."""

    def stage(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        return tensors, None

    def ready(self, batch: _Batch) -> list[SambaTensor]:
        return batch.named


class _PinningStager(_Stager):
    """Pinned host memory (a GPU exists, the session's tensors are on the host)."""

    def stage(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        return [_pinned(t) for t in tensors], None


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    # A data loader may already hand out pinned (pin_memory=True) or GPU tensors: no second copy.
    return tensor if tensor.is_cuda or tensor.is_pinned() else tensor.pin_memory()


class _CudaStager(_Stager):
    """Pinned host memory, then a non-blocking copy to the GPU on a side stream, so that batch
    i+1's copy overlaps step i; the consumer's stream waits for the copy before using it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.consumer = torch.cuda.current_stream(device)

    def stage(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        with torch.cuda.stream(self.stream):
            moved = [_pinned(t).to(self.device, non_blocking=True) for t in tensors]
            done = torch.cuda.Event()
            done.record(self.stream)
        for t in moved:
            t.record_stream(self.consumer)  # the allocator must not reuse it while the step reads it
        return moved, done

    def ready(self, batch: _Batch) -> list[SambaTensor]:
        self.consumer.wait_event(batch.token)
        return batch.named


def _stager() -> _Stager:
    """Decided once per pass over the data, in the consumer thread, from the session's settings."""
    session = current_session()
    if session is None or not session.pinned_memory:
        return _Stager()
    device = _store_device(session)
    if device.type == "cuda":
        return _CudaStager(device)
    if torch.cuda.is_available():
        return _PinningStager()
    samba_logger.warning(CPU_PINNING_NOTE, log_limit=1)
    return _Stager()


def _store_device(session: Any) -> torch.device:
    """Where the session keeps its tensors (the "device"): a GPU if any stored tensor is on one
    (scalars such as hyperparameters may stay on the host)."""
    for stored in getattr(session, "store", {}).values():
        if isinstance(stored, torch.Tensor) and stored.is_cuda:
            return stored.device
    return torch.device("cpu")

"""SambaLoader: a producer thread turns a torch DataLoader's batches into named SambaTensors.

The thread runs ahead of the training loop (up to `maxsize` batches), so host work (decoding,
collation, pinning) overlaps the graph runs. With `session.enable_pinned_memory()` the batches
are staged in pinned memory where the platform supports it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from sambaflow.errors import SambaRunError
from sambaflow.runtime.current import current_session
from sambaflow.tensors.sambatensor import SambaTensor

_DONE = object()


class SambaLoader:
    """Iterate `dataloader`, yielding lists of SambaTensors named `names` (and the batch if asked)."""

    def __init__(
        self,
        dataloader: Iterable[Sequence[torch.Tensor]],
        names: Sequence[str],
        maxsize: int = 10,
        function_hook: Callable[[Any], Any] | None = None,
        return_original_batch: bool = False,
        timeout: float = 900,
        batch_dim: int = 0,
    ) -> None:
        if isinstance(names, str) or not names:
            raise SambaRunError(f"SambaLoader: names must be a non-empty list of strings, got {names!r}")
        self.dataloader = dataloader
        self.names = list(names)
        self.maxsize = maxsize
        self.function_hook = function_hook
        self.return_original_batch = return_original_batch
        self.timeout = timeout
        self.batch_dim = batch_dim

    def __len__(self) -> int:
        return len(self.dataloader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        buffer: queue.Queue = queue.Queue(maxsize=self.maxsize)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(buffer, stop), daemon=True)
        worker.start()
        try:
            while True:
                item = self._next(buffer)
                if item is _DONE:
                    return
                yield item
        finally:
            stop.set()

    def _next(self, buffer: queue.Queue) -> Any:
        try:
            item = buffer.get(timeout=self.timeout)
        except queue.Empty:
            raise SambaRunError(
                f"SambaLoader: no batch from the data loader within {self.timeout} s"
            ) from None
        if isinstance(item, BaseException):
            raise item
        return item

    def _produce(self, buffer: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self.dataloader:
                if stop.is_set():
                    return
                buffer.put(self._convert(batch))
            buffer.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            buffer.put(exc)

    def _convert(self, batch: Any) -> Any:
        original = batch
        if self.function_hook is not None:
            batch = self.function_hook(batch)
        tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch)
        if len(tensors) != len(self.names):
            raise SambaRunError(
                f"SambaLoader: a batch has {len(tensors)} tensors but {len(self.names)} names "
                f"were given ({self.names}); give one name per tensor"
            )
        named = [
            SambaTensor(_staged(t), name=n, batch_dim=self.batch_dim) for t, n in zip(tensors, self.names)
        ]
        return (named, original) if self.return_original_batch else named


def _staged(tensor: torch.Tensor) -> torch.Tensor:
    session = current_session()
    if session is not None and session.pinned_memory and torch.cuda.is_available():
        return tensor.pin_memory()
    return tensor

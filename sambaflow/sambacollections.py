"""`sambaflow.sambacollections`: collections SambaFlow apps import (`OrderedSet`).

`OrderedSet` keeps insertion order and compares tensors by identity: `t == t` on tensors is
elementwise and tensors hash by id, so two different parameters with equal values are two members,
and `(name, param) in s` finds the pair holding that very tensor.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, MutableSet
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_TENSOR = object()  # tags a tensor's id in a key, so it never equals a plain int or tuple member


class OrderedSet(MutableSet[T]):
    """An insertion-ordered set; tensors, and tuples holding tensors, are keyed by identity."""

    def __init__(self, items: Iterable[T] = ()) -> None:
        self._items: dict[Hashable, T] = {}  # key -> the element itself (keeps tensor ids valid)
        self.update(items)

    def add(self, item: T) -> None:
        self._items.setdefault(_key(item), item)

    def discard(self, item: T) -> None:
        self._items.pop(_key(item), None)

    def update(self, *iterables: Iterable[T]) -> None:
        for items in iterables:
            for item in items:
                self.add(item)

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, item: object) -> bool:
        try:
            return _key(item) in self._items
        except TypeError:  # unhashable: cannot be a member
            return False

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._items.values())!r})"


def _key(item: Any) -> Hashable:
    """Identity for tensors, element-wise for tuples, the item itself otherwise."""
    if isinstance(item, torch.Tensor):
        return (_TENSOR, id(item))
    if isinstance(item, tuple):
        return tuple(_key(element) for element in item)
    hash(item)  # raise TypeError for an unhashable item now, as a set would
    return item

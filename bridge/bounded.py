"""A size-capped dict for per-process copies that refill from the store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


class BoundedMap(Generic[K, T]):
    """A dict with a size cap, enforced the cheap way: a full map is dropped whole and
    refills from the store. Single operations are atomic under the GIL."""

    def __init__(self, max_size: int) -> None:
        self._items: dict[K, T] = {}
        self._max_size = max_size

    def get(self, key: K) -> T | None:
        return self._items.get(key)

    def put(self, key: K, value: T) -> None:
        if len(self._items) >= self._max_size:
            self._items.clear()
        self._items[key] = value

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def drop_values(self, doomed: Callable[[T], bool]) -> None:
        """Remove every entry whose value is ``doomed``; a scan, for rare events."""
        for key, value in list(self._items.items()):
            if doomed(value):
                self._items.pop(key, None)

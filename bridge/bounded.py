"""Per-process state that must stay small under any load: a size-capped dict for copies
that refill from the store, and per-key token buckets built on it."""

from __future__ import annotations

import threading
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


class TokenBuckets:
    """A token bucket per key (a session id): ``burst`` takes at once, refilled one per
    ``every_ms``. What bounds the Kratos calls a client can cause for one session, however
    fast it asks; at most ``max_keys`` buckets (a full set is dropped whole, which only
    ever grants more)."""

    def __init__(self, burst: int, every_ms: int, max_keys: int = 50_000) -> None:
        self._burst, self._every_ms = burst, every_ms
        self._left: BoundedMap[str, tuple[float, int]] = BoundedMap(max_keys)
        self._lock = threading.Lock()  # worker threads: the bound holds under a burst too

    def take(self, key: str, now_ms: int) -> bool:
        with self._lock:
            entry = self._left.get(key)
            left = float(self._burst)
            if entry is not None:
                left = min(left, entry[0] + (now_ms - entry[1]) / self._every_ms)
            if left < 1:
                return False
            self._left.put(key, (left - 1, now_ms))
            return True

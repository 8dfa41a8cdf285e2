"""How the Redis store and its session registry make a call: connected first if need be;
a Redis error becomes ``StoreUnavailable``, one throttled warning and a word to the store's
error observer. Both modules import this one, so neither needs the other's private parts."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

import redis
from redis.exceptions import RedisClusterException

from bridge.errors import StoreUnavailable
from bridge.logs import Throttled
from bridge.store.base import Keys

T = TypeVar("T")
S = TypeVar("S")
P = ParamSpec("P")

failure_log = Throttled(logging.getLogger("bridge.store.redis"))
"""The Redis store's warnings, registry's included: one throttle for all of them, under the
store's logger name, which operators (and ``tests/integration/test_outages.py``) filter on."""


class SharedConnection(Protocol):
    """What the registry and ``unavailable_on_error`` use of the Redis store."""

    keys: Keys
    error_observer: Callable[[str], None] | None

    @property
    def clustered(self) -> bool: ...

    def client(self) -> Any:
        """The connected client, connecting first if need be (a Redis error if it cannot)."""
        ...


def unavailable_on_error(
    method: Callable[Concatenate[S, P], T],
) -> Callable[Concatenate[S, P], T]:
    """For the methods of the store and of its registry (whose store is ``self.store``):
    connect first if need be; a Redis error becomes ``StoreUnavailable``, logged and told
    to the error observer."""

    @functools.wraps(method)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        store = cast(SharedConnection, getattr(self, "store", self))
        try:
            store.client()
            return method(self, *args, **kwargs)
        except redis.RedisError as error:
            raise _unavailable(store, method.__name__, error) from None

    return wrapper


def unavailable_on_error_async(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """``unavailable_on_error`` for the coroutines of the store on an event loop (whose
    store is ``self.store``; it is connected already). ``redis.asyncio``'s cluster client
    also fails with ``RedisClusterException``, which is no ``RedisError``."""

    @functools.wraps(method)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        store = cast(SharedConnection, getattr(self, "store", self))
        try:
            return await method(self, *args, **kwargs)
        except (redis.RedisError, RedisClusterException) as error:
            raise _unavailable(store, method.__name__, error) from None

    return wrapper


def _unavailable(store: SharedConnection, operation: str, error: Exception) -> StoreUnavailable:
    failure_log.warning("redis %s failed: %s", operation, type(error).__name__)
    if store.error_observer is not None:
        store.error_observer(operation)
    return StoreUnavailable(f"Redis: {type(error).__name__}")

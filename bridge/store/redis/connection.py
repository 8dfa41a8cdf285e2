"""The one place a Redis client is built from ``BRIDGE_REDIS_URL``.

Three shapes sit behind the same commands: one server (``redis://``, ``rediss://``,
``unix://``), a master found through Sentinel (``redis[s]+sentinel://``) and a Redis
Cluster (``redis[s]+cluster://``). Each client follows its own kind of failover:

- Sentinel: every new connection asks the Sentinels for the master, and a connection
  that fails or meets ``READONLY`` (its server was demoted) is dropped, so the first
  command after a failover reconnects to the promoted replica.
- Cluster: every connection error refreshes the slot map (``CLUSTER SLOTS``) before the
  retry, so the promoted replica serves its slots as soon as the cluster agrees on it.

Every failure is a ``redis.RedisError``, which the store turns into ``StoreUnavailable``.

The same settings also build a client for coroutines on an event loop (redis-py's
``redis.asyncio``, each topology's own), for the steps the server's loop takes itself
(``RedisTarget.on_loop``).

Every threaded client packs its commands with hiredis directly (``HiredisPacker``): the
bytes are the same as redis-py's own packer makes, for about a third of its CPU on the
lookup's and the save's ~30 arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import hiredis
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from bridge.hosts import host_port
from bridge.store.redis.url import RedisAddress, parse_redis_url

_POOL_SIZE = 256
_HEALTH_CHECK_SECONDS = 30


class HiredisPacker:
    """Packs a command into RESP with one call to ``hiredis.pack_command``.

    redis-py 8.1+ runs every argument through its Python encoder (and a scan for
    memoryviews) before handing it to hiredis: 25.6 µs for a lookup's 40 arguments against
    8.2 µs in 8.0 and 4.1 µs in 7.4, paid twice per miss. hiredis encodes ``str`` as UTF-8
    (an unpaired surrogate raises ``UnicodeEncodeError``, as redis-py's strict encoder
    does), ``int`` and ``float`` as their ``repr``, and refuses anything else with a
    ``TypeError``, raised as the ``redis.DataError`` redis-py gives for such an argument
    (redis-py also takes a ``bytearray``, which the bridge never sends). Like redis-py's
    packers, a command name with spaces (``"SCRIPT LOAD"``) is sent as separate words. It
    keeps no state, so one instance serves every connection on every thread."""

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str):
            name = name.encode()
        if b" " in name:
            args = (*name.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as error:
            raise redis.DataError(str(error)) from error


_PACKER = HiredisPacker()


def _command_retry() -> Retry:
    """One retry per command, for Sentinel and Cluster. Following a failover needs none:
    every connection error makes the client look again (ask the Sentinels, refresh the
    slot map), so the next command goes to the new master. The one retry lets a command
    that met a connection the failover broke succeed there instead of failing; more would
    only hold a worker thread, as the request is answered 503 after
    ``Settings.request_budget`` anyway (redis-py's default is 10 retries).

    What one command can wait for, with every server silent (refused connections fail
    at once), ``t`` being the timeout:

    - Sentinel: a connection also retries its connect, so at most 2 x 2 attempts, each
      asking the Sentinels one after the other until one answers (at most ``t`` each)
      then connecting and reading (``t`` each). A hung master costs ``2 t`` (measured).
    - Cluster: redis-py 8.1 takes only the count from ``retry``: at most 2 attempts, each
      ``t`` plus a slot-map refresh that asks the known nodes one after the other until
      one answers (``t`` each), plus 0.25 s after a ``CLUSTERDOWN``.
    """
    return Retry(NoBackoff(), retries=1)


def _sentinel_query_retry() -> Retry:
    """None: the client already asks the next Sentinel when one fails."""
    return Retry(NoBackoff(), retries=0)


@dataclass
class RedisTarget:
    """The client the store sends commands to, and what it runs on."""

    client: redis.Redis | RedisCluster
    kind: str  # "standalone" | "sentinel" | "cluster"
    address: RedisAddress = field(repr=False)
    sentinel: Sentinel | None = field(default=None, repr=False)
    timeout: float = 5.0
    sentinel_password: str | None = field(default=None, repr=False)

    def on_loop(self) -> Any:
        """A new ``redis.asyncio`` client for the same servers with the same bounds, for
        one event loop (its connections belong to the loop that opens them)."""
        return _async_client(self.address, self.timeout, self.sentinel_password)

    def topology(self) -> dict[str, object]:
        """What the client sees now, without secrets; raises ``redis.RedisError`` when
        the servers cannot be reached."""
        if self.kind == "sentinel":
            return self._sentinel_topology()
        if self.kind == "cluster":
            return self._cluster_topology()
        replication = self.client.info("replication")
        role = str(replication.get("role", "unknown"))
        return {
            "kind": "standalone",
            "address": _standalone_address(cast(redis.Redis, self.client)),
            "role": "replica" if role == "slave" else role,
            "replicas": int(replication.get("connected_slaves", 0)),
        }

    def _sentinel_topology(self) -> dict[str, object]:
        assert self.sentinel is not None and self.address.service is not None
        host, port = self.sentinel.discover_master(self.address.service)
        return {
            "kind": "sentinel",
            "service": self.address.service,
            "master": host_port(host, int(port)),
            "replicas": len(self.sentinel.discover_slaves(self.address.service)),
            "sentinels": len(self.sentinel.sentinels),
        }

    def _cluster_topology(self) -> dict[str, object]:
        # Each node's "flags" is text ("myself,master"), "slots" a list.
        nodes: Iterable[dict[str, Any]] = cast(RedisCluster, self.client).cluster_nodes().values()
        healthy = [node for node in nodes if "fail" not in node["flags"]]
        return {
            "kind": "cluster",
            "masters": sum("master" in n["flags"] and bool(n["slots"]) for n in healthy),
            "replicas": sum("slave" in n["flags"] for n in healthy),
        }

    def close(self) -> None:
        self.client.close()
        if self.sentinel is not None:
            self.sentinel.close()


def redis_target(url: str, timeout: float, sentinel_password: str | None = None) -> RedisTarget:
    """A client for ``url`` whose every wait is bounded by ``timeout`` seconds. A cluster
    client asks its seed nodes for the slot map now; the others connect on first use."""
    address = parse_redis_url(url)
    if address.kind == "sentinel":
        target = _sentinel_target(address, timeout, sentinel_password)
    elif address.kind == "cluster":
        target = _cluster_target(address, timeout)
    else:
        client = redis.Redis.from_url(url, command_packer=_PACKER, **_standalone_kwargs(timeout))
        target = RedisTarget(client, "standalone", address)
    target.timeout, target.sentinel_password = timeout, sentinel_password
    return target


def _standalone_kwargs(timeout: float) -> dict[str, Any]:
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": _HEALTH_CHECK_SECONDS,
        "max_connections": _POOL_SIZE,
    }


def _sentinel_kwargs(
    address: RedisAddress, timeout: float, sentinel_password: str | None, retry: Any
) -> dict[str, Any]:
    """How to ask the Sentinels: bounded, TLS as the URL says, their own password if set."""
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
        **_tls_kwargs(address),
    }
    if sentinel_password is not None:
        kwargs["password"] = sentinel_password
    else:
        kwargs.update(username=address.username, password=address.password)
    return kwargs


def _master_kwargs(address: RedisAddress, timeout: float, retry: Any) -> dict[str, Any]:
    """How to talk to the master a Sentinel names (and to a cluster's nodes, but db)."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
        "max_connections": _POOL_SIZE,
        "username": address.username,
        "password": address.password,
        **_tls_kwargs(address),
    }


def _async_client(address: RedisAddress, timeout: float, sentinel_password: str | None) -> Any:
    """``redis_target``'s client, as a ``redis.asyncio`` one."""
    retry = redis.asyncio.retry.Retry(NoBackoff(), retries=1)
    if address.kind == "sentinel":
        assert address.service is not None
        no_retry = redis.asyncio.retry.Retry(NoBackoff(), retries=0)
        sentinel = redis.asyncio.sentinel.Sentinel(
            list(address.nodes),
            sentinel_kwargs=_sentinel_kwargs(address, timeout, sentinel_password, no_retry),
            health_check_interval=_HEALTH_CHECK_SECONDS,
            db=address.db,
            **_master_kwargs(address, timeout, retry),
        )
        return sentinel.master_for(address.service)
    if address.kind == "cluster":
        nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in address.nodes]
        return redis.asyncio.cluster.RedisCluster(
            startup_nodes=nodes, **_master_kwargs(address, timeout, retry)
        )
    return redis.asyncio.Redis.from_url(address.url, **_standalone_kwargs(timeout))


def _sentinel_target(
    address: RedisAddress, timeout: float, sentinel_password: str | None
) -> RedisTarget:
    assert address.service is not None
    sentinel = Sentinel(
        list(address.nodes),
        sentinel_kwargs=_sentinel_kwargs(
            address, timeout, sentinel_password, _sentinel_query_retry()
        ),
        health_check_interval=_HEALTH_CHECK_SECONDS,
        db=address.db,
        command_packer=_PACKER,
        **_master_kwargs(address, timeout, _command_retry()),
    )
    return RedisTarget(sentinel.master_for(address.service), "sentinel", address, sentinel)


def _cluster_target(address: RedisAddress, timeout: float) -> RedisTarget:
    with _as_redis_errors():  # building it asks the seeds for the slot map
        client = _Cluster(
            startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
            # The nodes' connections take only the keys redis-py lists, not the packer.
            connection_pool_class=partial(redis.ConnectionPool, command_packer=_PACKER),
            **_master_kwargs(address, timeout, _command_retry()),
        )
    return RedisTarget(client, "cluster", address)


@contextmanager
def _as_redis_errors() -> Iterator[None]:
    """redis-py raises ``RedisClusterException``, which is no ``RedisError``, when no node
    answers a slot-map refresh (the whole cluster is down or out of reach) or a node is
    not in cluster mode."""
    try:
        yield
    except RedisClusterException as error:
        raise redis.ConnectionError(str(error)) from error


class _Cluster(RedisCluster):
    """A ``RedisCluster`` whose commands, scripts and pipelines fail only with
    ``redis.RedisError``."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _as_redis_errors():
            return super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = _ClusterPipeline  # the same object; only execute() changes
        return pipe


class _ClusterPipeline(ClusterPipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        with _as_redis_errors():
            return super().execute(raise_on_error)


def _tls_kwargs(address: RedisAddress) -> dict[str, Any]:
    return {"ssl": True, **address.tls_options} if address.tls else {}


def _standalone_address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return host_port(str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)))

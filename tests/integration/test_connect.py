"""``redis_target``: one client per topology, each following its failovers, every failure a
``redis.RedisError``. Sentinel and Cluster run as real processes (tests/support/topologies.py): the
session's shared ones where a test only reads and writes, one of the test's own where it
kills or pauses servers."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
import redis
from redis.sentinel import MasterNotFoundError

from bridge.store.redis.connection import HiredisPacker, RedisTarget, redis_target
from tests.support.harness import free_port, wait_until
from tests.support.topologies import (
    FAST_FAILURE_AFTER_MS,
    Address,
    ClusterSet,
    SentinelSet,
    Standalone,
    StartedAhead,
    tls_files,
)

DATA_PASSWORD = "data-secret"
SENTINEL_PASSWORD = "sentinel-secret"


def _text(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def _follows(target: RedisTarget, key: str, within: float) -> float:
    """Seconds until a write through ``target`` works again (failing the test after
    ``within``); no single attempt may wait longer than 2 s."""
    started = time.monotonic()
    while True:
        attempt = time.monotonic()
        try:
            target.client.set(key, "after")
            return time.monotonic() - started
        except redis.RedisError:
            assert time.monotonic() - attempt < 2
            assert time.monotonic() - started < within, "the client did not follow"
            time.sleep(0.1)


def _raises_redis_error(call: Callable[[], object]) -> None:
    """What the bridge handles (a ``503``) is any ``RedisError``: which one (a refused
    connection, a timeout) depends on how far each node got before it was paused."""
    with pytest.raises(redis.RedisError):
        call()


def own(*kinds: str) -> pytest.MarkDecorator:
    """The test takes an ``own_topology`` of each of these kinds in turn."""
    return pytest.mark.parametrize("own_topology", kinds, indirect=True)


@pytest.fixture(scope="module", autouse=True)
def started_ahead(
    request: pytest.FixtureRequest, workdir: Path
) -> Iterator[dict[str, StartedAhead]]:
    """Every topology the tests below will take as their own, all started in the background
    as the first of them begins: some seconds of setup each, which then overlap."""
    tls = tls_files(workdir)
    makers: dict[str, Callable[[], SentinelSet | ClusterSet]] = {
        "sentinel with passwords": lambda: SentinelSet(
            workdir,
            password=DATA_PASSWORD,
            sentinel_password=SENTINEL_PASSWORD,
            failure_after_ms=FAST_FAILURE_AFTER_MS,
        ),
        "cluster": lambda: ClusterSet(workdir, failure_after_ms=FAST_FAILURE_AFTER_MS),
        # Paused whole, then resumed: fast failure detection could promote a replica on
        # the resume and lose the write the test reads back.
        "cluster, paused": lambda: ClusterSet(workdir),
        "sentinel over TLS": lambda: SentinelSet(workdir, tls=tls),
        "cluster over TLS": lambda: ClusterSet(workdir, tls=tls),
    }
    wanted = Counter(
        item.callspec.params["own_topology"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module and "own_topology" in item.fixturenames
    )
    ahead = {kind: StartedAhead(make, wanted[kind]) for kind, make in makers.items()}
    yield ahead
    for topologies in ahead.values():
        topologies.close()


@pytest.fixture
def own_topology(
    request: pytest.FixtureRequest, started_ahead: dict[str, StartedAhead]
) -> Iterator[SentinelSet | ClusterSet]:
    """A topology of the test's own, of the kind its ``own(...)`` names."""
    with started_ahead[request.param].take() as topology:
        yield topology


def test_every_topology_packs_with_hiredis_directly(redis_topology, monkeypatch):
    """The packer reaches each topology's connections (a cluster's nodes take only the
    keys redis-py lists); the bytes themselves are checked in tests/unit."""
    packed: list[object] = []
    pack = HiredisPacker.pack
    monkeypatch.setattr(
        HiredisPacker, "pack", lambda self, *args: packed.append(args[0]) or pack(self, *args)
    )
    with closing(redis_target(redis_topology.url, 0.5)) as target:
        target.client.set("connect:packed", "1")
        pipe = target.client.pipeline(transaction=False)
        pipe.get("connect:packed")
        assert pipe.execute() == [b"1"]
    assert "SET" in packed and "GET" in packed


def test_standalone(redis_server):
    with closing(redis_target(redis_server.url, 0.5)) as target:
        target.client.set("connect:standalone", "1")
        assert target.topology() == {
            "kind": "standalone",
            "address": f"127.0.0.1:{redis_server.port}",
            "role": "master",
            "replicas": 0,
        }


def test_standalone_down_is_a_redis_error(workdir):
    server = Standalone(workdir)
    with closing(redis_target(server.url, 0.2)) as target:
        server.stop()
        started = time.monotonic()
        with pytest.raises(redis.RedisError):
            target.topology()
        assert time.monotonic() - started < 5


@own("sentinel with passwords")
def test_sentinel_follows_a_failover(own_topology):
    topology = own_topology
    [replica] = topology.replica_addresses()
    with closing(redis_target(topology.url, 0.5, SENTINEL_PASSWORD)) as target:
        save = target.client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
        save(keys=["connect:sentinel"], args=["before"])
        assert target.topology() == {
            "kind": "sentinel",
            "service": topology.service,
            "master": _text(topology.master_address()),
            "replicas": 1,
            "sentinels": 3,
        }
        topology.kill_master()
        _follows(target, "connect:sentinel", within=8)
        assert save(keys=["connect:sentinel"], args=["again"]) == b"OK"  # loaded anew
        assert target.topology()["master"] == _text(replica)


@own("sentinel with passwords")
def test_sentinels_get_the_urls_password_unless_told_otherwise(own_topology):
    with closing(redis_target(own_topology.url, 0.5)) as target:
        with pytest.raises(MasterNotFoundError) as caught:  # every Sentinel refused it
            target.client.ping()
        assert DATA_PASSWORD not in str(caught.value)
    with closing(redis_target(own_topology.url, 0.5, SENTINEL_PASSWORD)) as target:
        assert target.client.ping()


def test_cluster_runs_scripts_and_pipelines(cluster_set):
    with closing(redis_target(cluster_set.url, 0.2)) as target:
        save = target.client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
        assert save(keys=["connect:{a}"], args=["1"]) == b"OK"
        pipe = target.client.pipeline(transaction=False)
        pipe.get("connect:{a}")
        pipe.get("connect:{b}")
        assert pipe.execute() == [b"1", None]
        whole = {"kind": "cluster", "masters": 3, "replicas": 3}
        # A busy machine can delay the client's first full view of the nodes.
        wait_until(lambda: target.topology() == whole, 5, "the whole cluster")


@own("cluster, paused")
def test_cluster_out_of_reach_is_a_redis_error(own_topology):
    """redis-py says so with RedisClusterException, which is no RedisError."""
    nodes = own_topology.nodes.values()
    with closing(redis_target(own_topology.url, 0.2)) as target:
        client = target.client
        client.set("connect:{c}", "1")
        for node in nodes:
            node.pause()
        try:
            _raises_redis_error(lambda: client.get("connect:{c}"))
            _raises_redis_error(target.topology)
            pipe = client.pipeline(transaction=False)
            pipe.get("connect:{c}")
            _raises_redis_error(pipe.execute)
        finally:
            for node in nodes:
                node.resume()
        wait_until(lambda: client.get("connect:{c}") == b"1", 5, "the cluster back")


def test_cluster_down_at_start_is_a_redis_error():
    with pytest.raises(redis.ConnectionError):
        redis_target(f"redis+cluster://127.0.0.1:{free_port()}", 0.2)


@own("cluster")
def test_cluster_follows_a_failover(own_topology):
    key = "connect:{failover}"
    with closing(redis_target(own_topology.url, 0.2)) as target:
        client = target.client
        client.set(key, "before")
        killed = own_topology.kill_master_for_key(key)
        _follows(target, key, within=8)
        node = client.get_node_from_key(key)
        assert (node.host, node.port) != killed
        after = {"kind": "cluster", "masters": 3, "replicas": 2}
        wait_until(lambda: target.topology() == after, 5, "the cluster without it")


@own("sentinel over TLS", "cluster over TLS")
def test_tls_reaches_sentinels_master_and_cluster_nodes(own_topology):
    with closing(redis_target(own_topology.url, 0.5)) as target:
        target.client.ping()
        assert target.topology()["kind"] == own_topology.kind
    with pytest.raises(redis.ConnectionError):  # the server's certificate is unknown
        redis_target(own_topology.url.partition("?")[0], 0.5).client.ping()

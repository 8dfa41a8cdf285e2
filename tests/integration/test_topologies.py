"""The Redis topologies the other tests run on, checked with plain redis-py: each starts
settled, answers at the hosts its URL names (over TLS too), replicates, and fails over
the way the failover tests count on. Failover times are printed, not bounded tightly."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from tests.support.topologies import (
    FAST_FAILURE_AFTER_MS,
    ClusterSet,
    SentinelSet,
    Standalone,
    TlsFiles,
    tls_files,
)

FAILOVER_BOUND_S = 15


def parts_of(url: str) -> tuple[str, list[tuple[str, int]], str, str]:
    """Scheme, hosts, path and query of a URL of any of the three shapes."""
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    hosts, _, path = rest.partition("/")
    nodes = [(host, int(port)) for host, _, port in (n.rpartition(":") for n in hosts.split(","))]
    return scheme, nodes, path, query


def client_for(url: str) -> redis.Redis | RedisCluster:
    """A client for a URL of any of the three shapes, with redis-py alone."""
    scheme, nodes, path, query = parts_of(url)
    tls = {"ssl": True, **dict(parse_qsl(query))} if scheme.startswith("rediss") else {}
    if scheme.endswith("+sentinel"):
        service, _, db = path.partition("/")
        sentinel = Sentinel(nodes, sentinel_kwargs=tls, socket_timeout=2, **tls)
        return sentinel.master_for(service, db=int(db or 0), decode_responses=True)
    if scheme.endswith("+cluster"):
        return RedisCluster(
            startup_nodes=[ClusterNode(*n) for n in nodes], decode_responses=True, **tls
        )
    return redis.Redis.from_url(url, decode_responses=True)


def stopped(topology: Standalone | SentinelSet | ClusterSet) -> bool:
    if isinstance(topology, Standalone):
        nodes = [topology.node]
    elif isinstance(topology, SentinelSet):
        nodes = [*topology.sentinels, *topology.servers.values()]
    else:
        nodes = list(topology.nodes.values())
    return not any(node.running for node in nodes)


@pytest.fixture(scope="module")
def tls(workdir: Path) -> TlsFiles:
    return tls_files(workdir)


def test_each_topology_takes_writes_at_its_url(redis_topology):
    client = client_for(redis_topology.url)
    key = f"topology:{redis_topology.kind}"
    client.set(key, "written", ex=60)
    assert client.get(key) == "written"
    client.close()


def test_a_write_on_the_sentinel_master_reaches_the_replica(sentinel_set):
    master = sentinel_set.client()
    master.set("replicated", "yes", ex=60)
    assert master.wait(1, 2000) == 1
    [replica] = sentinel_set.replica_addresses()
    assert sentinel_set.servers[replica].client().get("replicated") == "yes"
    assert sentinel_set.sentinel_client().discover_slaves(sentinel_set.service) == [replica]


def test_the_sentinels_promote_the_replica_when_the_master_dies(workdir):
    topology = SentinelSet(workdir, appendonly=True, failure_after_ms=FAST_FAILURE_AFTER_MS)
    try:
        client = Sentinel([s.address for s in topology.sentinels], socket_timeout=2).master_for(
            topology.service, decode_responses=True
        )
        client.set("before", "1")
        assert client.wait(1, 2000) == 1
        [replica] = topology.replica_addresses()

        killed_at = time.monotonic()
        old = topology.kill_master()
        new = topology.wait_for_new_master(old, FAILOVER_BOUND_S)
        promoted_in = time.monotonic() - killed_at
        client.set("after", "2")
        writable_in = time.monotonic() - killed_at
        print(f"\nsentinel: promoted in {promoted_in:.2f} s, writable in {writable_in:.2f} s")
        assert new == replica
        assert client.get("before") == "1"

        restarted_at = time.monotonic()
        topology.restart(old)
        print(f"sentinel: old master back as a replica in {time.monotonic() - restarted_at:.2f} s")
        assert topology.replica_addresses() == [old]
        assert topology.servers[old].client().get("after") == "2"
    finally:
        topology.stop()
    assert stopped(topology)


def test_cluster_keys_of_different_slots_land_on_different_masters(cluster_set):
    keys = [f"spread:{n}" for n in range(30)]
    client = cluster_set.client()
    for key in keys:
        client.set(key, key, ex=60)
    masters = {key: cluster_set.master_for_key(key) for key in keys}
    assert set(masters.values()) == set(cluster_set.masters())
    assert len(cluster_set.masters()) == 3
    for key, master in masters.items():
        assert cluster_set.nodes[master].client().get(key) == key  # no MOVED: it is there
    client.close()


def test_cluster_failover_swaps_master_and_replica(workdir):
    topology = ClusterSet(workdir, failure_after_ms=FAST_FAILURE_AFTER_MS)
    try:
        topology.client().set("swapped", "1")
        master = topology.master_for_key("swapped")
        replica = topology.replica_of(master)
        started = time.monotonic()
        topology.failover(replica)
        print(f"\ncluster: CLUSTER FAILOVER settled in {time.monotonic() - started:.2f} s")
        assert topology.master_for_key("swapped") == replica
        assert topology.replica_of(replica) == master
        assert topology.nodes[replica].client().get("swapped") == "1"
    finally:
        topology.stop()
    assert stopped(topology)


def test_cluster_replica_takes_over_a_killed_master(workdir):
    topology = ClusterSet(workdir, appendonly=True, failure_after_ms=FAST_FAILURE_AFTER_MS)
    try:
        client = topology.client()
        client.set("survives", "1")
        master = topology.master_for_key("survives")
        replica = topology.replica_of(master)
        assert topology.nodes[master].client().wait(1, 2000) == 1

        killed_at = time.monotonic()
        assert topology.kill_master_for_key("survives") == master
        topology.wait_ok(FAILOVER_BOUND_S)
        print(f"\ncluster: replica took over in {time.monotonic() - killed_at:.2f} s")
        assert topology.master_for_key("survives") == replica
        client.set("after", "2")
        assert client.get("survives") == "1"

        topology.restart(master)
        assert topology.replica_of(replica) == master
    finally:
        topology.stop()
    assert stopped(topology)


@pytest.mark.parametrize("kind", ["standalone", "sentinel", "cluster"])
def test_each_topology_over_tls(kind, workdir, tls):
    started = time.monotonic()
    topology = {"standalone": Standalone, "sentinel": SentinelSet, "cluster": ClusterSet}[kind](
        workdir, tls=tls
    )
    try:
        print(f"\n{kind} over TLS: up in {time.monotonic() - started:.2f} s")
        assert topology.url.startswith(("rediss://", f"rediss+{kind}://"))
        client = client_for(topology.url)  # the CA alone: no client certificate
        client.set("over-tls", "1")
        assert client.get("over-tls") == "1"

        with_cert = tls.client_kwargs(with_client_cert=True)
        if kind == "sentinel":
            sentinels = [s.address for s in topology.sentinels]
            sentinel = Sentinel(sentinels, sentinel_kwargs=with_cert, **with_cert)
            assert sentinel.master_for(topology.service).get("over-tls") == b"1"
            assert client.wait(1, 2000) == 1  # the replica syncs over TLS too
        elif kind == "cluster":
            nodes = [ClusterNode(*a) for a in topology.nodes]
            assert RedisCluster(startup_nodes=nodes, **with_cert).get("over-tls") == b"1"
        else:
            assert redis.Redis(port=topology.node.port, **with_cert).get("over-tls") == b"1"

        _, [(host, port), *_], _, _ = parts_of(topology.url)
        plain = redis.Redis(host, port, socket_timeout=2, retry=Retry(NoBackoff(), retries=0))
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # no plain text on a TLS port
    finally:
        topology.stop()
    assert stopped(topology)

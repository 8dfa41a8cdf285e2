"""What ``kratos-bridge check`` prints about the store: where it is, never a password."""

from __future__ import annotations

import pytest

from bridge.cli import _store_label, _topology_label
from bridge.config import load_settings


@pytest.mark.parametrize(
    ("url", "label"),
    [
        (None, "embedded (in-process, single process only)"),
        ("redis://:pw@redis:6379/2", "redis redis://redis:6379/2"),
        ("rediss://user:pw@[::1]", "redis rediss://[::1]:6379"),
        ("unix:///run/redis.sock?db=1", "redis unix:///run/redis.sock"),
        (
            "redis+sentinel://:pw@s1,[fd00::2]:26380/mymaster",
            "redis redis+sentinel://s1:26379,[fd00::2]:26380/mymaster/0",
        ),
        (
            "rediss+cluster://user:pw@n1:7000,n2?ssl_cert_reqs=none",
            "redis rediss+cluster://n1:7000,n2:6379",
        ),
    ],
)
def test_store_label_hides_user_and_password(url, label):
    env = {"BRIDGE_SECRET": "s" * 40} | ({"BRIDGE_REDIS_URL": url} if url else {})
    assert _store_label(load_settings(env)) == label


@pytest.mark.parametrize(
    ("topology", "line"),
    [
        (
            {"kind": "standalone", "address": "redis:6379", "role": "master", "replicas": 1},
            "standalone redis:6379 (master, 1 replica)",
        ),
        (
            {
                "kind": "sentinel",
                "service": "mymaster",
                "master": "10.0.0.5:6379",
                "replicas": 2,
                "sentinels": 3,
            },
            "sentinel service mymaster: master 10.0.0.5:6379, 2 replicas, 3 sentinels configured",
        ),
        ({"kind": "cluster", "masters": 3, "replicas": 3}, "cluster: 3 masters, 3 replicas"),
        ({"kind": "embedded"}, "embedded (this process only)"),
        ({"kind": "new", "nodes": 2}, "kind new, nodes 2"),
    ],
)
def test_topology_line(topology, line):
    assert _topology_label(topology) == line

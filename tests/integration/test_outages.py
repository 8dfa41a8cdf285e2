"""Kratos or Redis down: 503, never an allow for the unknown, and a few log lines."""

from __future__ import annotations

import functools
import logging

from bridge.store.redis.connection import redis_target
from bridge.web.app import create_app
from tests.conftest import admin_of, bridge_settings
from tests.support import kratos_flows as flows
from tests.support.harness import RedisServer, free_port, wait_until

_STORE_DOWN = {
    "error": "store_unavailable",
    "message": "Redis: ConnectionError",
}


def _status(client, path, user=None):
    headers = {"X-Session-Token": user.token} if user else {}
    response = client.get(path, headers=headers)
    assert "X-User-Id" not in response.headers or response.status_code == 200
    return response.status_code, (response.get_json() or {})


def _known_fresh_session_answers_nothing_else_does(client, known, never_seen, error):
    """The one thing still allowed in an outage: a credential validated within
    revalidate_after, from the process's own fresh copy."""
    assert _status(client, "/auth", known)[0] == 200
    status, body = _status(client, "/auth", never_seen)
    assert (status, body["error"]) == (503, error)


def test_kratos_stopped_mid_test(make_client, own_kratos):
    # Long enough that stopping Kratos (its graceful shutdown, on a busy machine) ends
    # well inside the known session's freshness; polled for its end, not slept past.
    client = make_client(own_kratos, BRIDGE_REVALIDATE_AFTER="3", BRIDGE_KRATOS_TIMEOUT="0.5")
    known, never_seen = flows.register(own_kratos), flows.register(own_kratos)
    assert _status(client, "/auth", known)[0] == 200
    assert _status(client, "/health/ready")[0] == 200

    own_kratos.stop()
    _known_fresh_session_answers_nothing_else_does(client, known, never_seen, "kratos_unavailable")
    # Once the copy is stale, Kratos cannot confirm it: 503, never the stale copy.
    wait_until(lambda: _status(client, "/auth", known)[0] == 503, 10, "the known session's 503")
    assert _status(client, "/whoami", known)[0] == 503
    status, body = _status(admin_of(client), "/health/ready")
    assert (status, set(body["errors"])) == (503, {"kratos"})


def test_redis_failures_are_logged_few_times_without_credentials(kratos, workdir, prefix, caplog):
    redis_server = RedisServer(workdir)
    client = create_app(bridge_settings(kratos, redis_server.url, prefix)).test_client(
        use_cookies=False
    )
    users = [flows.register(kratos) for _ in range(3)]
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger="bridge")
    for _ in range(10):
        for user in users:
            assert _status(client, "/auth", user) == (503, _STORE_DOWN)
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.store.redis"]
    assert 1 <= len(lines) <= 2, lines  # one at once, then at most one per interval
    assert "redis" in lines[0] and "ConnectionError" in lines[0]
    assert not any(user.token in line for line in caplog.text.splitlines() for user in users)


def test_redis_stopped_is_503_and_not_ready(kratos, workdir, prefix):
    redis_server = RedisServer(workdir)
    client = create_app(bridge_settings(kratos, redis_server.url, prefix)).test_client(
        use_cookies=False
    )
    known, never_seen = flows.register(kratos), flows.register(kratos)
    assert _status(client, "/auth", known)[0] == 200

    redis_server.stop()
    _known_fresh_session_answers_nothing_else_does(client, known, never_seen, "store_unavailable")
    assert _status(client, "/whoami", known)[0] == 503  # app data lives in Redis
    status, body = _status(admin_of(client), "/health/ready")
    assert (status, set(body["errors"])) == (503, {"redis"})


def test_a_cluster_down_at_start_answers_503_then_serves_when_it_is_up(kratos, cluster_set, prefix):
    """A cluster client asks its seed nodes when it is built: none answering must not stop
    the bridge from starting, and must not allow anything until one does."""
    down = f"redis+cluster://127.0.0.1:{free_port()}"
    settings = bridge_settings(kratos, down, prefix, BRIDGE_REDIS_TIMEOUT="0.2")
    bridge = create_app(settings).extensions["bridge"]
    client = create_app(settings, bridge.store).test_client()
    user = flows.register(kratos)
    assert _status(client, "/auth", user) == (503, _STORE_DOWN)
    status, body = _status(admin_of(client), "/health/ready")
    assert (status, set(body["errors"])) == (503, {"redis"})

    # The same store, now given seeds that answer (as if the cluster had come up).
    bridge.store._new_target = functools.partial(redis_target, cluster_set.url, 0.5)
    assert _status(client, "/auth", user)[0] == 200
    assert _status(admin_of(client), "/health/ready")[1]["redis"]["kind"] == "cluster"

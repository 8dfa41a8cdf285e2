"""Kratos or Redis down, or Kratos answering garbage: 503, never an allow for the unknown."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bridge.app import create_app
from tests import kratos_flows as flows
from tests.conftest import bridge_settings
from tests.harness import Kratos, RedisServer


@pytest.fixture
def own_kratos(workdir):
    server = Kratos(workdir)
    yield server
    server.stop()


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
    client = make_client(own_kratos, BRIDGE_REVALIDATE_AFTER="1", BRIDGE_KRATOS_TIMEOUT="0.5")
    known, never_seen = flows.register(own_kratos), flows.register(own_kratos)
    assert _status(client, "/auth", known)[0] == 200
    assert _status(client, "/health/ready")[0] == 200

    own_kratos.stop()
    _known_fresh_session_answers_nothing_else_does(client, known, never_seen, "kratos_unavailable")
    time.sleep(1.1)  # the copy is stale now and Kratos cannot confirm it
    assert _status(client, "/auth", known)[0] == 503
    assert _status(client, "/whoami", known)[0] == 503
    status, body = _status(client, "/health/ready")
    assert (status, set(body["errors"])) == (503, {"kratos"})


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
    status, body = _status(client, "/health/ready")
    assert (status, set(body["errors"])) == (503, {"redis"})


class _GarbageKratos(BaseHTTPRequestHandler):
    """FAKE Kratos, named as such: a real Kratos cannot be made to answer 200 with junk."""

    bodies = (
        b"not json",
        b"[]",
        json.dumps({"id": "s"}).encode(),
        json.dumps(
            {
                "id": "s",
                "active": True,
                "identity": {"id": "i"},
                "authenticator_assurance_level": "aal9",
                "expires_at": "2099-01-01T00:00:00Z",
            }
        ).encode(),
        json.dumps(
            {
                "id": "s",
                "active": False,
                "identity": {"id": "i"},
                "authenticator_assurance_level": "aal1",
                "expires_at": "2099-01-01T00:00:00Z",
            }
        ).encode(),
    )
    served = 0

    def do_GET(self):
        body = self.bodies[_GarbageKratos.served % len(self.bodies)]
        _GarbageKratos.served += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_kratos_answering_garbage_is_503(redis_server, prefix):
    fake = ThreadingHTTPServer(("127.0.0.1", 0), _GarbageKratos)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{fake.server_port}"

        class FakeKratos:
            public_url = admin_url = url

        client = create_app(bridge_settings(FakeKratos, redis_server.url, prefix)).test_client(
            use_cookies=False
        )
        for i in range(len(_GarbageKratos.bodies)):
            token = f"ory_st_{i:032d}"
            response = client.get("/auth", headers={"X-Session-Token": token})
            assert response.status_code == 503, i
            assert "X-User-Id" not in response.headers
    finally:
        fake.shutdown()

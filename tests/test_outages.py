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


def test_kratos_stopped_mid_test(make_client, own_kratos):
    client = make_client(own_kratos, BRIDGE_REVALIDATE_AFTER="1", BRIDGE_KRATOS_TIMEOUT="0.5")
    known = flows.register(own_kratos)
    never_seen = flows.register(own_kratos)
    assert client.get("/auth", headers={"X-Session-Token": known.token}).status_code == 200
    assert client.get("/health/ready").status_code == 200

    own_kratos.stop()
    # Still inside revalidate_after: the mirror is trustworthy and answers.
    assert client.get("/auth", headers={"X-Session-Token": known.token}).status_code == 200
    response = client.get("/auth", headers={"X-Session-Token": never_seen.token})
    assert response.status_code == 503
    assert response.get_json()["error"] == "kratos_unavailable"
    assert "X-User-Id" not in response.headers

    time.sleep(1.1)  # the mirror is stale now and Kratos cannot confirm it
    response = client.get("/auth", headers={"X-Session-Token": known.token})
    assert response.status_code == 503
    assert client.get("/whoami", headers={"X-Session-Token": known.token}).status_code == 503

    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert set(ready.get_json()["errors"]) == {"kratos"}


def test_redis_stopped_is_503_and_not_ready(kratos, workdir, prefix):
    redis_server = RedisServer(workdir)
    client = create_app(bridge_settings(kratos, redis_server.url, prefix)).test_client(
        use_cookies=False
    )
    known = flows.register(kratos)
    never_seen = flows.register(kratos)
    assert client.get("/auth", headers={"X-Session-Token": known.token}).status_code == 200
    redis_server.stop()

    # The process's own fresh copy still answers inside revalidate_after ...
    assert client.get("/auth", headers={"X-Session-Token": known.token}).status_code == 200
    # ... but nothing else can be decided without the store.
    response = client.get("/auth", headers={"X-Session-Token": never_seen.token})
    assert response.status_code == 503
    assert response.get_json()["error"] == "store_unavailable"
    assert "X-User-Id" not in response.headers
    whoami = client.get("/whoami", headers={"X-Session-Token": known.token})
    assert whoami.status_code == 503
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert set(ready.get_json()["errors"]) == {"redis"}


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

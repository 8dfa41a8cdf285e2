"""An unexpected error is answered 500 with no traceback and logged by the request's method
and the pattern of the route it matched, never its path or query: a path may hold a
token (a recovery link's, a session id), which the decision log leaves out too.

Nothing real fails on demand, so each test breaks one internal in-process
(``monkeypatch``), only to produce the error; the rest is the real bridge on the real
Redis and Kratos."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from bridge.admin.api import create_admin_app
from bridge.admin.sessions import SessionAdmin
from bridge.logs import JsonFormatter
from bridge.web.app import create_flask_app
from bridge.web.asgi import Front
from bridge.web.hooks import HOOK_KEY_HEADER, KratosHooks
from bridge.wiring import build_bridge
from tests.conftest import bridge_settings

HOOK_SECRET = "hook-secret-for-tests-" + "h" * 20
SECRET_TOKEN = "recovery-token-" + "s" * 24


def _break(*_: object, **__: object) -> None:
    raise RuntimeError("a stand-in for a bug")  # says nothing of the request


def _logged(caplog: pytest.LogCaptureFixture) -> tuple[logging.LogRecord, str]:
    """The one unexpected-error record, and all that a JSON log line would show of it."""
    records = [r for r in caplog.records if r.getMessage().startswith("unexpected error")]
    assert len(records) == 1
    return records[0], JsonFormatter().format(records[0])


@pytest.fixture
def bridge(kratos, redis_server, prefix):
    settings = bridge_settings(kratos, redis_server.url, prefix, BRIDGE_HOOK_SECRET=HOOK_SECRET)
    built = build_bridge(settings)
    yield built
    built.close()


def test_a_public_route_logs_its_pattern_not_its_path(bridge, monkeypatch, caplog):
    monkeypatch.setattr(KratosHooks, "handle", _break)
    client = create_flask_app(bridge).test_client(use_cookies=False)
    answer = client.post(
        f"/hooks/kratos/registration?token={SECRET_TOKEN}",
        headers={HOOK_KEY_HEADER: HOOK_SECRET},
        json={},
    )
    assert answer.status_code == 500
    assert b"Traceback" not in answer.data
    record, line = _logged(caplog)
    assert record.getMessage() == "unexpected error on POST /hooks/kratos/<flow>"
    assert "/hooks/kratos/registration" not in line
    assert SECRET_TOKEN not in line
    assert "a stand-in for a bug" in line  # the traceback is still logged


def test_an_admin_route_logs_its_pattern_not_the_session_id(bridge, monkeypatch, caplog):
    monkeypatch.setattr(SessionAdmin, "show", _break)
    client = create_admin_app(bridge).test_client(use_cookies=False)
    session_id = str(uuid.uuid4())
    answer = client.get(f"/admin/sessions/{session_id}")
    assert answer.status_code == 500
    assert b"Traceback" not in answer.data
    record, line = _logged(caplog)
    assert record.getMessage() == "unexpected error on GET /admin/sessions/<session_id>"
    assert session_id not in line


def _ask(front: Front, path: str) -> list[dict]:
    """One request through the ASGI front, as Granian hands it over."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"app.test"), (b"x-forwarded-proto", b"https")],
        "client": ("127.0.0.1", 40000),
    }
    asyncio.run(front(scope, receive, send))
    return sent


def test_a_forward_auth_route_logs_its_pattern_not_the_apps_path(bridge, monkeypatch, caplog):
    """Envoy's check request carries the app's path after ``/ext-authz``: a reset link's."""
    front = Front(bridge, create_flask_app(bridge))
    monkeypatch.setattr(bridge.forward_auth, "begin", _break)
    start, body = _ask(front, f"/ext-authz/reset/{SECRET_TOKEN}")
    assert start["status"] == 500
    assert b"Traceback" not in body["body"]
    record, line = _logged(caplog)
    assert record.getMessage() == "unexpected error on GET /ext-authz/<path>"
    assert SECRET_TOKEN not in line
    assert "/reset/" not in line

"""One JSON log line per decision (BRIDGE_LOG_DECISIONS, BRIDGE_LOG_FORMAT=json), from a
real bridge process with real Kratos and Redis: the fields operators need, and never a
credential."""

from __future__ import annotations

import httpx
import orjson

from bridge.observe.decision_log import outcome
from bridge.web.responses import Reply
from tests.conftest import SECRET
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, wait_until


def _decisions(bridge: BridgeServer) -> list[dict]:
    lines = []
    for line in bridge.log().splitlines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            if entry.get("logger") == "bridge.decisions":
                lines.append(entry)
    return lines


def test_the_decision_is_the_reply_s_code_whatever_its_body():
    assert outcome(Reply(200, ())) == "allow"
    assert outcome(Reply(401, (), b"<p>no</p>", "session_missing")) == "session_missing"
    assert outcome(Reply(401, (), b'{"error": "session_missing"}')) == "refused"  # no code


def test_each_decision_is_one_json_line_without_credentials(kratos, redis_server, workdir):
    bridge = BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": "decision-log:",
            "BRIDGE_WORKERS": "1",
            "BRIDGE_LOG_DECISIONS": "true",
            "BRIDGE_LOG_FORMAT": "json",
        },
        workdir,
    )
    try:
        user = flows.register(kratos)
        cookie = flows.browser_login(kratos, user)
        token = {"X-Session-Token": user.token, "X-Request-Id": "req-1"}
        assert httpx.get(bridge.url + "/auth", headers=token).status_code == 200
        assert httpx.get(bridge.url + "/auth", headers=token).status_code == 200
        by_cookie = {"Cookie": f"ory_kratos_session={cookie}"}
        assert httpx.get(bridge.url + "/auth", headers=by_cookie).status_code == 200
        assert httpx.get(bridge.url + "/auth", headers={"X-Request-Id": "req-3"}).status_code == 401
        odd = {"X-Session-Token": user.token, "X-Request-Id": "not one id" + "x" * 200}
        assert httpx.get(bridge.url + "/auth", headers=odd).status_code == 200
        wait_until(lambda: len(_decisions(bridge)) >= 5, 5, "five decision lines")
        first, second, third, fourth, fifth = _decisions(bridge)[:5]
        assert (first["decision"], first["status"], first["tier"]) == ("allow", 200, "kratos")
        assert (second["tier"], second["request_id"]) == ("process", "req-1")
        assert first["identity_id"] == user.identity_id == third["identity_id"]
        assert first["session_id"] == second["session_id"]
        assert first["rule"] == "default" and first["dialect"] == "nginx"
        assert isinstance(first["latency_ms"], float)
        assert (fourth["decision"], fourth["status"], fourth["request_id"]) == (
            "session_missing",
            401,
            "req-3",
        )
        assert fourth["identity_id"] is None
        assert fifth["request_id"] is None  # not a plain id: left out, not logged as sent
        log = bridge.log()
        assert user.token not in log
        assert cookie not in log
    finally:
        bridge.stop()

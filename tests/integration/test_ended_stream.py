"""The ended stream on real bridge processes, a real Redis and a real Kratos: each way a
session ends (revoked by an operator, signed out, refused by Kratos, expired) gives
exactly one event, also when two bridges of two processes each see it; and the demo's
server-sent event stream closes within a second of a revocation from the admin API."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bridge.clock import now_ms, parse_timestamp_ms
from tests.conftest import bridge_env
from tests.support import kratos_flows as flows
from tests.support.harness import (
    BridgeServer,
    Kratos,
    RedisServer,
    free_port,
    start_demo,
    stop_process,
    wait_until,
)
from tests.support.harness import token_status as auth

TOKEN = "admin-token-for-tests-" + "e" * 20
SHARED_SECRET = "demo-shared-secret-" + "s" * 16


@pytest.fixture
def two_bridges(
    redis_server: RedisServer, workdir: Path
) -> Iterator[Callable[..., tuple[list[BridgeServer], str]]]:
    """Two bridges of two processes each on one Redis prefix, asking Kratos again after 1 s."""
    started: list[BridgeServer] = []

    def start(kratos: Kratos, **env: str) -> tuple[list[BridgeServer], str]:
        prefix = f"ended{uuid.uuid4().hex[:8]}:"
        values = bridge_env(
            kratos,
            redis_server.url,
            prefix,
            **{
                "BRIDGE_ADMIN_TOKEN": TOKEN,
                "BRIDGE_REVALIDATE_AFTER": "1",
                "BRIDGE_WORKERS": "2",
                **env,  # a test's own settings win
            },
        )
        pair = [BridgeServer(values, workdir) for _ in range(2)]
        started.extend(pair)
        return pair, prefix

    yield start
    for server in started:
        server.stop()


def warm(bridges: list[BridgeServer], token: str) -> None:
    for bridge in bridges:
        for _ in range(6):  # both worker processes of each bridge, most likely
            assert auth(bridge, token) == 200


def refused_everywhere(bridges: list[BridgeServer], token: str) -> None:
    """Until every bridge refuses the token, then a few more asks of each, all at once."""
    for bridge in bridges:
        wait_until(lambda b=bridge: auth(b, token) == 401, 10, "the end seen by the bridge")
    with_each = [threading.Thread(target=auth, args=(b, token)) for b in bridges * 4]
    for thread in with_each:
        thread.start()
    for thread in with_each:
        thread.join()


def ended(redis_server: RedisServer, prefix: str) -> list[dict[str, str]]:
    entries = redis_server.client.xrange(prefix + "events:ended")
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def events_of(redis_server: RedisServer, prefix: str, session_id: str) -> list[dict[str, str]]:
    time.sleep(0.5)  # a second event, if there were one, would be in by now
    return [e for e in ended(redis_server, prefix) if e["session_id"] == session_id]


def session_id(kratos: Kratos, token: str) -> str:
    return flows.session_of(kratos, token=token).json()["id"]


def test_each_way_a_session_ends_gives_exactly_one_event(
    kratos: Kratos, redis_server: RedisServer, two_bridges
) -> None:
    bridges, prefix = two_bridges(kratos)
    users = {way: flows.register(kratos, way) for way in ("revoked", "out", "rejected")}
    tokens = {way: flows.login_api(kratos, user) for way, user in users.items()}
    sids = {way: session_id(kratos, token) for way, token in tokens.items()}
    for token in tokens.values():
        warm(bridges, token)

    revoke = httpx.delete(
        f"{bridges[0].admin_url}/admin/sessions/{sids['revoked']}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert revoke.status_code in (200, 204), revoke.text
    out = httpx.post(bridges[1].url + "/.bridge/logout", headers={"X-Session-Token": tokens["out"]})
    assert out.status_code == 204, out.text
    # Revoked in Kratos behind the bridge's back: each process learns it from a 401.
    gone = httpx.delete(f"{kratos.admin_url}/admin/sessions/{sids['rejected']}")
    assert gone.status_code == 204
    for token in tokens.values():
        refused_everywhere(bridges, token)

    expected = {"revoked": ("revoked", "admin"), "out": ("logged_out", "user")}
    expected["rejected"] = ("rejected", "kratos")
    for way, (reason, by) in expected.items():
        events = events_of(redis_server, prefix, sids[way])
        assert len(events) == 1, (way, events)
        assert (events[0]["reason"], events[0]["by"]) == (reason, by)
        assert events[0]["identity_id"] == users[way].identity_id
        assert events[0]["at"].endswith("Z")
    assert len(ended(redis_server, prefix)) == 3


def test_an_expired_session_seen_by_both_bridges_gives_one_event(
    redis_server: RedisServer, workdir: Path, two_bridges
) -> None:
    short = Kratos(workdir, lifespan="5s")
    try:
        bridges, prefix = two_bridges(short, BRIDGE_WORKERS="1")
        user = flows.register(short, "expiring")
        found = flows.session_of(short, token=user.token).json()
        sid, expires_at_ms = found["id"], parse_timestamp_ms(found["expires_at"])
        warm(bridges, user.token)
        time.sleep(max(0, expires_at_ms - now_ms()) / 1000 + 0.3)
        refused_everywhere(bridges, user.token)
        events = events_of(redis_server, prefix, sid)
    finally:
        short.stop()
    assert [(e["reason"], e["by"], e["identity_id"]) for e in events] == [
        ("expired", "kratos", user.identity_id)
    ]


@pytest.fixture
def demo(redis_server: RedisServer, workdir: Path) -> Iterator[Callable[[str], str]]:
    """The demo app (compose/demo/app.py) on the bridge's Redis, trusting the proxy's
    shared secret; returns its URL for a key prefix."""
    running: list[subprocess.Popen] = []

    def start(prefix: str) -> str:
        port = free_port()
        process = start_demo(
            port,
            {
                "KRATOS_SESSION_REDIS_URL": redis_server.url,
                "KRATOS_SESSION_KEY_PREFIX": prefix,
                "KRATOS_SESSION_TRUST": "header",
                "KRATOS_SESSION_SHARED_SECRET": SHARED_SECRET,
            },
            workdir / "ended-demo.log",
        )
        running.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/healthz").status_code == 200, 15, "demo")
        return url

    yield start
    for process in running:
        stop_process(process)


def test_the_demos_live_stream_closes_within_a_second_of_a_revocation(
    kratos: Kratos, two_bridges, demo
) -> None:
    bridges, prefix = two_bridges(kratos)
    demo_url = demo(prefix)
    user = flows.register(kratos, "live")
    warm(bridges, user.token)
    sid = session_id(kratos, user.token)
    hand_off = {"X-Bridge-Secret": SHARED_SECRET, "X-Session-Id": sid}

    lines: list[str] = []
    opened, closed = threading.Event(), threading.Event()

    def listen() -> None:
        with httpx.stream("GET", demo_url + "/live", headers=hand_off, timeout=30) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                lines.append(line)
                if line.startswith("data: tick"):
                    opened.set()
        closed.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert opened.wait(10), lines
    began = time.monotonic()
    revoke = httpx.delete(
        f"{bridges[0].admin_url}/admin/sessions/{sid}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert revoke.status_code in (200, 204), revoke.text
    assert closed.wait(5), "the stream outlived the session"
    took = time.monotonic() - began
    print(f"\nthe demo's /live stream closed {took * 1000:.0f} ms after the revocation")
    assert "event: ended" in lines
    # An ended session opens no new stream.
    refused = httpx.get(demo_url + "/live", headers=hand_off)
    assert refused.status_code == 401

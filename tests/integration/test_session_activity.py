"""Sliding sessions and the idle timeout against the real Kratos: a session used in
Kratos's extend window is extended once, however many bridges see it; one unused for
longer than the idle timeout is refused everywhere and revoked in Kratos."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bridge.clock import parse_timestamp_ms
from bridge.web.app import create_app
from tests.conftest import bridge_settings, store_of
from tests.support import kratos_flows as flows
from tests.support.harness import Kratos, wait_until

LIFESPAN = 60  # seconds: Kratos's session.lifespan here
WINDOW = 50  # Kratos's session.earliest_possible_extend: extendable in the last 50 s
IDLE_TIMEOUT = 4.0  # with BRIDGE_REVALIDATE_AFTER=1: refused once unused 4 + 1 s
IDLE_LIMIT = IDLE_TIMEOUT + 1.0


@pytest.fixture(scope="module")
def sliding_kratos(workdir) -> Iterator[Kratos]:
    server = Kratos(
        workdir,
        lifespan=f"{LIFESPAN}s",
        extra_config={"session": {"earliest_possible_extend": f"{WINDOW}s"}},
    )
    yield server
    server.stop()


def _kratos_session(kratos: Kratos, session_id: str) -> dict:
    return httpx.get(f"{kratos.admin_url}/admin/sessions/{session_id}").json()


def _kratos_expiry_ms(kratos: Kratos, session_id: str) -> int:
    return parse_timestamp_ms(_kratos_session(kratos, session_id)["expires_at"])


def _extend_calls(kratos: Kratos) -> int:
    """How many times Kratos answered its admin extend route, by its own metrics."""
    text = httpx.get(kratos.admin_url + "/admin/metrics/prometheus").text
    pattern = re.compile(
        r'^http_requests_duration_seconds_count\{[^}]*endpoint="[^"]*/extend"[^}]*\} (\d+)', re.M
    )
    return sum(int(n) for n in pattern.findall(text))


def _mirror_expiry_ms(store, session_id: str) -> int:
    """When the store drops the mirror: Redis's own PEXPIRETIME, or the embedded clock."""
    key = store.keys.session(session_id)
    if hasattr(store, "_redis"):
        return store._redis.pexpiretime(key)
    return store._expires[key]


def test_a_session_used_in_the_window_is_extended_once_across_two_bridges(
    sliding_kratos, redis_server, prefix
):
    kratos = sliding_kratos
    env = {"BRIDGE_SESSION_EXTEND": str(WINDOW), "BRIDGE_REVALIDATE_AFTER": "1"}
    bridges = [
        create_app(bridge_settings(kratos, redis_server.url, prefix, **env)).test_client(
            use_cookies=False
        )
        for _ in range(2)
    ]
    used, unused = flows.register(kratos), flows.register(kratos)
    cookie = flows.browser_login(kratos, used)
    headers = {"Cookie": f"ory_kratos_session={cookie}"}
    session_id = bridges[0].get("/whoami", headers=headers).get_json()["session_id"]
    other = {"X-Session-Token": unused.token}
    other_id = bridges[1].get("/whoami", headers=other).get_json()["session_id"]
    expires_at = _kratos_expiry_ms(kratos, session_id)
    other_expires_at = _kratos_expiry_ms(kratos, other_id)
    calls = _extend_calls(kratos)

    # Outside the window: used on both bridges, not extended.
    for bridge in bridges:
        response = bridge.get("/auth", headers=headers)
        assert response.status_code == 200
        assert "Set-Cookie" not in response.headers
    time.sleep(0.5)
    assert _extend_calls(kratos) == calls
    assert _kratos_expiry_ms(kratos, session_id) == expires_at

    # Inside the window: used on both bridges at once, many times.
    time.sleep(max(0.0, (expires_at - WINDOW * 1000) / 1000 - time.time() + 0.5))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: bridges[i % 2].get("/auth", headers=headers), range(40)))
    assert {a.status_code for a in answers} == {200}
    wait_until(lambda: _kratos_expiry_ms(kratos, session_id) > expires_at, 10, "the extension")
    extended = _kratos_expiry_ms(kratos, session_id)
    assert extended >= expires_at + (LIFESPAN - WINDOW) * 1000

    # Kratos's new expiry reaches the mirror (and its key's expiry), and the cookie Kratos
    # re-issues goes out with a bridge's next answer for the old one.
    wait_until(lambda: store_of(bridges[0]).load(session_id).expires_at_ms == extended, 5, "mirror")
    assert _mirror_expiry_ms(store_of(bridges[1]), session_id) == extended
    reissued = next((a.headers["Set-Cookie"] for a in answers if "Set-Cookie" in a.headers), None)
    deadline = time.monotonic() + 5
    while reissued is None and time.monotonic() < deadline:
        for bridge in bridges:
            response = bridge.get("/auth", headers=headers)
            assert response.status_code == 200
            if "Set-Cookie" in response.headers:
                reissued = response.headers["Set-Cookie"]
        time.sleep(0.1)
    assert reissued is not None and reissued.startswith("ory_kratos_session=")
    new_cookie = reissued.split(";")[0].split("=", 1)[1]
    assert new_cookie != cookie
    assert flows.session_of(kratos, cookie=new_cookie).json()["id"] == session_id

    # Still used in the window (the answers above), and extended once in all.
    time.sleep(1.0)
    assert _extend_calls(kratos) - calls == 1
    assert _kratos_expiry_ms(kratos, session_id) == extended
    # The session nobody used in its window kept its expiry.
    assert _kratos_expiry_ms(kratos, other_id) == other_expires_at


def _refused_as_ended(response) -> bool:
    return response.status_code == 401 and response.get_json()["error"] == "session_ended"


def _assert_answered(response) -> None:
    """A 200, or the refusal's own words in the failure: its status and body."""
    assert response.status_code == 200, (response.status_code, response.get_data(as_text=True))


def test_a_session_idle_past_the_timeout_is_refused_and_revoked(make_client, kratos):
    env = {"BRIDGE_IDLE_TIMEOUT": str(IDLE_TIMEOUT), "BRIDGE_REVALIDATE_AFTER": "1"}
    client = make_client(kratos, **env)
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    session_id = client.get("/whoami", headers=headers).get_json()["session_id"]
    assert client.get("/auth", headers=headers).status_code == 200

    time.sleep(IDLE_LIMIT + 1.0)
    assert _refused_as_ended(client.get("/auth", headers=headers))
    wait_until(lambda: not _kratos_session(kratos, session_id)["active"], 5, "the revocation")
    assert flows.session_of(kratos, token=user.token).status_code == 401
    # Refused from then on, whatever Kratos says and however it is asked.
    for _ in range(3):
        assert client.get("/auth", headers=headers).status_code == 401
    assert client.get("/whoami", headers=headers).status_code == 401


def test_a_session_used_in_time_is_not_refused(make_client, kratos):
    """Answers from the process's copy count as uses too, though they write nothing on
    the request path: here the last ones are 12.5 s before the next request, which the
    limit (14 + 1.4 s) lets through, while the last use the lookups saw (the /whoami's)
    is some 16 s before. Windows of seconds, not tenths: a busy machine's stall of 2 s
    must not decide the test."""
    env = {"BRIDGE_IDLE_TIMEOUT": "14", "BRIDGE_REVALIDATE_AFTER": "6"}
    client = make_client(kratos, **env)
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    whoami = client.get("/whoami", headers=headers).get_json()
    session_id = whoami["session_id"]
    # The copy's age counts from when Kratos was asked, before /whoami answered (on a slow
    # machine, long before): the loop keeps to its first 4 s of the copy's 6, short of
    # the last quarter where a refresh-ahead would ask Kratos.
    last_use = parse_timestamp_ms(whoami["validated_at"]) / 1000
    answered_until = last_use + 4.0
    while time.time() < answered_until:
        _assert_answered(client.get("/auth", headers=headers))
        last_use = time.time()
        time.sleep(0.2)
    time.sleep(max(0.0, last_use + 12.5 - time.time()))
    _assert_answered(client.get("/auth", headers=headers))
    for _ in range(3):  # then used every 3 s: never idle for long
        time.sleep(3.0)
        _assert_answered(client.get("/auth", headers=headers))
    assert _kratos_session(kratos, session_id)["active"]


def test_an_idle_session_stays_refused_by_a_new_process(kratos, redis_server, prefix):
    """The mark is in Redis: a bridge started after the session went idle refuses it, and
    so does the one that saw it in use."""
    env = {"BRIDGE_IDLE_TIMEOUT": str(IDLE_TIMEOUT), "BRIDGE_REVALIDATE_AFTER": "1"}

    def bridge():
        settings = bridge_settings(kratos, redis_server.url, prefix, **env)
        return create_app(settings).test_client(use_cookies=False)

    first = bridge()
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    assert first.get("/auth", headers=headers).status_code == 200
    time.sleep(IDLE_LIMIT + 1.0)
    later = bridge()
    assert _refused_as_ended(later.get("/auth", headers=headers))
    assert _refused_as_ended(first.get("/auth", headers=headers))

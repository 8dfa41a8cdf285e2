"""The mirror's lifecycle against a real Kratos: expiry, AAL2 events, logout, step-up."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bridge.clock import parse_timestamp_ms
from bridge.sessions.rejection import DOUBT_MS
from tests.conftest import store_of
from tests.support import kratos_flows as flows
from tests.support.harness import Kratos


def _mirror_expiry_ms(store, session_id: str) -> int:
    """When the store will drop the mirror: Redis's own PEXPIRETIME, or the embedded clock."""
    key = store.keys.session(session_id)
    if hasattr(store, "_redis"):
        return store._redis.pexpiretime(key)
    return store._expires[key]


def test_mirror_expires_exactly_when_kratos_session_does(client, kratos, store):
    user = flows.register(kratos)
    body = client.get("/whoami", headers={"X-Session-Token": user.token}).get_json()
    expires_at = parse_timestamp_ms(flows.session_of(kratos, token=user.token).json()["expires_at"])
    assert _mirror_expiry_ms(store, body["session_id"]) == expires_at  # to the millisecond
    assert store.identity_session_ids(user.identity_id, int(time.time() * 1000)) == [
        body["session_id"]
    ]


def test_totp_login_records_exactly_one_aal2_event(make_client, kratos):
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER="1")
    store = store_of(client)
    user = flows.register(kratos)
    flows.enable_totp(kratos, user)
    token = flows.login_api(kratos, user)
    headers = {"X-Session-Token": token}
    assert client.get("/auth", headers=headers).headers["X-User-Aal"] == "aal1"
    assert store.aal2_events() == []

    flows.upgrade_to_aal2(kratos, user, token)
    time.sleep(1.1)  # past revalidate_after: the bridge asks Kratos again
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: client.get("/auth", headers=headers), range(20)))
    assert {a.status_code for a in answers} == {200}
    assert {a.headers["X-User-Aal"] for a in answers} == {"aal2"}

    events = store.aal2_events()
    assert len(events) == 1
    _, event = events[0]
    session = flows.session_of(kratos, token=token).json()
    totp = next(m for m in session["authentication_methods"] if m["method"] == "totp")
    assert event["session_id"] == session["id"]
    assert event["identity_id"] == user.identity_id
    assert event["methods"] == "totp"
    assert event["completed_at"] == totp["completed_at"]
    assert event["ip_address"] == session["devices"][0]["ip_address"]
    assert event["user_agent"] == session["devices"][0]["user_agent"]

    time.sleep(1.1)  # re-validated at aal2 again: nothing new
    assert client.get("/auth", headers=headers).status_code == 200
    assert len(store.aal2_events()) == 1


def test_logout_takes_effect_within_revalidate_after(make_client, kratos):
    # 10 s: the logout and the ask below end well inside the copy's first 7.5 s (before
    # a refresh-ahead could ask Kratos) though a busy machine stalls for seconds.
    revalidate_after = 10.0
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER=str(revalidate_after))
    store = store_of(client)
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    whoami = client.get("/whoami", headers=headers).get_json()
    session_id = whoami["session_id"]

    flows.logout_api(kratos, user.token)
    assert client.get("/auth", headers=headers).status_code == 200  # inside the bound
    stale_at = parse_timestamp_ms(whoami["validated_at"]) / 1000 + revalidate_after
    time.sleep(max(0.0, stale_at + 0.1 - time.time()))  # timed from the copy's own age
    response = client.get("/auth", headers=headers)
    assert response.status_code == 401
    assert "X-User-Id" not in response.headers
    assert store.load(session_id) is None
    assert store.identity_session_ids(user.identity_id, int(time.time() * 1000)) == []

    before = kratos.whoami_calls()
    for _ in range(20):
        assert client.get("/auth", headers=headers).status_code == 401
    # The rejection is remembered: none of the 20 asks Kratos. Kratos counts every caller,
    # and a bridge an earlier test left behind may still run one refresh it had scheduled
    # (seen once in a loaded run): one stray call is not this bridge's.
    assert kratos.whoami_calls() - before <= 1


def test_admin_revocation_takes_effect_with_revalidate_zero(make_client, kratos):
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER="0")
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    session_id = client.get("/whoami", headers=headers).get_json()["session_id"]
    assert httpx.delete(f"{kratos.admin_url}/admin/sessions/{session_id}").status_code == 204
    assert client.get("/auth", headers=headers).status_code == 401


def test_highest_available_aal1_session_needs_step_up(make_client, kratos_strict):
    client = make_client(kratos_strict, BRIDGE_RETURN_TO_ORIGINS="http://app.test")
    user = flows.register(kratos_strict)
    flows.enable_totp(kratos_strict, user)
    token = flows.login_api(kratos_strict, user)

    response = client.get(
        "/auth", headers={"X-Session-Token": token, "X-Original-URL": "http://app.test/pay"}
    )
    assert response.status_code == 401
    body = response.get_json()
    assert body["error"] == "aal2_required"
    assert body["redirect_browser_to"] == (
        f"{kratos_strict.public_url}/self-service/login/browser"
        "?aal=aal2&return_to=http%3A%2F%2Fapp.test%2Fpay"
    )
    assert response.headers["X-Bridge-Redirect"] == body["redirect_browser_to"]
    assert "X-User-Id" not in response.headers
    assert client.get("/whoami", headers={"X-Session-Token": token}).status_code == 401

    flows.upgrade_to_aal2(kratos_strict, user, token)
    response = client.get("/auth", headers={"X-Session-Token": token})
    assert response.status_code == 200
    assert response.headers["X-User-Aal"] == "aal2"


@pytest.mark.parametrize("store_kind", ["redis"])
def test_concurrent_first_sight_asks_kratos_once_per_process(client, kratos):
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    before = kratos.whoami_calls()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: client.get("/auth", headers=headers), range(40)))
    assert {a.status_code for a in answers} == {200}
    assert kratos.whoami_calls() - before == 1


def test_kratos_extend_moves_the_expiry_and_relays_the_new_cookie(make_client, kratos):
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER="1")
    store = store_of(client)
    user = flows.register(kratos)
    cookie = flows.browser_login(kratos, user)
    headers = {"Cookie": f"ory_kratos_session={cookie}"}
    first = client.get("/whoami", headers=headers).get_json()
    session_id = first["session_id"]
    time.sleep(1.1)
    extended = httpx.patch(f"{kratos.admin_url}/admin/sessions/{session_id}/extend")
    assert extended.status_code in (200, 204)
    new_expiry = parse_timestamp_ms(
        httpx.get(f"{kratos.admin_url}/admin/sessions/{session_id}").json()["expires_at"]
    )
    assert new_expiry > parse_timestamp_ms(first["expires_at"])

    response = client.get("/auth", headers=headers)
    assert response.status_code == 200
    assert response.headers["Set-Cookie"].startswith("ory_kratos_session=")
    assert _mirror_expiry_ms(store, session_id) == new_expiry


@pytest.fixture
def short_kratos(workdir):
    """Kratos whose sessions (and so its cookies' max-age) last 6 seconds."""
    server = Kratos(workdir, lifespan="6s")
    yield server
    server.stop()


def test_freshness_belongs_to_the_credential_not_the_session(make_client, short_kratos):
    """An old cookie Kratos stopped accepting is refused even while a newer cookie of the
    same session keeps the mirror fresh. Kratos's admin API holds the session active, so
    the old cookie's 401 could be a blip of Kratos's: it is doubted (503) for
    ``DOUBT_MS``, then refused alone, and the session is never dropped."""
    client = make_client(short_kratos, BRIDGE_REVALIDATE_AFTER="1")
    user = flows.register(short_kratos)
    started = time.monotonic()
    old_cookie = flows.browser_login(short_kratos, user)
    old = {"Cookie": f"ory_kratos_session={old_cookie}"}
    session_id = client.get("/whoami", headers=old).get_json()["session_id"]

    time.sleep(3)  # extend late enough that the session outlives the old cookie
    extend = httpx.patch(f"{short_kratos.admin_url}/admin/sessions/{session_id}/extend")
    assert extend.status_code in (200, 204)
    reissued = client.get("/auth", headers=old)
    assert reissued.status_code == 200
    new_cookie = reissued.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    new = {"Cookie": f"ory_kratos_session={new_cookie}"}

    # The old cookie's max-age (6 s, counted in whole seconds) runs out by about 7 s
    # after the login, however long the login took; the extended session lives until
    # about 9 s. Until Kratos itself refuses the old cookie, the new one is answered.
    while flows.session_of(short_kratos, cookie=old_cookie).status_code != 401:
        assert time.monotonic() - started < 15, "Kratos kept accepting the old cookie"
        assert client.get("/auth", headers=new).status_code == 200
        time.sleep(0.2)
    assert flows.session_of(short_kratos, cookie=new_cookie).status_code == 200
    doubted = time.monotonic()
    while (status := client.get("/auth", headers=old).status_code) != 401:
        assert status == 503, status
        assert time.monotonic() - doubted < DOUBT_MS / 1000 + 5, "the old cookie kept 503"
        # The session and its new cookie kept alive meanwhile: extended in Kratos, and
        # the cookie Kratos re-issues for it (through the bridge) taken up.
        extend = httpx.patch(f"{short_kratos.admin_url}/admin/sessions/{session_id}/extend")
        assert extend.status_code in (200, 204)
        answer = client.get("/auth", headers=new)
        assert answer.status_code == 200
        if "Set-Cookie" in answer.headers:
            renewed = answer.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
            new = {"Cookie": f"ory_kratos_session={renewed}"}
        time.sleep(0.5)
    assert client.get("/auth", headers=new).status_code == 200
    assert store_of(client).load(session_id) is not None  # the session was never dropped

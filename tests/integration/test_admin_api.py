"""The admin API on real bridge processes, a real Redis and a real Kratos: the token is
required, bad ids get JSON errors, sessions are listed and shown as the bridge saw them,
and a revocation is real in Kratos and refused at once by every bridge process, long
before ``BRIDGE_REVALIDATE_AFTER``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SECRET
from tests.support import kratos_flows as flows
from tests.support.harness import (
    BridgeServer,
    Kratos,
    RedisServer,
    free_port,
    wait_until,
)
from tests.support.harness import token_status as auth

TOKEN = "admin-token-for-tests-" + "a" * 20
BEARER = {"Authorization": f"Bearer {TOKEN}"}
# Far longer than any test: a refusal seen here comes from the revocation, not from age.
REVALIDATE_AFTER = "300"


@pytest.fixture
def start_bridge(
    kratos: Kratos, redis_server: RedisServer, workdir: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., BridgeServer]]:
    started: list[BridgeServer] = []
    prefix = f"admin{uuid.uuid4().hex[:8]}:"

    def start(embedded: bool = False, kratos_: Kratos = kratos, **env: str) -> BridgeServer:
        values = {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos_.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos_.admin_url,
            "BRIDGE_KEY_PREFIX": prefix,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_ADMIN_TOKEN": TOKEN,
            "BRIDGE_REVALIDATE_AFTER": REVALIDATE_AFTER,
            "BRIDGE_WORKERS": "2",
            **env,
        }
        if not embedded:
            values["BRIDGE_REDIS_URL"] = redis_server.url
        values = {k: v for k, v in values.items() if v != ""}  # "": leave the setting out
        server = BridgeServer(values, workdir)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def admin(bridge: BridgeServer, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {**BEARER, **kwargs.pop("headers", {})}
    return httpx.request(method, bridge.admin_url + path, headers=headers, timeout=10, **kwargs)


def listed(bridge: BridgeServer, path: str = "/admin/sessions") -> list[str]:
    response = admin(bridge, "GET", path)
    assert response.status_code == 200, response.text
    return [s["session_id"] for s in response.json()["sessions"]]


def session_id(kratos: Kratos, token: str) -> str:
    return flows.session_of(kratos, token=token).json()["id"]


def test_every_admin_route_wants_the_token(start_bridge) -> None:
    bridge = start_bridge()
    for path in ("/admin/sessions", "/admin/stats", "/metrics", "/admin/events/aal2"):
        missing = httpx.get(bridge.admin_url + path)
        wrong = httpx.get(bridge.admin_url + path, headers={"Authorization": "Bearer nope"})
        for response in (missing, wrong):
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    near_miss = httpx.get(
        bridge.admin_url + "/admin/sessions", headers={"Authorization": f"Bearer {TOKEN}x"}
    )
    assert near_miss.status_code == 401
    assert admin(bridge, "GET", "/admin/sessions").status_code == 200


def test_a_dashboard_cookie_that_is_no_timestamp_is_the_login_page(start_bridge) -> None:
    """The cookie is read from a header's bytes as Latin-1: byte B2 is "\u00b2", a digit to
    str.isdigit() and none to int(), so it has to be refused as no timestamp, not a 500."""
    bridge = start_bridge()
    for cookie in (b"\xb2.mac", b"12x.mac", b"0.mac"):
        response = httpx.get(
            bridge.admin_url + "/admin/ui/", headers={"Cookie": b"bridge_admin_ui=" + cookie}
        )
        assert response.status_code == 303, (cookie, response.text)
        assert response.headers["Location"].endswith("/admin/ui/login"), cookie


def test_the_admin_api_is_not_on_the_public_listener(start_bridge) -> None:
    bridge = start_bridge()
    response = httpx.get(bridge.url + "/admin/sessions", headers=BEARER)
    assert response.status_code == 404


BAD_REQUESTS = [
    ("/admin/sessions/not-a-uuid", 400),
    (f"/admin/sessions/{uuid.uuid4()}", 404),
    ("/admin/identities/1234/sessions", 400),
    ("/admin/sessions?page_size=0", 400),
    ("/admin/sessions?page_size=abc", 400),
    ("/admin/sessions?page_token=%27%3Bdrop", 400),
    ("/admin/events/aal2?since=yesterday", 400),
    ("/admin/events/aal2?page_token=nope", 400),
    ("/admin/stats?since=9999d", 400),
    ("/admin/stats?since=2999-01-01T00:00:00Z", 400),
    ("/admin/events/aal2?since=999999d", 400),
    ("/admin/events/aal2?since=1h&until=2h", 400),
    ("/admin/sessions?page_size=%C2%B2", 400),
    ("/admin/nothing-here", 404),
]


def test_bad_requests_get_json_errors(start_bridge) -> None:
    bridge = start_bridge()
    for path, status in BAD_REQUESTS:
        response = admin(bridge, "GET", path)
        assert response.status_code == status, (path, response.text)
        body = response.json()
        assert set(body) == {"error", "message"}, path
        assert body["message"], path


def test_delete_of_a_bad_id_and_a_wrong_method(start_bridge) -> None:
    bridge = start_bridge()
    assert admin(bridge, "DELETE", "/admin/sessions/xyz").status_code == 400
    assert admin(bridge, "DELETE", f"/admin/sessions/{uuid.uuid4()}").status_code == 404
    wrong = admin(bridge, "PUT", "/admin/sessions")
    assert wrong.status_code == 405
    assert wrong.json()["error"] == "method_not_allowed"


def test_sessions_are_listed_newest_first_and_shown(kratos: Kratos, start_bridge) -> None:
    bridge = start_bridge()
    first, second = flows.register(kratos, "first"), flows.register(kratos, "second")
    older, newer = flows.login_api(kratos, first), flows.login_api(kratos, second)
    for token in (older, newer):
        assert auth(bridge, token) == 200
    ids = [session_id(kratos, older), session_id(kratos, newer)]
    wait_until(lambda: set(ids) <= set(listed(bridge)), 10, "sessions in the registry")
    order = [sid for sid in listed(bridge) if sid in ids]
    assert order == [ids[1], ids[0]]

    page = admin(bridge, "GET", "/admin/sessions?page_size=1").json()
    assert len(page["sessions"]) == 1 and page["next_page_token"]
    rest = admin(
        bridge, "GET", f"/admin/sessions?page_size=500&page_token={page['next_page_token']}"
    )
    assert page["sessions"][0]["session_id"] not in [
        s["session_id"] for s in rest.json()["sessions"]
    ]

    shown = admin(bridge, "GET", f"/admin/sessions/{ids[0]}").json()
    assert shown["active_in_kratos"] is True
    assert shown["session"]["identity_id"] == first.identity_id
    assert shown["session"]["label"] == first.email
    assert shown["session"]["aal"] == "aal1"
    assert shown["session"]["methods"] == ["password"]
    assert shown["session"]["requests"] >= 1
    assert shown["unified"]["identity"]["id"] == first.identity_id

    mine = listed(bridge, f"/admin/identities/{second.identity_id}/sessions")
    assert mine == [ids[1], session_id(kratos, second.token)]  # its registration's, too


def test_an_identity_lists_what_kratos_holds_at_once_joined_with_what_the_bridge_saw(
    kratos: Kratos, start_bridge
) -> None:
    bridge = start_bridge()
    user = flows.register(kratos, "truth")
    used = flows.login_api(kratos, user)
    for _ in range(3):
        assert auth(bridge, used) == 200
    used_id = session_id(kratos, used)
    path = f"/admin/identities/{user.identity_id}/sessions"
    wait_until(lambda: used_id in listed(bridge), 10, "the used session in the registry")
    flows.logout_api(kratos, user.token)  # the registration's session: ended in Kratos
    never_used = flows.login_api(kratos, user)  # by API, never through the bridge

    response = admin(bridge, "GET", path)  # at once: no wait for anything to be reported
    assert response.status_code == 200, response.text
    sessions = {s["session_id"]: s for s in response.json()["sessions"]}
    unseen_id, ended_id = session_id(kratos, never_used), ended_session_id(kratos, user)
    assert list(sessions) == [unseen_id, used_id, ended_id]  # newest first

    unseen = sessions[unseen_id]
    assert unseen["seen_by_bridge"] is False and unseen["active"] is True
    assert unseen["identity_id"] == user.identity_id
    assert unseen["aal"] == "aal1" and unseen["methods"] == ["password"]
    assert unseen["first_seen_at"] is None and unseen["requests"] == 0
    seen = sessions[used_id]
    assert seen["seen_by_bridge"] is True and seen["active"] is True
    assert seen["first_seen_at"] and seen["last_seen_at"] and seen["requests"] >= 1
    assert seen["device"]["device_kind"] == "script"
    assert seen["label"] == user.email
    ended = sessions[ended_id]
    assert ended["active"] is False and ended["seen_by_bridge"] is False

    one = admin(bridge, "GET", path + "?page_size=1").json()
    rest = admin(bridge, "GET", f"{path}?page_token={one['next_page_token']}").json()
    assert [s["session_id"] for s in one["sessions"] + rest["sessions"]] == list(sessions)
    assert rest["next_page_token"] is None


def ended_session_id(kratos: Kratos, user: flows.User) -> str:
    """The id of the registration session (ended, so whoami cannot tell it), from the
    admin API."""
    listed_by_kratos = httpx.get(
        f"{kratos.admin_url}/admin/identities/{user.identity_id}/sessions?active=false"
    )
    (only,) = listed_by_kratos.json()
    return only["id"]


@pytest.mark.parametrize("view", ["identity", "detail"])
def test_with_kratos_down_the_operators_view_is_an_error_not_what_the_bridge_saw(
    kratos: Kratos, start_bridge, view: str
) -> None:
    """An identity's sessions, or one session's detail: never a partial answer."""
    closed = f"http://127.0.0.1:{free_port()}"
    bridge = start_bridge(BRIDGE_KRATOS_ADMIN_URL=closed)
    user = flows.register(kratos, "partial")
    assert auth(bridge, user.token) == 200
    sid = session_id(kratos, user.token)
    wait_until(lambda: sid in listed(bridge), 10, "the session in the registry")
    path = f"/admin/identities/{user.identity_id}/sessions"
    response = admin(bridge, "GET", path if view == "identity" else f"/admin/sessions/{sid}")
    assert response.status_code == 502, response.text
    assert response.json()["error"] == "kratos_unavailable"


def logged_in(kratos: Kratos, name: str) -> tuple[flows.User, str, str]:
    """A new user, logged in by API: the user, the session's token and its id."""
    user = flows.register(kratos, name)
    token = flows.login_api(kratos, user)
    return user, token, session_id(kratos, token)


def detail(bridge: BridgeServer, sid: str) -> dict:
    response = admin(bridge, "GET", f"/admin/sessions/{sid}")
    assert response.status_code == 200, response.text
    return response.json()


def test_the_detail_of_a_session_never_sent_through_the_bridge_is_kratos_s(
    kratos: Kratos, start_bridge
) -> None:
    bridge = start_bridge()
    user, _, sid = logged_in(kratos, "unseen-detail")  # by API, never through the bridge

    shown = detail(bridge, sid)
    row, in_kratos = shown["session"], shown["kratos"]
    assert row["session_id"] == sid and row["identity_id"] == user.identity_id
    assert row["seen_by_bridge"] is False and row["active"] is True
    assert row["first_seen_at"] is None and row["last_seen_at"] is None and row["requests"] == 0
    assert row["label"] == user.email
    assert in_kratos["active"] is True and shown["active_in_kratos"] is True
    assert in_kratos["aal"] == "aal1"
    assert [m["method"] for m in in_kratos["authentication_methods"]] == ["password"]
    assert all(in_kratos[t] for t in ("issued_at", "authenticated_at", "expires_at"))
    assert len(in_kratos["devices"]) == 1 and in_kratos["devices"][0]["user_agent"]
    assert in_kratos["identity"]["id"] == user.identity_id
    assert in_kratos["identity"]["traits"]["email"] == user.email
    assert "metadata_admin" not in in_kratos["identity"]
    assert "credentials" not in in_kratos["identity"]
    assert shown["device_changes"] == []
    assert shown["unified"] is None and shown["app_keys"] == []


def test_the_detail_right_after_login_then_joined_with_what_the_bridge_saw(
    kratos: Kratos, start_bridge
) -> None:
    bridge = start_bridge()
    user, token, sid = logged_in(kratos, "fresh-detail")
    shown = detail(bridge, sid)  # at once: Kratos's answer, no wait for anything
    assert shown["kratos"]["active"] is True and shown["session"]["active"] is True

    for _ in range(3):
        assert auth(bridge, token) == 200
    shown = detail(bridge, sid)  # the mirror is there as soon as the bridge answered
    assert shown["unified"]["session_id"] == sid
    assert shown["unified"]["identity"]["id"] == user.identity_id
    wait_until(lambda: detail(bridge, sid)["session"]["seen_by_bridge"], 10, "the registry")
    row = detail(bridge, sid)["session"]
    assert row["first_seen_at"] and row["last_seen_at"] and row["requests"] >= 1
    assert row["device"]["device_kind"] == "script"
    assert detail(bridge, sid)["kratos"]["active"] is True


def test_the_detail_of_a_revoked_session_says_it_is_not_active(
    kratos: Kratos, start_bridge
) -> None:
    bridge = start_bridge()
    user, token, sid = logged_in(kratos, "revoked-detail")
    assert auth(bridge, token) == 200
    assert httpx.delete(f"{kratos.admin_url}/admin/sessions/{sid}").status_code == 204

    shown = detail(bridge, sid)  # revoked behind the bridge's back: Kratos says so at once
    assert shown["kratos"]["active"] is False and shown["session"]["active"] is False
    assert shown["active_in_kratos"] is False
    assert shown["kratos"]["identity"]["id"] == user.identity_id


def test_the_detail_of_a_session_kratos_does_not_know_is_404_whatever_the_bridge_saw(
    kratos: Kratos, start_bridge
) -> None:
    bridge = start_bridge()
    user = flows.register(kratos, "deleted-detail")
    assert auth(bridge, user.token) == 200
    sid = session_id(kratos, user.token)
    wait_until(lambda: sid in listed(bridge), 10, "the session in the registry")
    deleted = httpx.delete(f"{kratos.admin_url}/admin/identities/{user.identity_id}")
    assert deleted.status_code == 204  # and its sessions with it
    response = admin(bridge, "GET", f"/admin/sessions/{sid}")
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "not_found"


def test_a_revocation_is_real_in_kratos_and_at_once_on_every_process(
    kratos: Kratos, start_bridge
) -> None:
    one, two = start_bridge(), start_bridge()
    user = flows.register(kratos, "revoked")
    token, spared = flows.login_api(kratos, user), flows.login_api(kratos, user)
    for bridge in (one, two):
        for _ in range(5):  # both worker processes of each bridge, most likely
            assert auth(bridge, token) == 200
            assert auth(bridge, spared) == 200
    sid = session_id(kratos, token)

    response = admin(one, "DELETE", f"/admin/sessions/{sid}")
    assert response.status_code == 200, response.text
    assert response.json() == {"revoked": [sid]}

    assert flows.session_of(kratos, token=token).status_code == 401
    for bridge in (one, two):
        # Every worker of each, 10 refusals in a row: the announcement, long before the
        # 300 s re-validation (15 s: a busy machine may stall its delivery for seconds).
        wait_until(
            lambda b=bridge: all(auth(b, token) == 401 for _ in range(10)),
            15,
            "the revocation on every process",
        )
        assert auth(bridge, spared) == 200
    assert sid not in listed(one)
    assert admin(two, "DELETE", f"/admin/sessions/{sid}").status_code in (200, 404)


def test_revoking_an_identity_spares_the_session_named(kratos: Kratos, start_bridge) -> None:
    bridge = start_bridge()
    user = flows.register(kratos, "everyone")
    tokens = [flows.login_api(kratos, user) for _ in range(3)]
    for token in tokens:
        assert auth(bridge, token) == 200
    keep = session_id(kratos, tokens[0])
    path = f"/admin/identities/{user.identity_id}/sessions?except={keep}"
    response = admin(bridge, "DELETE", path)
    assert response.status_code == 200, response.text
    revoked = set(response.json()["revoked"])
    assert keep not in revoked
    assert {session_id(kratos, tokens[0])} == {keep}
    assert flows.session_of(kratos, token=tokens[1]).status_code == 401
    assert flows.session_of(kratos, token=tokens[2]).status_code == 401
    wait_until(lambda: auth(bridge, tokens[1]) == 401, 15, "revocation")
    assert auth(bridge, tokens[2]) == 401
    assert auth(bridge, tokens[0]) == 200

    everything = admin(bridge, "DELETE", f"/admin/identities/{user.identity_id}/sessions")
    assert everything.status_code == 200
    assert keep in everything.json()["revoked"]
    assert flows.session_of(kratos, token=tokens[0]).status_code == 401
    wait_until(lambda: auth(bridge, tokens[0]) == 401, 15, "revocation")


def test_an_identity_without_sessions_has_nothing_to_revoke(kratos: Kratos, start_bridge) -> None:
    """Kratos links a "next" page after every page, the empty one too: the bridge must
    stop at the first page that is not full, not follow the links until its page limit."""
    bridge = start_bridge()
    for kept in ("", f"?except={uuid.uuid4()}"):
        path = f"/admin/identities/{uuid.uuid4()}/sessions{kept}"
        response = admin(bridge, "DELETE", path)
        assert response.status_code == 200, response.text
        assert response.json() == {"revoked": []}


def test_a_kratos_failure_is_reported_and_changes_nothing(kratos: Kratos, start_bridge) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    bridge = start_bridge(BRIDGE_KRATOS_ADMIN_URL=closed)
    user = flows.register(kratos, "kept")
    token = flows.login_api(kratos, user)
    assert auth(bridge, token) == 200
    sid = session_id(kratos, token)
    response = admin(bridge, "DELETE", f"/admin/sessions/{sid}")
    assert response.status_code == 502
    assert response.json()["error"] == "kratos_unavailable"
    assert auth(bridge, token) == 200
    assert flows.session_of(kratos, token=token).status_code == 200


def test_revocation_on_the_embedded_store(kratos: Kratos, start_bridge) -> None:
    bridge = start_bridge(embedded=True)
    user = flows.register(kratos, "embedded")
    token = flows.login_api(kratos, user)
    assert auth(bridge, token) == 200
    sid = session_id(kratos, token)
    assert admin(bridge, "DELETE", f"/admin/sessions/{sid}").status_code == 200
    assert auth(bridge, token) == 401


def test_aal2_events_filtered_and_paged(kratos: Kratos, start_bridge) -> None:
    bridge = start_bridge()
    users = [flows.register(kratos, "events") for _ in range(2)]
    for user in users:
        flows.enable_totp(kratos, user)
        assert auth(bridge, user.token) == 200
    everyone = admin(bridge, "GET", "/admin/events/aal2?since=15m&page_size=500").json()
    mine = [e for e in everyone["events"] if e["identity_id"] in {u.identity_id for u in users}]
    assert len(mine) == 2
    assert {e["methods"] for e in mine} == {"totp"}
    only = admin(
        bridge, "GET", f"/admin/events/aal2?since=15m&identity_id={users[1].identity_id}"
    ).json()["events"]
    assert [e["identity_id"] for e in only] == [users[1].identity_id]
    first = admin(bridge, "GET", "/admin/events/aal2?since=15m&page_size=1").json()
    assert len(first["events"]) == 1 and first["next_page_token"] == first["events"][0]["id"]
    after = admin(
        bridge,
        "GET",
        f"/admin/events/aal2?since=15m&page_size=500&page_token={first['next_page_token']}",
    ).json()
    assert first["events"][0]["id"] not in [e["id"] for e in after["events"]]
    assert len(after["events"]) == len(everyone["events"]) - 1


def test_without_a_token_only_local_same_site_requests_are_answered(start_bridge) -> None:
    bridge = start_bridge(BRIDGE_ADMIN_TOKEN="")
    url = bridge.admin_url + "/admin/sessions"
    assert httpx.get(url).status_code == 200
    assert httpx.get(url, headers={"Host": f"localhost:{bridge.admin_port}"}).status_code == 200
    for headers in (
        {"Host": "evil.example"},  # a page on a rebound DNS name
        {"Origin": "https://evil.example"},
        {"Origin": "https://["},  # no URL: names no origin of ours
        {"Sec-Fetch-Site": "cross-site"},
    ):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 403, headers
        assert response.json()["error"] == "forbidden"
    revoke = httpx.delete(
        f"{bridge.admin_url}/admin/sessions/{uuid.uuid4()}", headers={"Host": "evil.example"}
    )
    assert revoke.status_code == 403

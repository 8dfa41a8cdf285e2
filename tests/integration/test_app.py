"""/auth and /whoami against a real Kratos, over both stores."""

from __future__ import annotations

import time
from urllib.parse import unquote

import httpx
import orjson
import pytest

from bridge.clock import parse_timestamp_ms
from tests.conftest import admin_of
from tests.support import kratos_flows as flows
from tests.support.harness import forwarded


def test_session_token_is_allowed_with_identity_headers(client, kratos):
    user = flows.register(kratos)
    response = client.get("/auth", headers={"X-Session-Token": user.token})
    assert response.status_code == 200
    assert response.headers["X-User-Id"] == user.identity_id
    assert response.headers["X-User-Email"] == user.email
    assert response.headers["X-User-Aal"] == "aal1"
    kratos_view = flows.session_of(kratos, token=user.token).json()
    assert response.headers["X-Session-Id"] == kratos_view["id"]


def test_non_ascii_email_is_percent_encoded_and_decodes_back(client, kratos):
    user = flows.register(kratos, local_part="jürgen")
    response = client.get("/auth", headers={"X-Session-Token": user.token})
    assert response.status_code == 200
    assert response.headers["X-User-Id"] == user.identity_id
    encoded = response.headers["X-User-Email"]
    assert encoded.isascii() and "ü" not in encoded
    assert unquote(encoded) == user.email
    whoami = client.get("/whoami", headers={"X-Session-Token": user.token}).get_json()
    assert whoami["identity"]["traits"]["email"] == user.email


def test_bearer_token_is_allowed(client, kratos):
    user = flows.register(kratos)
    response = client.get("/auth", headers={"Authorization": f"Bearer {user.token}"})
    assert response.status_code == 200
    assert response.headers["X-User-Id"] == user.identity_id


def test_browser_cookie_is_allowed_and_whoami_matches_kratos(client, kratos):
    user = flows.register(kratos)
    cookie = flows.browser_login(kratos, user)
    headers = {"Cookie": f"other=1; ory_kratos_session={cookie}; theme=dark"}
    assert client.get("/auth", headers=headers).status_code == 200

    body = client.get("/whoami", headers=headers).get_json()
    kratos_view = flows.session_of(kratos, cookie=cookie).json()
    assert body["session_id"] == kratos_view["id"]
    assert body["identity"]["id"] == user.identity_id
    assert body["identity"]["traits"] == {"email": user.email}
    assert body["identity"]["schema_id"] == "default"
    assert body["identity"]["state"] == "active"
    assert body["aal"] == "aal1"
    assert [m["method"] for m in body["authentication_methods"]] == ["password"]
    assert body["expires_at"] == kratos_view["expires_at"]
    assert body["authenticated_at"] == kratos_view["authenticated_at"]
    assert body["device"]["ip_address"] == kratos_view["devices"][0]["ip_address"]
    assert body["device"]["user_agent"] == kratos_view["devices"][0]["user_agent"]
    assert body["app"] == {}
    assert abs(parse_timestamp_ms(body["validated_at"]) - time.time() * 1000) < 60_000


def test_no_credential_is_401_without_identity_headers(client):
    response = client.get("/auth")
    assert response.status_code == 401
    assert response.get_json()["error"] == "session_missing"
    assert "X-User-Id" not in response.headers
    assert client.get("/whoami").status_code == 401


def test_unknown_token_is_401(client, kratos):
    response = client.get("/auth", headers={"X-Session-Token": "ory_st_" + "a" * 32})
    assert response.status_code == 401
    assert response.get_json()["error"] == "session_invalid"
    assert response.get_json()["redirect_browser_to"].startswith(
        kratos.public_url + "/self-service/login/browser"
    )


def test_warm_requests_do_not_ask_kratos(client, kratos):
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    assert client.get("/auth", headers=headers).status_code == 200
    before = kratos.whoami_calls()
    for _ in range(50):
        assert client.get("/auth", headers=headers).status_code == 200
    assert kratos.whoami_calls() == before


def test_app_data_is_returned_by_whoami(client, kratos, store):
    import pytest

    from bridge.errors import SessionEnded

    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    session_id = client.get("/whoami", headers=headers).get_json()["session_id"]
    assert store.update_app(session_id, {"cart": "3 items"}, (), 65536) == {"cart": "3 items"}
    assert client.get("/whoami", headers=headers).get_json()["app"] == {"cart": "3 items"}
    with pytest.raises(SessionEnded):
        store.update_app("no-such-session", {"cart": "x"}, (), 65536)


def test_ext_authz_answers_any_method_and_path_the_same(client, kratos):
    """Envoy's ext_authz keeps the original method and appends the original path."""
    user = flows.register(kratos)
    origin = {"Host": "app.test", "X-Forwarded-Proto": "https"}
    paths = ["/ext-authz", "/ext-authz/", "/ext-authz/some/upstream/path", "/ext-authz//x"]
    for path in [*paths, "/ext-authz/a%2Fb?q=1"]:
        for method in ["GET", "HEAD", "POST", "DELETE", "PROPFIND", "OPTIONS"]:
            headers = {**origin, "X-Session-Token": user.token}
            response = client.open(path, method=method, headers=headers)
            assert response.status_code == 200, (method, path)
            assert response.headers["X-User-Id"] == user.identity_id
            assert client.open(path, method=method, headers=origin).status_code == 401


def test_route_asking_for_aal2_steps_up_an_aal1_session(make_client, kratos):
    client = make_client(
        kratos, BRIDGE_REVALIDATE_AFTER="60", BRIDGE_RETURN_TO_ORIGINS="https://app.test"
    )
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token, "X-Original-URL": "https://app.test/admin"}
    assert client.get("/auth?aal=aal1", headers=headers).status_code == 200
    response = client.get("/auth?aal=aal2", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"] == "aal2_required"
    assert response.headers["X-Bridge-Redirect"] == (
        f"{kratos.public_url}/self-service/login/browser"
        "?aal=aal2&return_to=https%3A%2F%2Fapp.test%2Fadmin"
    )
    assert "X-User-Id" not in response.headers

    flows.enable_totp(kratos, user)  # the session doing it becomes aal2 in Kratos
    # At once, not after revalidate_after: a route asking for more than the copy knows
    # makes the bridge ask Kratos.
    response = client.get("/auth?aal=aal2", headers=headers)
    assert response.status_code == 200
    assert response.headers["X-User-Aal"] == "aal2"


def test_unknown_aal_value_is_refused_naming_it(client, kratos):
    """400 where the proxy passes it on; 403 on nginx's /auth, which can carry no 400."""
    user = flows.register(kratos)
    for path, headers, status in (
        ("/forward-auth?aal=aal9", forwarded(), 400),
        ("/auth?aal=aal9", {}, 403),
    ):
        response = client.get(path, headers={**headers, "X-Session-Token": user.token})
        assert response.status_code == status
        assert response.get_json()["error"] == "bad_request"
        assert "aal" in response.get_json()["message"]


def test_ready_says_what_the_store_runs_on(client, store_kind, redis_server):
    response = admin_of(client).get("/health/ready")  # the public listener says only "ok"
    assert response.status_code == 200
    expected = (
        {
            "kind": "standalone",
            "address": f"127.0.0.1:{redis_server.port}",
            "role": "master",
            "replicas": 0,
        }
        if store_kind == "redis"
        else {"kind": "embedded"}
    )
    body = response.get_json()
    body.pop("workers")  # how many processes, and why: tests/integration/test_health.py
    assert body == {"status": "ok", "redis": expected}


APP_TOKEN = "app-token-" + "a" * 40


@pytest.fixture
def app_client(make_client, kratos):
    """The bridge with writes over HTTP turned on (``BRIDGE_APP_TOKEN``)."""
    return make_client(kratos, BRIDGE_APP_TOKEN=APP_TOKEN)


def _patch(client, token, body, content_type="application/merge-patch+json", app_token=APP_TOKEN):
    headers = {"X-Session-Token": token, "Content-Type": content_type}
    if app_token is not None:
        headers["X-Bridge-App-Token"] = app_token
    return client.patch(
        "/whoami/app",
        data=body if isinstance(body, bytes) else orjson.dumps(body),
        headers=headers,
    )


def _app_section(client, token):
    return client.get("/whoami", headers={"X-Session-Token": token}).get_json()["app"]


def test_patch_app_merges_typed_fields_and_null_deletes(app_client, kratos):
    client = app_client
    user = flows.register(kratos)
    first = _patch(client, user.token, {"cart": ["book", 2], "theme": "dark", "beta": True})
    assert first.status_code == 200
    assert first.get_json()["app"] == {"cart": ["book", 2], "theme": "dark", "beta": True}
    second = _patch(client, user.token, {"theme": None, "visits": 3}, "application/json")
    assert second.get_json()["app"] == {"cart": ["book", 2], "beta": True, "visits": 3}
    assert _app_section(client, user.token) == {"cart": ["book", 2], "beta": True, "visits": 3}


def test_a_user_with_only_their_own_session_cannot_write_their_app_section(app_client, kratos):
    """The app section holds what the user must not choose (a role): the user's own
    credential names the session, the app token says an app is writing."""
    client = app_client
    user = flows.register(kratos)
    assert _patch(client, user.token, {"role": "reader"}).status_code == 200
    wrong = "x" * len(APP_TOKEN)  # same length: the comparison must not stop at the length
    for app_token in (None, "", wrong, APP_TOKEN[:-1], APP_TOKEN + "x", f"{APP_TOKEN}, x"):
        refused = _patch(client, user.token, {"role": "admin"}, app_token=app_token)
        assert refused.status_code == 401, app_token
        assert refused.get_json()["error"] == "app_token_required"
        assert "X-Bridge-App-Token" in refused.get_json()["message"]
    # The app token where a session credential goes is not the app token either.
    as_bearer = client.patch(
        "/whoami/app",
        data=b'{"role": "admin"}',
        headers={
            "Authorization": f"Bearer {APP_TOKEN}",
            "X-Session-Token": user.token,
            "Content-Type": "application/json",
        },
    )
    assert as_bearer.status_code == 401
    assert _app_section(client, user.token) == {"role": "reader"}
    # The app token alone names no session.
    no_session = client.patch(
        "/whoami/app",
        data=b'{"role": "admin"}',
        headers={"X-Bridge-App-Token": APP_TOKEN, "Content-Type": "application/json"},
    )
    assert no_session.status_code == 401
    assert no_session.get_json()["error"] == "session_missing"
    assert _patch(client, user.token, {"role": "admin"}).status_code == 200
    assert _app_section(client, user.token) == {"role": "admin"}


def test_without_an_app_token_configured_no_one_writes_over_http(client, kratos):
    user = flows.register(kratos)
    before = _app_section(client, user.token)
    for app_token in (None, APP_TOKEN):
        refused = _patch(client, user.token, {"role": "admin"}, app_token=app_token)
        assert refused.status_code == 403
        assert refused.get_json()["error"] == "app_writes_disabled"
        assert "BRIDGE_APP_TOKEN" in refused.get_json()["message"]
    assert _app_section(client, user.token) == before == {}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error"),
    [
        ({"cart": 1}, "text/plain", 415, "unsupported_media_type"),
        (b"{not json", "application/json", 400, "bad_request"),
        ([1, 2], "application/json", 400, "bad_request"),
        ({}, "application/json", 400, "bad_request"),
        ({"bad name": 1}, "application/json", 400, "bad_request"),
        ({"big": "x" * 70_000}, "application/json", 413, "app_data_too_large"),
        (b'{"n": 123456789012345678901234567890}', "application/json", 400, "bad_request"),
        (b'{"n": NaN}', "application/json", 400, "bad_request"),
        (b'{"n": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400, "bad_request"),
    ],
)
def test_patch_app_refuses_bad_writes_and_writes_nothing(
    app_client, kratos, body, content_type, status, error
):
    client = app_client
    user = flows.register(kratos)
    assert _patch(client, user.token, {"kept": 1}).status_code == 200
    response = _patch(client, user.token, body, content_type)
    assert response.status_code == status
    assert response.get_json()["error"] == error
    assert _app_section(client, user.token) == {"kept": 1}


def test_patch_app_needs_a_live_session(make_client, kratos):
    """A revoked session is refused within BRIDGE_REVALIDATE_AFTER (0 here: at once), and
    its app data went with its mirror: a write cannot bring it back."""
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER="0", BRIDGE_APP_TOKEN=APP_TOKEN)
    assert _patch(client, "ory_st_" + "n" * 32, {"x": 1}).status_code == 401
    user = flows.register(kratos)
    session_id = _patch(client, user.token, {"x": 1}).get_json()["session_id"]
    assert httpx.delete(f"{kratos.admin_url}/admin/sessions/{session_id}").status_code == 204
    assert _patch(client, user.token, {"x": 2}).status_code == 401


def test_whoami_gives_a_csrf_token_per_session(client, kratos):
    first, second = flows.register(kratos), flows.register(kratos)
    token_a = client.get("/whoami", headers={"X-Session-Token": first.token}).get_json()
    again = client.get("/whoami", headers={"X-Session-Token": first.token}).get_json()
    token_b = client.get("/whoami", headers={"X-Session-Token": second.token}).get_json()
    assert token_a["csrf_token"] and len(token_a["csrf_token"]) >= 40
    assert again["csrf_token"] == token_a["csrf_token"]
    assert token_b["csrf_token"] != token_a["csrf_token"]

"""What only a real server shows: raw header bytes, repeated headers, and methods.

Each case is sent both to ``kratos-bridge serve`` and to the real Kratos, and the
bridge must give Kratos's answer, or the documented stricter one.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer


@pytest.fixture(scope="module")
def bridge(kratos, workdir):
    server = BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
        },
        workdir,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def user_cookie(kratos):
    user = flows.register(kratos)
    return user, flows.browser_login(kratos, user)


def _both(kratos, bridge, headers, path="/auth"):
    direct = httpx.get(kratos.public_url + "/sessions/whoami", headers=headers)
    through = httpx.get(bridge.url + path, headers=headers)
    return direct, through


@pytest.mark.parametrize(
    "other",
    [
        "other=\u00e9".encode(),  # another app's UTF-8 cookie
        b"other=\xe9",  # a Latin-1 byte
        "caf\u00e9=1".encode(),  # a non-ASCII cookie name
        b"other=a\\b",  # a byte Go refuses in a cookie value
        b"broken",  # a pair without "="
    ],
    ids=["utf8_value", "latin1_value", "utf8_name", "backslash", "no_equals"],
)
@pytest.mark.parametrize("order", ["before", "after"])
def test_other_cookies_kratos_skips_do_not_hide_the_session(
    kratos, bridge, user_cookie, other, order
):
    user, cookie = user_cookie
    session = f"ory_kratos_session={cookie}".encode()
    header = other + b"; " + session if order == "before" else session + b"; " + other
    direct, through = _both(kratos, bridge, {"Cookie": header})
    assert direct.status_code == 200
    assert through.status_code == 200, through.text
    assert through.headers["X-User-Id"] == user.identity_id


def test_non_ascii_inside_the_session_cookie_is_kratos_answer(kratos, bridge, user_cookie):
    _, cookie = user_cookie
    header = f"ory_kratos_session={cookie}\u00e9".encode()
    direct, through = _both(kratos, bridge, {"Cookie": header})
    assert direct.status_code == through.status_code == 401


def test_cookies_in_two_header_lines_are_read_like_one(kratos, bridge, user_cookie):
    user, cookie = user_cookie
    headers = [("Cookie", "theme=dark"), ("Cookie", f"ory_kratos_session={cookie}")]
    direct, through = _both(kratos, bridge, headers)
    assert (direct.status_code, through.status_code) == (200, 200)
    assert through.headers["X-User-Id"] == user.identity_id


@pytest.mark.parametrize("name", ["X-Session-Token", "Authorization"])
def test_repeated_credential_header_is_refused(kratos, bridge, name):
    """Kratos takes the first value; the bridge refuses the request (documented: which
    of two credentials a confused client meant is not for the bridge to guess)."""
    user, other = flows.register(kratos), flows.register(kratos)
    prefix = "Bearer " if name == "Authorization" else ""
    headers = [(name, prefix + user.token), (name, prefix + other.token)]
    direct, through = _both(kratos, bridge, headers)
    assert direct.status_code == 200
    assert through.status_code == 401
    assert through.json()["error"] == "session_invalid"
    assert "repeated" in through.json()["message"]
    assert "X-User-Id" not in through.headers
    assert httpx.get(bridge.url + "/whoami", headers=headers).status_code == 401


def test_valid_token_beside_malformed_cookie_is_answered_from_the_token(kratos, bridge):
    """Kratos ranks X-Session-Token first but answers this pair with a 500 of its own
    (v1.3.1); the bridge asks Kratos with the token alone and answers from it."""
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token, "Cookie": "ory_kratos_session=not-a-cookie"}
    direct, through = _both(kratos, bridge, headers)
    assert direct.status_code == 500
    assert through.status_code == 200
    assert through.headers["X-User-Id"] == user.identity_id


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("OPTIONS", "/whoami"),
        ("POST", "/whoami"),
        ("DELETE", "/whoami"),
        ("OPTIONS", "/health/ready"),
        ("POST", "/health/alive"),
        ("OPTIONS", "/health/alive"),
    ],
)
def test_routes_answer_only_their_methods(kratos, bridge, method, path):
    user = flows.register(kratos)
    for headers in ({}, {"X-Session-Token": user.token}):
        response = httpx.request(method, bridge.url + path, headers=headers)
        assert response.status_code == 405
        assert response.json()["error"] == "method_not_allowed"
        assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
        assert "X-User-Id" not in response.headers


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_auth_answers_every_method_alike(kratos, bridge, method):
    """Envoy's ext_authz keeps the original method; without rules the decision does not
    depend on it."""
    user = flows.register(kratos)
    allowed = httpx.request(method, bridge.url + "/auth", headers={"X-Session-Token": user.token})
    assert allowed.status_code == 200
    assert allowed.headers["X-User-Id"] == user.identity_id
    origin = {"Host": "app.test", "X-Forwarded-Proto": "https"}
    envoy = httpx.request(method, bridge.url + "/ext-authz/app/path?x=1", headers=origin)
    assert envoy.status_code == 401


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/whoami", 200),
        ("/health/ready", 200),
        ("/health/alive", 200),
        ("/auth", 200),
        ("/nope", 404),
    ],
)
def test_head_gets_the_get_status_without_a_body(kratos, bridge, path, status):
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    response = httpx.head(bridge.url + path, headers=headers, timeout=5)
    assert response.status_code == status
    assert response.content == b""
    get = httpx.get(bridge.url + path, headers=headers, timeout=5)
    assert get.status_code == status
    assert response.headers.get("content-length") == get.headers.get("content-length")


def test_envoy_check_request_as_envoy_sends_it(kratos, bridge):
    """The HTTP check request Envoy's ext_authz filter sends (path_prefix /ext-authz): the
    original method, :authority as Host, the prefix and the original path and query, an
    empty body, its own x-envoy header, and the headers listed in allowed_headers."""
    user = flows.register(kratos)
    envoy = {
        "Host": "app.example.test",
        "Content-Length": "0",
        "x-envoy-expected-rq-timeout-ms": "3000",
        "x-forwarded-proto": "https",
        "accept": "text/html",
    }
    url = bridge.url + "/ext-authz/orders/42?view=full"
    allowed = httpx.delete(url, headers={**envoy, "x-session-token": user.token})
    assert allowed.status_code == 200
    assert allowed.headers["X-User-Id"] == user.identity_id
    refused = httpx.delete(url, headers=envoy)
    assert refused.status_code == 303
    assert refused.headers["Location"].startswith(kratos.public_url + "/self-service/login/")
    api = httpx.delete(url, headers={**envoy, "accept": "application/json"})
    assert api.status_code == 401
    assert api.json()["error"] == "session_missing"

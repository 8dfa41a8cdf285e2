"""Kratos answers the bridge must not trust: a real whoami body with one field broken,
junk, and a 429. A real Kratos cannot be made to answer these, so a stand-in does:
``StandInKratos`` (tests/support) is a FAKE, named as such, serving a canned answer per token."""

from __future__ import annotations

import copy
import json

import pytest

from bridge.web.app import create_app
from tests.conftest import bridge_settings
from tests.support import kratos_flows as flows
from tests.support.harness import forwarded
from tests.support.stand_in_kratos import StandInKratos


@pytest.fixture
def stand_in():
    server = StandInKratos()
    yield server
    server.close()


@pytest.fixture(scope="module")
def real_body(kratos) -> dict:
    """A whoami body exactly as the real Kratos gives it."""
    user = flows.register(kratos)
    body = flows.session_of(kratos, token=user.token).json()
    assert body["devices"] and body["authentication_methods"]
    return body


def _broken(body: dict, path: str, value) -> bytes:
    broken = copy.deepcopy(body)
    *parents, last = path.split(".")
    target = broken
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return json.dumps(broken).encode()


_DELETE = object()

BREAKAGES = {
    "traits_a_string": ("identity.traits", "a@example.com"),
    "methods_an_object": ("authentication_methods", {"method": "password"}),
    "method_name_a_number": ("authentication_methods.0.method", 7),
    "method_aal_unknown": ("authentication_methods.0.aal", "aal9"),
    "method_completed_at_not_a_time": ("authentication_methods.0.completed_at", "yesterday"),
    "devices_an_object": ("devices", {"ip_address": "1.2.3.4"}),
    "device_ip_a_list": ("devices.0.ip_address", ["1.2.3.4"]),
    "device_not_an_object": ("devices", ["phone"]),
    "identity_id_with_space": ("identity.id", "8d3c2a9e-6f1b-4c2d-9e7a-1b2c3d4e5f60 x"),
    "identity_id_with_crlf": ("identity.id", "8d3c2a9e\r\nX-User-Id: admin"),
    "identity_id_not_uuid": ("identity.id", "admin"),
    "identity_id_missing": ("identity.id", _DELETE),
    "session_id_with_crlf": ("id", "8d3c2a9e-6f1b-4c2d-9e7a-1b2c3d4e5f60\r\n"),
    "session_id_a_number": ("id", 12),
    "identity_a_list": ("identity", []),
    "aal_unknown": ("authenticator_assurance_level", "aal9"),
    "not_active": ("active", False),
    "expires_at_missing": ("expires_at", _DELETE),
    "expires_at_no_zone": ("expires_at", "2099-01-01T00:00:00"),
    "authenticated_at_a_number": ("authenticated_at", 1700000000),
    "schema_id_an_object": ("identity.schema_id", {}),
}
JUNK = {
    "not_json": b"not json",
    "a_list": b"[]",
    "not_utf8": b'{"id": "\xff"}',
    "deep": b"[" * 100_000,
}


def _client(stand_in, redis_server, prefix):
    settings = bridge_settings(stand_in, redis_server.url, prefix)
    return create_app(settings).test_client(use_cookies=False)


def test_odd_bodies_are_503_never_500_never_an_allow(stand_in, real_body, redis_server, prefix):
    bodies = {name: _broken(real_body, *how) for name, how in BREAKAGES.items()} | JUNK
    tokens = {}
    for index, (name, body) in enumerate(bodies.items()):
        tokens[name] = f"ory_st_{index:032d}"
        stand_in.answers[tokens[name]] = (200, {}, body)
    control = "ory_st_" + "c" * 32
    stand_in.answers[control] = (200, {}, json.dumps(real_body).encode())
    client = _client(stand_in, redis_server, prefix)

    allowed = client.get("/auth", headers={"X-Session-Token": control})
    assert allowed.status_code == 200  # the stand-in's real body is accepted as it is
    assert allowed.headers["X-User-Id"] == real_body["identity"]["id"]
    for name, token in tokens.items():
        for path in ("/auth", "/whoami"):
            response = client.get(path, headers={"X-Session-Token": token})
            assert response.status_code == 503, (name, path, response.get_data())
            assert response.get_json()["error"] == "kratos_unavailable", name
            assert "X-User-Id" not in response.headers, name


def test_kratos_429_passes_retry_after_on_and_is_not_a_login(stand_in, redis_server, prefix):
    token = "ory_st_" + "r" * 32
    stand_in.answers[token] = (429, {"Retry-After": "7"}, b'{"error":{"code":429}}')
    client = _client(stand_in, redis_server, prefix)

    auth = client.get("/auth", headers={"X-Session-Token": token})
    assert auth.status_code == 503  # never a 401: that would send the browser to log in
    assert auth.headers["Retry-After"] == "7"
    assert auth.get_json()["error"] == "kratos_rate_limited"
    assert "X-Bridge-Redirect" not in auth.headers

    whoami = client.get("/whoami", headers={"X-Session-Token": token})
    assert whoami.status_code == 429
    assert whoami.headers["Retry-After"] == "7"

    # Traefik, Caddy and Envoy pass the auth answer to the client as it is: a 429 fits.
    browser = {"X-Session-Token": token, "Accept": "text/html"}
    envoy = {"Host": "app.test", "X-Forwarded-Proto": "https"}
    for path, headers in (("/forward-auth", forwarded()), ("/ext-authz/page", envoy)):
        response = client.get(path, headers={**browser, **headers})
        assert response.status_code == 429, path
        assert response.headers["Retry-After"] == "7"
        assert response.get_json()["error"] == "kratos_rate_limited"
        assert "Location" not in response.headers

    # A 429 is not a rejection: the credential is asked about again, not negative-cached.
    asked = stand_in.asked.count(token)
    assert client.get("/auth", headers={"X-Session-Token": token}).status_code == 503
    assert stand_in.asked.count(token) == asked + 1


def test_unusable_retry_after_becomes_one_second(stand_in, redis_server, prefix):
    token = "ory_st_" + "q" * 32
    stand_in.answers[token] = (429, {"Retry-After": "soon\x7f"}, b"{}")
    client = _client(stand_in, redis_server, prefix)
    assert client.get("/whoami", headers={"X-Session-Token": token}).headers["Retry-After"] == "1"


def test_without_retry_after_ory_networks_reset_is_passed_on(stand_in, redis_server, prefix):
    """Ory Network says when its rate-limit window ends in ``x-ratelimit-reset``."""
    token = "ory_st_" + "o" * 32
    stand_in.answers[token] = (
        429,
        {"x-ratelimit-reset": "12", "x-ratelimit-remaining": "0"},
        b"{}",
    )
    client = _client(stand_in, redis_server, prefix)
    assert client.get("/whoami", headers={"X-Session-Token": token}).headers["Retry-After"] == "12"


def test_a_step_up_url_that_is_no_url_leaves_the_browser_to_the_login(
    stand_in, redis_server, prefix
):
    """Kratos's 403 may say where the browser steps up; "https://[" is visible ASCII after
    a scheme, and no URL (urlsplit refuses it; the fuzz run found it): the step-up goes to
    the login URL at aal2, not to a 500."""
    token = "ory_st_" + "u" * 32
    stand_in.answers[token] = (403, {}, b'{"redirect_browser_to":"https://["}')
    client = _client(stand_in, redis_server, prefix)

    response = client.get("/auth", headers={"X-Session-Token": token})
    assert response.status_code == 401, response.get_data()
    body = response.get_json()
    assert body["error"] == "aal2_required"
    login = f"{stand_in.public_url}/self-service/login/browser?aal=aal2"
    assert body["redirect_browser_to"] == login
    assert response.headers["X-Bridge-Redirect"] == login

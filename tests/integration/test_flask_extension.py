"""bridge.flask: ``flask.session`` as the app section of the Kratos session the proxy vouched for.

Everything real: Kratos, Redis, and the bridge as a process (``kratos-bridge serve``) with
its JWT on. A test gets the proxy's hand-off the way Traefik does, from the bridge's
``/forward-auth``, and passes its ``X-Bridge-Jwt`` and ``X-Session-Id`` to a Flask app
using the extension (the Flask test client, each app with its own Redis client); the last
test runs the demo app as a process behind the real nginx with config/nginx/bridge.conf.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import unescape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import flask
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from werkzeug.test import EnvironBuilder

import bridge.flask as bridge_flask
from bridge.flask import (
    KratosSession,
    SessionMissing,
    csrf_protect,
    csrf_token,
    current_identity,
    require_aal2,
    require_recent_login,
    session_ended,
)
from bridge.pipeline.tokens import KeyRing, generate_key
from tests.conftest import SECRET
from tests.support import kratos_flows as flows
from tests.support.harness import (
    BridgeServer,
    Kratos,
    RedisServer,
    forwarded,
    free_port,
    start_demo,
    stop_process,
    wait_until,
)
from tests.support.proxies import Addresses, start_proxy

PREFIX = "flaskext:"
SHARED_SECRET = "proxy-secret-" + "y" * 32
LOGIN_URL = "http://127.0.0.1:4433/self-service/login/browser"
BROWSER = {
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Sec-Fetch-Mode": "navigate",
}
API = {"Accept": "application/json"}
AUDIENCE = "flask-tests"  # BRIDGE_JWT_AUDIENCE: the audience of a route without its own
# Two apps behind one bridge, each host's rule with its own JWT audience.
RULES = """
rules:
  - {match: {host: app-a.test}, access: authenticated, jwt_audience: app-a}
  - {match: {host: app-b.test}, access: authenticated, jwt_audience: app-b}
"""


@dataclass
class Bridge:
    server: BridgeServer
    keys_dir: Path
    redis_url: str
    prefix: str

    @property
    def jwks_url(self) -> str:
        return self.server.url + "/.well-known/jwks.json"

    def hand_off(self, token: str, query: str = "", host: str = "app.test") -> dict[str, str]:
        """What a proxy passes to the app after the bridge's 200: the JWT and the session id."""
        response = self.forward_auth(token, query, host)
        assert response.status_code == 200, (response.status_code, response.text)
        return {
            "X-Bridge-Jwt": response.headers["X-Bridge-Jwt"],
            "X-Session-Id": response.headers["X-Session-Id"],
        }

    def forward_auth(self, token: str, query: str = "", host: str = "app.test") -> httpx.Response:
        headers = {**forwarded(proto="http", host=host), "X-Session-Token": token}
        return httpx.get(f"{self.server.url}/forward-auth{query}", headers=headers)


def start_bridge(kratos: Kratos, redis_url: str, home: Path, prefix: str) -> Bridge:
    keys_dir = home / "jwt"
    generate_key(keys_dir)
    rules = home / "rules.yml"
    rules.write_text(RULES)
    server = BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
            "BRIDGE_REDIS_URL": redis_url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": prefix,
            "BRIDGE_WORKERS": "1",
            "BRIDGE_REVALIDATE_AFTER": "1",
            "BRIDGE_LOGIN_URL": LOGIN_URL,
            "BRIDGE_JWT_HEADER": "X-Bridge-Jwt",
            "BRIDGE_JWT_KEYS_DIR": str(keys_dir),
            "BRIDGE_JWT_AUDIENCE": AUDIENCE,
            "BRIDGE_RULES_FILE": str(rules),
        },
        home,
    )
    return Bridge(server, keys_dir, redis_url, prefix)


@pytest.fixture(scope="module")
def bridge(kratos: Kratos, redis_server: RedisServer, workdir: Path) -> Iterator[Bridge]:
    home = workdir / "flask-extension"
    home.mkdir(exist_ok=True)
    running = start_bridge(kratos, redis_server.url, home, PREFIX)
    yield running
    running.server.stop()


def build_app(bridge: Bridge, trust: str = "jwt", **config: object) -> flask.Flask:
    """A small app using the extension, as an app author would write it."""
    app = flask.Flask(__name__)
    app.config.update(
        TESTING=True,
        KRATOS_SESSION_REDIS_URL=bridge.redis_url,
        KRATOS_SESSION_KEY_PREFIX=bridge.prefix,
        KRATOS_SESSION_TRUST=trust,
        KRATOS_SESSION_LOGIN_URL=LOGIN_URL,
    )
    if trust == "jwt":
        app.config["KRATOS_SESSION_JWKS_URL"] = bridge.jwks_url
        app.config["KRATOS_SESSION_JWT_AUDIENCE"] = AUDIENCE
    if trust == "header":
        app.config["KRATOS_SESSION_SHARED_SECRET"] = SHARED_SECRET
    app.config.update(config)
    KratosSession(app)

    @app.get("/me")
    def me():
        if not current_identity:
            return {"identity": None}
        return {
            "identity": {
                "id": current_identity.id,
                "email": current_identity.traits.get("email"),
                "schema_id": current_identity.schema_id,
                "aal": current_identity.aal,
                "methods": list(current_identity.authentication_methods),
                "authenticated_at": current_identity.authenticated_at.isoformat(),
                "session_id": current_identity.session_id,
            }
        }

    @app.post("/count")
    def count_up():
        flask.session["count"] = flask.session.get("count", 0) + 1
        return {"count": flask.session["count"]}

    @app.get("/count")
    def count():
        return {"count": flask.session.get("count")}

    @app.post("/cart/<sku>")
    def add_to_cart(sku: str):
        flask.session.setdefault("cart", [])
        flask.session["cart"].append(sku)
        return {"cart": flask.session["cart"]}

    @app.post("/forget")
    def forget():
        flask.session.clear()
        return {"left": dict(flask.session)}

    @app.post("/flash")
    def flash():
        flask.flash("saved", "info")
        return {"ok": True}

    @app.get("/flashes")
    def flashes():
        return {"flashes": flask.get_flashed_messages(with_categories=True)}

    @app.get("/aal2")
    @require_aal2
    def second_factor_page():
        return {"ok": True}

    @app.get("/recent")
    @require_recent_login(timedelta(seconds=2))
    def recent_login_page():
        return {"ok": True}

    @app.route("/transfer", methods=["GET", "POST"])
    @csrf_protect
    def transfer():
        return {"ok": True, "method": flask.request.method}

    @app.get("/csrf")
    def token():
        return {"csrf_token": csrf_token()}

    return app


@pytest.fixture
def make_app(bridge: Bridge) -> Iterator[Callable[..., flask.Flask]]:
    apps: list[flask.Flask] = []

    def make(trust: str = "jwt", **config: object) -> flask.Flask:
        app = build_app(bridge, trust, **config)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["kratos_session"].client.close()


def get(app: flask.Flask, path: str, headers: dict[str, str] | None = None):
    return app.test_client().get(path, headers=headers or {})


def post(app: flask.Flask, path: str, headers: dict[str, str] | None = None, **kwargs):
    return app.test_client().post(path, headers=headers or {}, **kwargs)


def wait_for_aal2(bridge: Bridge, token: str) -> dict[str, str]:
    """The bridge learns a step-up the next time it asks Kratos: ``?aal=aal2`` makes it ask."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        response = bridge.forward_auth(token, "?aal=aal2")
        if response.status_code == 200:
            assert response.headers["X-User-Aal"] == "aal2"
            return bridge.hand_off(token)
        time.sleep(0.2)
    raise AssertionError("the bridge never saw the session at aal2")


def wait_until_refused(bridge: Bridge, token: str) -> None:
    """Until the bridge has asked Kratos again (BRIDGE_REVALIDATE_AFTER=1) and been told no."""
    deadline = time.monotonic() + 10
    while bridge.forward_auth(token).status_code != 401:
        assert time.monotonic() < deadline, "the bridge never noticed the revocation"
        time.sleep(0.2)


# Identity


def test_the_identity_is_the_sessions_the_jwt_names(make_app, bridge, kratos):
    app = make_app()
    user = flows.register(kratos)
    hand_off = bridge.hand_off(user.token)
    identity = get(app, "/me", hand_off).get_json()["identity"]
    assert identity["id"] == user.identity_id
    assert identity["email"] == user.email
    assert identity["schema_id"] == "default"
    assert identity["aal"] == "aal1"
    assert identity["methods"] == ["password"]
    assert identity["session_id"] == hand_off["X-Session-Id"]
    authenticated_at = datetime.fromisoformat(identity["authenticated_at"])
    assert timedelta(0) <= datetime.now(UTC) - authenticated_at < timedelta(minutes=1)


def test_a_request_without_a_hand_off_has_no_session_and_cannot_write_one(make_app):
    app = make_app()
    assert get(app, "/me").get_json() == {"identity": None}
    assert get(app, "/count").get_json() == {"count": None}
    with pytest.raises(SessionMissing, match="no Kratos session"):
        post(app, "/count")
    assert post(app, "/forget").get_json() == {"left": {}}  # nothing to remove is no error


# Data: across requests, app processes, and the session's life


def test_a_counter_persists_across_requests_and_app_instances(make_app, bridge, kratos):
    first, second = make_app(), make_app()  # two apps, two Redis clients: two processes' worth
    hand_off = bridge.hand_off(flows.register(kratos).token)
    counted = post(first, "/count", hand_off)
    assert counted.get_json() == {"count": 1}
    assert "Cookie" in counted.headers["Vary"]  # what a user sees follows their Kratos cookie
    assert post(first, "/count", hand_off).get_json() == {"count": 2}
    assert post(second, "/count", hand_off).get_json() == {"count": 3}
    assert get(first, "/count", hand_off).get_json() == {"count": 3}
    # flask.flash keeps its messages in the session too, shown once.
    post(first, "/flash", hand_off)
    assert get(second, "/flashes", hand_off).get_json() == {"flashes": [["info", "saved"]]}
    assert get(first, "/flashes", hand_off).get_json() == {"flashes": []}
    # Another user's session holds its own data.
    other = bridge.hand_off(flows.register(kratos).token)
    assert get(second, "/count", other).get_json() == {"count": None}


def test_the_app_writes_what_the_user_cannot(make_app, bridge, kratos):
    """The extension writes through Redis (the app's credential); the user's own session
    alone cannot write the same section through the bridge's ``PATCH /whoami/app``."""
    app = make_app()
    user = flows.register(kratos)
    hand_off = bridge.hand_off(user.token)
    assert post(app, "/count", hand_off).get_json() == {"count": 1}
    by_the_user = httpx.patch(
        bridge.server.url + "/whoami/app",
        headers={"X-Session-Token": user.token, "Content-Type": "application/json"},
        content=b'{"count": 1000}',
    )
    assert by_the_user.status_code == 403
    assert by_the_user.json()["error"] == "app_writes_disabled"
    assert get(app, "/count", hand_off).get_json() == {"count": 1}
    whoami = httpx.get(bridge.server.url + "/whoami", headers={"X-Session-Token": user.token})
    assert whoami.json()["app"] == {"count": 1}


def test_only_the_fields_a_request_changed_are_written(make_app, bridge, kratos):
    app = make_app()
    hand_off = bridge.hand_off(flows.register(kratos).token)
    post(app, "/cart/apple", hand_off)
    post(app, "/count", hand_off)
    interface = app.session_interface

    def open_session():
        request = app.request_class(EnvironBuilder(headers=hand_off).get_environ())
        return interface.open_session(app, request)

    # Two requests overlap: each saves only what it changed, so neither undoes the other.
    slow, quick = open_session(), open_session()
    quick["count"] = 10
    interface.save_session(app, quick, app.response_class())
    slow["cart"].append("pear")  # changed in place: no session.modified needed
    slow["note"] = "hi"
    interface.save_session(app, slow, app.response_class())
    assert get(app, "/count", hand_off).get_json() == {"count": 10}
    session = open_session()
    assert dict(session) == {"cart": ["apple", "pear"], "count": 10, "note": "hi"}

    assert post(app, "/forget", hand_off).get_json() == {"left": {}}
    assert dict(open_session()) == {}


def test_data_is_gone_once_kratos_revokes_the_session(
    make_app, bridge, kratos, redis_server, caplog
):
    app = make_app()
    user = flows.register(kratos)
    hand_off = bridge.hand_off(user.token)
    post(app, "/count", hand_off)
    interface = app.session_interface
    request = app.request_class(EnvironBuilder(headers=hand_off).get_environ())
    in_flight = interface.open_session(app, request)  # a request that started before

    deleted = httpx.delete(f"{kratos.admin_url}/admin/sessions/{hand_off['X-Session-Id']}")
    assert deleted.status_code == 204
    wait_until_refused(bridge, user.token)

    # The JWT is still within its lifetime; the session it names is gone.
    assert get(app, "/me", hand_off).get_json() == {"identity": None}
    assert get(app, "/count", hand_off).get_json() == {"count": None}
    assert get(app, "/aal2", {**hand_off, **API}).get_json()["error"] == "session_missing"
    # The request in flight saves into an ended session: nothing is written, one error line.
    in_flight["count"] = 99
    with caplog.at_level(logging.ERROR, logger="bridge.flask"):
        interface.save_session(app, in_flight, app.response_class())
    assert "ended before this request's changes were saved; dropped field(s): count" in caplog.text
    session_id = hand_off["X-Session-Id"]
    assert not redis_server.client.exists(f"{PREFIX}{{{session_id}}}:app")


def test_session_ended_is_sent_once_when_a_session_ends(make_app, bridge, kratos):
    app = make_app()
    received: list[tuple[flask.Flask, str, str, str]] = []

    def failing(sender: flask.Flask, ended: bridge_flask.EndedSession) -> None:
        raise RuntimeError("a receiver's own trouble")

    def receiver(sender: flask.Flask, ended: bridge_flask.EndedSession) -> None:
        received.append((sender, ended.session_id, ended.identity_id, ended.reason))

    session_ended.connect(failing, app)
    session_ended.connect(receiver, app)
    try:
        user = flows.register(kratos)
        hand_off = bridge.hand_off(user.token)
        get(app, "/me", hand_off)  # the first request starts the follower
        deleted = httpx.delete(f"{kratos.admin_url}/admin/sessions/{hand_off['X-Session-Id']}")
        assert deleted.status_code == 204
        wait_until_refused(bridge, user.token)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a second event, if there were one, would be in by now
    finally:
        session_ended.disconnect(failing, app)
        session_ended.disconnect(receiver, app)
    session_id = hand_off["X-Session-Id"]
    assert received == [(app, session_id, user.identity_id, "rejected")]


def test_a_save_the_store_refuses_fails_the_request(make_app, bridge, kratos):
    app = make_app(KRATOS_SESSION_MAX_BYTES="300", PROPAGATE_EXCEPTIONS=False)
    hand_off = bridge.hand_off(flows.register(kratos).token)

    @app.post("/big")
    def big():
        flask.session["blob"] = "x" * 400
        return {"saved": True}

    @app.post("/set")
    def not_json():
        flask.session["pair"] = {1, 2}
        return {"saved": True}

    for path in ("/big", "/set"):
        response = post(app, path, hand_off)
        assert response.status_code == 500, path
        assert b"saved" not in response.data and b"Traceback" not in response.data
    assert get(app, "/count", hand_off).status_code == 200
    assert app.extensions["kratos_session"].client.app(hand_off["X-Session-Id"]) == {}


@pytest.fixture(scope="module")
def short_sessions(workdir: Path, redis_server: RedisServer) -> Iterator[tuple[Kratos, Bridge]]:
    """Kratos whose sessions last 5 seconds, with a bridge of its own."""
    home = workdir / "flask-extension-short"
    home.mkdir(exist_ok=True)
    kratos = Kratos(workdir, lifespan="5s")
    running = start_bridge(kratos, redis_server.url, home, "flaskext-short:")
    yield kratos, running
    running.server.stop()
    kratos.stop()


def test_data_expires_with_the_session(short_sessions, redis_server):
    kratos, bridge = short_sessions
    user = flows.register(kratos)
    started = time.monotonic()
    hand_off = bridge.hand_off(user.token)
    session_id = hand_off["X-Session-Id"]
    # Trusted by a shared secret, so that only the store decides (a JWT expires with it too).
    app = build_app(bridge, "header")
    vouched = {"X-Bridge-Secret": SHARED_SECRET, "X-Session-Id": session_id}
    try:
        assert post(app, "/count", vouched).get_json() == {"count": 1}
        app_key = f"{bridge.prefix}{{{session_id}}}:app".encode()
        assert redis_server.client.exists(app_key)
        while time.monotonic() - started < 6:
            time.sleep(0.2)
        assert not redis_server.client.exists(app_key)
        assert get(app, "/count", vouched).get_json() == {"count": None}
        assert get(app, "/me", {**hand_off, **vouched}).get_json() == {"identity": None}
        jwt_app = build_app(bridge)
        assert get(jwt_app, "/me", hand_off).get_json() == {"identity": None}
        jwt_app.extensions["kratos_session"].client.close()
    finally:
        app.extensions["kratos_session"].client.close()


# Trust: only a hand-off from the proxy names a session


def test_header_trust_needs_the_proxys_secret(make_app, bridge, kratos):
    app = make_app("header")
    session_id = bridge.hand_off(flows.register(kratos).token)["X-Session-Id"]
    vouched = {"X-Bridge-Secret": SHARED_SECRET, "X-Session-Id": session_id}
    assert get(app, "/me", vouched).get_json()["identity"]["session_id"] == session_id
    for forged in (
        {"X-Session-Id": session_id},
        {"X-Bridge-Secret": SHARED_SECRET[:-1] + "z", "X-Session-Id": session_id},
        {"X-Bridge-Secret": "", "X-Session-Id": session_id},
        {"X-Bridge-Secret": SHARED_SECRET, "X-Session-Id": session_id + "x"},
    ):
        assert get(app, "/me", forged).get_json() == {"identity": None}, forged
        refused = get(app, "/aal2", {**forged, **API})
        assert refused.status_code == 401
        assert refused.get_json()["error"] == "session_missing"
    # A JWT is not what this mode believes.
    assert get(app, "/me", {"X-Session-Id": session_id, "X-Bridge-Jwt": "x"}).get_json() == {
        "identity": None
    }


def test_jwt_trust_believes_only_the_bridges_signature(make_app, bridge, kratos):
    app = make_app()
    user, other = flows.register(kratos), flows.register(kratos)
    hand_off = bridge.hand_off(user.token)
    session_id = hand_off["X-Session-Id"]
    real = jwt.decode(hand_off["X-Bridge-Jwt"], options={"verify_signature": False})
    now = int(time.time())
    claims = {**real, "iat": now, "exp": now + 60}
    bridge_key = KeyRing(bridge.keys_dir).signing_key()

    def signed_by_bridge(**changes: object) -> str:
        return jwt.encode(
            {**claims, **changes}, bridge_key.private_key, "ES256", headers={"kid": bridge_key.kid}
        )

    def me(token: str) -> object:
        return get(app, "/me", {"X-Bridge-Jwt": token, "X-Session-Id": session_id}).get_json()

    # The bridge's own key, the right claims: the session.
    assert me(signed_by_bridge())["identity"]["id"] == user.identity_id
    # Another key, under a kid of its own or the bridge's.
    stranger = ec.generate_private_key(ec.SECP256R1())
    for kid in ("another-key", bridge_key.kid):
        forged = jwt.encode(claims, stranger, "ES256", headers={"kid": kid})
        assert me(forged) == {"identity": None}, kid
    # No JWT at all: X-Session-Id alone is not believed.
    assert get(app, "/me", {"X-Session-Id": session_id}).get_json() == {"identity": None}
    assert me("not-a-jwt") == {"identity": None}
    # The bridge's key, but claims this app must not accept.
    assert me(signed_by_bridge(exp=now - 60)) == {"identity": None}
    assert me(signed_by_bridge(iss="someone-else")) == {"identity": None}
    assert me(signed_by_bridge(aud="another-app")) == {"identity": None}
    assert me(signed_by_bridge(sub=other.identity_id)) == {"identity": None}
    assert me(signed_by_bridge(sid="../../x")) == {"identity": None}
    # Not ES256: HS256 keyed with the public JWK's text is the classic confusion.
    confused = jwt.encode(claims, "x" * 32, "HS256", headers={"kid": bridge_key.kid})
    assert me(confused) == {"identity": None}
    refused = get(app, "/aal2", {"X-Bridge-Jwt": confused, **API})
    assert refused.status_code == 401


def test_a_token_for_one_apps_routes_is_refused_by_another_apps_extension(make_app, bridge, kratos):
    """Each app wants its own audience, and the bridge's rules give each app's routes
    theirs: a token handed to app A (or a leaked one) opens no session at app B."""
    app_a = make_app(KRATOS_SESSION_JWT_AUDIENCE="app-a")
    app_b = make_app(KRATOS_SESSION_JWT_AUDIENCE="app-b")
    user = flows.register(kratos)
    for_a = bridge.hand_off(user.token, host="app-a.test")
    for_b = bridge.hand_off(user.token, host="app-b.test")
    elsewhere = bridge.hand_off(user.token)  # no rule of its own: BRIDGE_JWT_AUDIENCE

    def aud(hand_off: dict[str, str]) -> object:
        return jwt.decode(hand_off["X-Bridge-Jwt"], options={"verify_signature": False})["aud"]

    assert (aud(for_a), aud(for_b), aud(elsewhere)) == ("app-a", "app-b", AUDIENCE)
    assert get(app_a, "/me", for_a).get_json()["identity"]["id"] == user.identity_id
    assert get(app_b, "/me", for_b).get_json()["identity"]["id"] == user.identity_id
    assert get(app_b, "/me", for_a).get_json() == {"identity": None}
    assert get(app_a, "/me", for_b).get_json() == {"identity": None}
    for app in (app_a, app_b):
        assert get(app, "/me", elsewhere).get_json() == {"identity": None}

    # Signed by the bridge but without an aud: no app takes it.
    key = KeyRing(bridge.keys_dir).signing_key()
    claims = jwt.decode(for_a["X-Bridge-Jwt"], options={"verify_signature": False})
    del claims["aud"]
    no_aud = jwt.encode(claims, key.private_key, "ES256", headers={"kid": key.kid})
    assert get(app_a, "/me", {"X-Bridge-Jwt": no_aud}).get_json() == {"identity": None}


def test_what_cannot_be_checked_is_503_not_a_missing_session(bridge, kratos):
    hand_off = bridge.hand_off(flows.register(kratos).token)
    closed = f"http://127.0.0.1:{free_port()}"
    no_jwks = build_app(bridge, KRATOS_SESSION_JWKS_URL=closed + "/.well-known/jwks.json")
    no_redis = build_app(
        bridge, "header", KRATOS_SESSION_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"
    )
    vouched = {"X-Bridge-Secret": SHARED_SECRET, "X-Session-Id": hand_off["X-Session-Id"]}
    try:
        for app, headers in ((no_jwks, hand_off), (no_redis, vouched)):
            response = get(app, "/me", headers)
            assert response.status_code == 503
            assert response.get_json()["error"] == "session_unavailable"
            assert response.headers["Retry-After"] == "1"
            # A request that claims no session needs neither.
            assert get(app, "/me").get_json() == {"identity": None}
    finally:
        for app in (no_jwks, no_redis):
            app.extensions["kratos_session"].client.close()


# Step-up and recent login, answered as the bridge answers


def test_require_aal2_steps_an_aal1_session_up_then_lets_it_in(make_app, bridge, kratos):
    app = make_app()
    user = flows.register(kratos)
    hand_off = bridge.hand_off(user.token)
    browser = get(app, "/aal2?x=1", {**hand_off, **BROWSER})
    assert browser.status_code == 302
    location = browser.headers["Location"]
    assert location.split("?")[0] == LOGIN_URL
    query = parse_qs(urlsplit(location).query)
    assert query["aal"] == ["aal2"]
    assert query["return_to"] == ["http://localhost/aal2?x=1"]
    form_post = app.test_client().post("/aal2", headers={**hand_off, **BROWSER})
    assert form_post.status_code == 405  # GET only; the decorator does not hide routing

    api = get(app, "/aal2?x=1", {**hand_off, **API})
    assert api.status_code == 401
    assert api.get_json() == {
        "error": "aal2_required",
        "message": "this page needs a second factor",
        "redirect_browser_to": location,
    }
    xhr = get(app, "/aal2", {**hand_off, **BROWSER, "X-Requested-With": "XMLHttpRequest"})
    assert xhr.status_code == 401

    flows.enable_totp(kratos, user)  # the session doing it becomes aal2
    stepped_up = wait_for_aal2(bridge, user.token)
    assert get(app, "/aal2", {**stepped_up, **API}).get_json() == {"ok": True}
    # The JWT handed off before the step-up names the same session, read as it is now.
    assert get(app, "/aal2", {**hand_off, **API}).get_json() == {"ok": True}


def test_require_recent_login_sends_an_old_login_to_log_in_again(make_app, bridge, kratos):
    app = make_app()
    hand_off = bridge.hand_off(flows.register(kratos).token)
    assert get(app, "/recent", {**hand_off, **BROWSER}).get_json() == {"ok": True}
    time.sleep(2.2)
    browser = get(app, "/recent", {**hand_off, **BROWSER})
    assert browser.status_code == 302
    query = parse_qs(urlsplit(browser.headers["Location"]).query)
    assert query["refresh"] == ["true"]
    assert query["return_to"] == ["http://localhost/recent"]
    api = get(app, "/recent", {**hand_off, **API})
    assert api.status_code == 401
    assert api.get_json()["error"] == "reauthentication_required"
    assert api.get_json()["redirect_browser_to"] == browser.headers["Location"]


def test_protected_views_without_a_session_send_browsers_to_log_in(make_app):
    app = make_app()
    for path in ("/aal2", "/recent"):
        browser = get(app, path, BROWSER)
        assert browser.status_code == 302
        location = browser.headers["Location"]
        assert location == f"{LOGIN_URL}?return_to=http%3A%2F%2Flocalhost{path.replace('/', '%2F')}"
        api = get(app, path, API)
        assert api.status_code == 401
        assert api.get_json()["error"] == "session_missing"
        assert api.headers["Cache-Control"] == "no-store"
    # A form POST is sent on with 303, as the bridge does.
    with_form = make_app()
    with_form.add_url_rule("/settings", "settings", require_aal2(lambda: "ok"), methods=["POST"])
    assert post(with_form, "/settings", BROWSER).status_code == 303
    # Without a login URL there is nowhere to send a browser: 401 JSON for everyone.
    quiet = make_app(KRATOS_SESSION_LOGIN_URL=None)
    response = get(quiet, "/aal2", BROWSER)
    assert response.status_code == 401
    assert response.get_json() == {
        "error": "session_missing",
        "message": "this page needs a Kratos session",
    }


# CSRF


def test_csrf_protect_wants_the_sessions_own_token(make_app, bridge, kratos, caplog):
    app = make_app()
    mine = bridge.hand_off(flows.register(kratos).token)
    theirs = bridge.hand_off(flows.register(kratos).token)
    my_token = get(app, "/csrf", mine).get_json()["csrf_token"]
    their_token = get(app, "/csrf", theirs).get_json()["csrf_token"]
    assert len(my_token) >= 32 and my_token != their_token
    assert get(app, "/csrf", mine).get_json()["csrf_token"] == my_token  # stable per session
    assert get(app, "/csrf").get_json() == {"csrf_token": ""}

    with caplog.at_level(logging.DEBUG):
        for headers, form in (
            (mine, None),
            (mine, {"csrf_token": ""}),
            (mine, {"csrf_token": my_token[:-1] + ("A" if my_token[-1] != "A" else "B")}),
            (mine, {"csrf_token": their_token}),
            ({**mine, "X-CSRF-Token": their_token}, None),
            ({}, {"csrf_token": my_token}),  # no session: nothing to match
        ):
            refused = post(app, "/transfer", headers, data=form)
            assert refused.status_code == 403, (headers, form)
            assert refused.get_json()["error"] == "csrf_failed"
    assert my_token not in caplog.text and their_token not in caplog.text

    assert post(app, "/transfer", mine, data={"csrf_token": my_token}).status_code == 200
    assert post(app, "/transfer", {**mine, "X-CSRF-Token": my_token}).status_code == 200
    assert get(app, "/transfer", mine).get_json() == {"ok": True, "method": "GET"}


# Start-up


def test_init_app_refuses_to_start_without_a_way_to_trust_the_proxy(bridge):
    def start(debug: bool = False, testing: bool = False, **config: object) -> flask.Flask:
        app = flask.Flask(__name__)
        app.debug, app.testing = debug, testing
        app.config.update({"KRATOS_SESSION_REDIS_URL": bridge.redis_url, **config})
        KratosSession(app)
        app.extensions["kratos_session"].client.close()
        return app

    with pytest.raises(RuntimeError, match="KRATOS_SESSION_TRUST is not set"):
        start()
    with pytest.raises(RuntimeError, match="KRATOS_SESSION_JWKS_URL is not set"):
        start(KRATOS_SESSION_TRUST="jwt")
    with pytest.raises(RuntimeError, match="KRATOS_SESSION_JWT_AUDIENCE is not set"):
        start(KRATOS_SESSION_TRUST="jwt", KRATOS_SESSION_JWKS_URL=bridge.jwks_url)
    with pytest.raises(RuntimeError, match="KRATOS_SESSION_SHARED_SECRET"):
        start(KRATOS_SESSION_TRUST="header")
    with pytest.raises(RuntimeError, match="shorter than 16"):
        start(KRATOS_SESSION_TRUST="header", KRATOS_SESSION_SHARED_SECRET="short")
    with pytest.raises(RuntimeError, match=r"only allowed with app\.testing or app\.debug"):
        start(KRATOS_SESSION_TRUST="none")
    with pytest.raises(RuntimeError, match="KRATOS_SESSION_TRUST: 'cookie' is not one of"):
        start(KRATOS_SESSION_TRUST="cookie")
    with pytest.raises(RuntimeError, match="KRATOS_SESSION_REDIS_URL is not set"):
        start(
            KRATOS_SESSION_TRUST="jwt",
            KRATOS_SESSION_JWKS_URL=bridge.jwks_url,
            KRATOS_SESSION_JWT_AUDIENCE=AUDIENCE,
            KRATOS_SESSION_REDIS_URL=None,
        )
    with pytest.raises(RuntimeError, match="KRATOS_SESSION_JWKS_URL: 'file:///etc/passwd'"):
        start(KRATOS_SESSION_TRUST="jwt", KRATOS_SESSION_JWKS_URL="file:///etc/passwd")
    with pytest.raises(RuntimeError, match="KRATOS_SESSION_MAX_BYTES"):
        start(
            KRATOS_SESSION_TRUST="jwt",
            KRATOS_SESSION_JWKS_URL=bridge.jwks_url,
            KRATOS_SESSION_JWT_AUDIENCE=AUDIENCE,
            KRATOS_SESSION_MAX_BYTES="lots",
        )
    # What does start: each mode with what it needs, numbers from the environment as text.
    start(
        KRATOS_SESSION_TRUST="jwt",
        KRATOS_SESSION_JWKS_URL=bridge.jwks_url,
        KRATOS_SESSION_JWT_AUDIENCE=AUDIENCE,
        KRATOS_SESSION_MAX_BYTES="4096",
    )
    start(KRATOS_SESSION_TRUST="header", KRATOS_SESSION_SHARED_SECRET=SHARED_SECRET)
    start(testing=True, KRATOS_SESSION_TRUST="none")


def test_trust_none_believes_any_session_id_in_tests_only(bridge, kratos, caplog):
    session_id = bridge.hand_off(flows.register(kratos).token)["X-Session-Id"]
    with caplog.at_level(logging.WARNING, logger="bridge.flask"):
        app = build_app(bridge, "none")
    assert "believed from ANY client" in caplog.text
    try:
        me = get(app, "/me", {"X-Session-Id": session_id}).get_json()
        assert me["identity"]["session_id"] == session_id
    finally:
        app.extensions["kratos_session"].client.close()


def test_the_shared_secret_may_come_from_a_file(bridge, kratos, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SHARED_SECRET + "\n")
    session_id = bridge.hand_off(flows.register(kratos).token)["X-Session-Id"]
    app = build_app(
        bridge,
        "header",
        KRATOS_SESSION_SHARED_SECRET="ignored-when-the-file-is-set",
        KRATOS_SESSION_SHARED_SECRET_FILE=str(secret_file),
    )
    try:
        vouched = {"X-Bridge-Secret": SHARED_SECRET, "X-Session-Id": session_id}
        assert get(app, "/me", vouched).get_json()["identity"]["session_id"] == session_id
    finally:
        app.extensions["kratos_session"].client.close()


# End to end: the demo app behind the real nginx


@pytest.fixture(scope="module")
def nginx_demo(bridge: Bridge, workdir: Path) -> Iterator[str]:
    """compose/demo/app.py as a process, behind nginx with config/nginx/bridge.conf."""
    port = free_port()
    demo = start_demo(
        port,
        {
            "KRATOS_SESSION_REDIS_URL": bridge.redis_url,
            "KRATOS_SESSION_KEY_PREFIX": bridge.prefix,
            "KRATOS_SESSION_TRUST": "jwt",
            "KRATOS_SESSION_JWKS_URL": bridge.jwks_url,
            "KRATOS_SESSION_JWT_AUDIENCE": AUDIENCE,
            "KRATOS_SESSION_LOGIN_URL": LOGIN_URL,
        },
        workdir / "flask-demo.log",
    )
    demo_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(demo_url + "/public/").status_code == 200, 15, "demo")
        addresses = Addresses(bridge.server.url, demo_url, LOGIN_URL.split("/self")[0])
        proxy = start_proxy("nginx", addresses, workdir / "flask-extension-nginx")
        try:
            yield proxy.url
        finally:
            proxy.stop()
    finally:
        stop_process(demo)


def test_demo_behind_nginx_reads_the_identity_and_keeps_a_counter(nginx_demo, kratos):
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    forged = {"X-Bridge-Jwt": "forged", "X-Session-Id": "forged"}
    page = httpx.get(nginx_demo + "/", headers={**headers, **forged})
    assert page.status_code == 200, page.text
    text = unescape(page.text)
    assert user.email in text and user.identity_id in text
    assert "forged" not in text  # nginx replaced the client's headers with the bridge's
    assert "Counter: 0" in text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)[1]

    refused = httpx.post(nginx_demo + "/counter", headers=headers, data={"csrf_token": "no"})
    assert refused.status_code == 403
    for _ in range(2):
        counted = httpx.post(nginx_demo + "/counter", headers=headers, data={"csrf_token": token})
        assert counted.status_code == 303
    assert "Counter: 2" in unescape(httpx.get(nginx_demo + "/", headers=headers).text)
    # Without a session nginx never reaches the app; the app's own pages agree.
    assert httpx.get(nginx_demo + "/", headers=API).status_code == 401
    aal2 = httpx.get(nginx_demo + "/aal2", headers={**headers, **API})
    assert aal2.status_code == 401
    assert aal2.json()["error"] == "aal2_required"


def test_keys_fetched_before_serve_while_the_bridge_cannot_be_asked(bridge, kratos, monkeypatch):
    """A bridge restart must not make every app request a 503: the keys fetched before
    stay usable (for JWKS_STALE_S) while the JWKS cannot be fetched."""
    monkeypatch.setattr(bridge_flask, "JWKS_LIFESPAN_S", 0.2)
    jwks = httpx.get(bridge.jwks_url).content

    class Relay(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(jwks)))
            self.end_headers()
            self.wfile.write(jwks)

        def log_message(self, *args):
            pass

    relay = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    app = build_app(
        bridge, KRATOS_SESSION_JWKS_URL=f"http://127.0.0.1:{relay.server_port}/jwks.json"
    )
    hand_off = bridge.hand_off(flows.register(kratos).token)
    try:
        assert get(app, "/me", hand_off).status_code == 200
        relay.shutdown()
        relay.server_close()
        time.sleep(0.3)  # the cached JWKS is stale now, and cannot be fetched again
        assert get(app, "/me", hand_off).status_code == 200
    finally:
        app.extensions["kratos_session"].client.close()

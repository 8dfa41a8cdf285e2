"""Sign-out through the bridge (``BRIDGE_LOGOUT_PATH``) on real bridge processes, a real
Redis and a real Kratos: a browser is sent to Kratos's logout URL and a token is logged
out with Kratos's API; either way every bridge process sharing the Redis refuses the old
credential at once (long before ``BRIDGE_REVALIDATE_AFTER``); a cross-site attempt is
refused and changes nothing; a ``return_to`` off the allow-list is left out."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import bridge_env
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, Kratos, RedisServer, forwarded, wait_until

RETURN_TO = "http://127.0.0.1:4455/signed-out"  # allowed by the bridge and by Kratos
LOGOUT = "/.bridge/logout"
APP_HOST = "app.example.test"
BROWSER = {
    "Accept": "text/html,application/xhtml+xml",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Site": "same-origin",
    "X-Forwarded-Host": APP_HOST,
}


@pytest.fixture
def two_bridges(
    kratos: Kratos, redis_server: RedisServer, workdir: Path
) -> Iterator[Callable[..., list[BridgeServer]]]:
    started: list[BridgeServer] = []

    def start(**env: str) -> list[BridgeServer]:
        values = bridge_env(
            kratos,
            redis_server.url,
            f"logout{uuid.uuid4().hex[:8]}:",
            **{
                "BRIDGE_REVALIDATE_AFTER": "300",  # a refusal seen here is the sign-out's
                "BRIDGE_RETURN_TO_ORIGINS": "http://127.0.0.1:4455",
                "BRIDGE_WORKERS": "2",
                "BRIDGE_ADMIN_PORT": "0",
                **env,  # a test's own settings win
            },
        )
        pair = [BridgeServer(values, workdir) for _ in range(2)]
        started.extend(pair)
        return pair

    yield start
    for server in started:
        server.stop()


def auth(bridge: BridgeServer, **credential: str) -> int:
    headers = forwarded("/")
    if "token" in credential:
        headers["X-Session-Token"] = credential["token"]
    if "cookie" in credential:
        headers["Cookie"] = f"ory_kratos_session={credential['cookie']}"
    return httpx.get(bridge.url + "/forward-auth", headers=headers).status_code


def warm(bridges: list[BridgeServer], **credential: str) -> None:
    for bridge in bridges:
        for _ in range(6):  # both worker processes of each bridge, most likely
            assert auth(bridge, **credential) == 200


def test_a_browser_is_signed_out_in_kratos_and_refused_by_every_process_at_once(
    kratos: Kratos, two_bridges
) -> None:
    bridges = two_bridges()
    user = flows.register(kratos, "browser-out")
    cookie = flows.browser_login(kratos, user)
    warm(bridges, cookie=cookie)

    with httpx.Client(base_url=bridges[0].url, follow_redirects=False) as browser:
        browser.cookies.set("ory_kratos_session", cookie)
        response = browser.get(LOGOUT, params={"return_to": RETURN_TO}, headers=BROWSER)
    assert response.status_code == 303, response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Location"] == RETURN_TO
    # Kratos's own answer, passed on: its session cookie cleared in the browser.
    assert any(
        c.startswith("ory_kratos_session=") and "Max-Age=0" in c
        for c in response.headers.get_list("Set-Cookie")
    ), response.headers.get_list("Set-Cookie")
    assert flows.session_of(kratos, cookie=cookie).status_code == 401

    for bridge in bridges:  # no wait for a re-validation (300 s): the announcement
        wait_until(
            lambda b=bridge: all(auth(b, cookie=cookie) == 401 for _ in range(10)),
            15,  # seconds, normally: a busy machine may stall its delivery
            "the sign-out everywhere",
        )


def test_a_script_with_the_cookie_gets_the_logout_url_as_json(kratos: Kratos, two_bridges) -> None:
    bridge, _ = two_bridges()
    user = flows.register(kratos, "fetch-out")
    cookie = flows.browser_login(kratos, user)
    headers = {
        "Cookie": f"ory_kratos_session={cookie}",
        "Accept": "application/json",
        "Sec-Fetch-Site": "same-origin",
        "Sec-Fetch-Mode": "cors",
        "Origin": f"https://{APP_HOST}",
        "X-Forwarded-Host": APP_HOST,
    }
    response = httpx.post(bridge.url + LOGOUT, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"redirect_to": "http://127.0.0.1:4455/"}  # Kratos's default
    assert flows.session_of(kratos, cookie=cookie).status_code == 401
    assert auth(bridge, cookie=cookie) == 401


def test_a_token_is_logged_out_through_kratos_api(kratos: Kratos, two_bridges) -> None:
    bridges = two_bridges()
    user = flows.register(kratos, "token-out")
    token, kept = flows.login_api(kratos, user), flows.login_api(kratos, user)
    warm(bridges, token=token)
    warm(bridges, token=kept)

    response = httpx.post(bridges[1].url + LOGOUT, headers={"X-Session-Token": token})
    assert response.status_code == 204, response.text
    assert flows.session_of(kratos, token=token).status_code == 401
    for bridge in bridges:
        wait_until(
            lambda b=bridge: all(auth(b, token=token) == 401 for _ in range(10)),
            15,
            "the sign-out everywhere",
        )
        assert auth(bridge, token=kept) == 200  # only the one session ended

    bearer = flows.login_api(kratos, user)
    response = httpx.get(bridges[0].url + LOGOUT, headers={"Authorization": f"Bearer {bearer}"})
    assert response.status_code == 204
    assert flows.session_of(kratos, token=bearer).status_code == 401

    again = httpx.post(bridges[1].url + LOGOUT, headers={"X-Session-Token": token})
    assert again.status_code == 401
    assert again.json()["error"] == "session_missing"


CROSS_SITE = [
    ("GET", {"Sec-Fetch-Site": "cross-site"}),
    ("POST", {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}),
    ("GET", {"Sec-Fetch-Site": "same-site"}),
    ("POST", {"Sec-Fetch-Site": "same-origin", "Origin": "https://evil.example"}),
    ("POST", {"Origin": "null"}),
    ("POST", {"Origin": "https://["}),  # no URL: names no origin of ours
    ("POST", {}),  # a cookie, and nothing to tell where the request came from
    ("GET", {"Origin": f"https://{APP_HOST}"}),  # without Sec-Fetch-Site, only a POST
]


def test_a_cross_site_sign_out_is_refused_and_changes_nothing(kratos: Kratos, two_bridges) -> None:
    bridge, other = two_bridges()
    user = flows.register(kratos, "csrf")
    cookie = flows.browser_login(kratos, user)
    token = flows.login_api(kratos, user)
    warm([bridge, other], cookie=cookie)
    for method, sent in CROSS_SITE:
        headers = {
            "Cookie": f"ory_kratos_session={cookie}",
            "Accept": "text/html",
            "X-Forwarded-Host": APP_HOST,
            **sent,
        }
        response = httpx.request(method, bridge.url + LOGOUT, headers=headers)
        assert response.status_code == 403, (method, sent, response.text)
        assert response.json()["error"] == "forbidden"
    # No cookie at all (a browser keeps a SameSite=Lax one from another site's form POST or
    # image): refused all the same, not sent on to the login.
    for sent in (
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},
        {"Origin": "https://evil.example"},
    ):
        nobody = httpx.post(
            bridge.url + LOGOUT,
            headers={"Accept": "text/html", "X-Forwarded-Host": APP_HOST, **sent},
        )
        assert nobody.status_code == 403, (sent, nobody.text)
    refused_token = httpx.post(
        bridge.url + LOGOUT, headers={"X-Session-Token": token, "Sec-Fetch-Site": "cross-site"}
    )
    assert refused_token.status_code == 403
    assert flows.session_of(kratos, cookie=cookie).status_code == 200
    assert flows.session_of(kratos, token=token).status_code == 200
    for each in (bridge, other):
        assert auth(each, cookie=cookie) == 200
        assert auth(each, token=token) == 200

    same_origin = {**BROWSER, "Cookie": f"ory_kratos_session={cookie}", "Sec-Fetch-Site": "none"}
    assert httpx.get(bridge.url + LOGOUT, headers=same_origin).status_code == 303
    old_browser = {  # no Sec-Fetch-Site: a POST from this origin
        "Cookie": f"ory_kratos_session={cookie}",
        "Origin": f"http://{APP_HOST}",
        "X-Forwarded-Host": APP_HOST,
    }
    assert httpx.post(bridge.url + LOGOUT, headers=old_browser).status_code in (200, 401)


def test_return_to_off_the_allow_list_is_left_out(kratos: Kratos, two_bridges) -> None:
    bridge, _ = two_bridges()
    user = flows.register(kratos, "return-to")
    for elsewhere in (
        "https://evil.example/",
        "http://127.0.0.1:4455@evil.example/",
        "//evil",
        "https://[",  # no URL: urlsplit raises on it
    ):
        cookie = flows.browser_login(kratos, user)
        headers = {**BROWSER, "Cookie": f"ory_kratos_session={cookie}"}
        response = httpx.get(bridge.url + LOGOUT, params={"return_to": elsewhere}, headers=headers)
        assert response.status_code == 303, response.text
        assert response.headers["Location"] == "http://127.0.0.1:4455/"  # Kratos's default
        assert flows.session_of(kratos, cookie=cookie).status_code == 401

    # No session: a browser goes on to return_to when allowed, else to the login; a
    # script gets 401 JSON.
    nobody = httpx.get(bridge.url + LOGOUT, params={"return_to": RETURN_TO}, headers=BROWSER)
    assert nobody.status_code == 303 and nobody.headers["Location"] == RETURN_TO
    nowhere = httpx.get(
        bridge.url + LOGOUT, params={"return_to": "https://evil.example/"}, headers=BROWSER
    )
    assert nowhere.status_code == 303
    assert nowhere.headers["Location"] == kratos.public_url + "/self-service/login/browser"
    script = httpx.post(bridge.url + LOGOUT, headers={"Accept": "application/json"})
    assert script.status_code == 401
    assert script.json()["error"] == "session_missing"
    assert httpx.put(bridge.url + LOGOUT).status_code == 405


def test_the_sign_out_path_is_the_configured_one(kratos: Kratos, two_bridges) -> None:
    bridge, _ = two_bridges(BRIDGE_LOGOUT_PATH="/sso/sign-out")
    user = flows.register(kratos, "path")
    token = {"X-Session-Token": user.token}
    assert httpx.post(bridge.url + LOGOUT, headers=token).status_code == 404
    response = httpx.post(bridge.url + "/sso/sign-out", headers=token)
    assert response.status_code == 204
    assert flows.session_of(kratos, token=user.token).status_code == 401

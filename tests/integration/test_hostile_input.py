"""Malformed and hostile credentials: always a clean 401, never a 500, never an allow."""

from __future__ import annotations

import base64
import os
import random
import string

import httpx
import pytest

from tests.support import kratos_flows as flows

BAD_COOKIES = {
    "empty": "",
    "8kb": "A" * 8192,
    "non_ascii": "sessión-ü-😀",
    "url_encoded_garbage": "%3D%00%ZZ%2F%0d%0a",
    "quotes_and_semicolons": '"\\";;;==',
    "base64_of_garbage": "bm90IGEgY29va2ll",
}


def _cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"ory_kratos_session={value}"}


@pytest.mark.parametrize("value", BAD_COOKIES.values(), ids=BAD_COOKIES.keys())
def test_malformed_cookie_is_401(client, value):
    response = client.get("/auth", headers=_cookie_header(value))
    assert response.status_code == 401
    assert response.get_json()["error"] in ("session_invalid", "session_missing")
    assert "X-User-Id" not in response.headers


def test_non_utf8_cookie_is_401(client):
    environ = {"HTTP_COOKIE": "ory_kratos_session=\xff\xfe\x80abc"}  # latin-1 decoded bytes
    response = client.get("/auth", environ_overrides=environ)
    assert response.status_code == 401


def test_url_encoded_real_cookie_is_not_decoded(client, kratos):
    """Kratos wants the cookie byte-exact; a %3D-encoded copy is not the same credential."""
    user = flows.register(kratos)
    cookie = flows.browser_login(kratos, user)
    assert cookie.endswith("=")
    encoded = cookie.replace("=", "%3D")
    assert client.get("/auth", headers=_cookie_header(encoded)).status_code == 401
    assert client.get("/auth", headers=_cookie_header(cookie)).status_code == 200


def _forged_cookie() -> str:
    """Has the shape of a Kratos cookie (so it reaches Kratos) but no valid signature."""
    payload = b"1795347480|" + base64.urlsafe_b64encode(os.urandom(60)) + b"|" + os.urandom(32)
    return base64.urlsafe_b64encode(payload).decode()


@pytest.mark.parametrize(
    "template",
    [
        "{name}={forged}; {name}={real}",
        "{name}={real}; {name}={forged}",
        "{name}=garbage; {name}={real}",
        "{name}=a b; {name}={real}",
        "{name} ={real}",
        "{name}={forged}",
        "{name}=garbage; {name}={forged}",
    ],
)
def test_duplicate_and_odd_cookies_get_kratos_own_answer(client, kratos, template):
    """Kratos uses the first session cookie it can decode; the bridge must agree with it."""
    user = flows.register(kratos)
    real = flows.browser_login(kratos, user)
    cookie = template.format(name="ory_kratos_session", real=real, forged=_forged_cookie())
    direct = httpx.get(kratos.public_url + "/sessions/whoami", headers={"Cookie": cookie})
    through_bridge = client.get("/auth", headers={"Cookie": cookie})
    assert through_bridge.status_code == direct.status_code
    if direct.status_code == 200:
        assert through_bridge.headers["X-User-Id"] == user.identity_id


def test_wrong_authorization_scheme_is_401(client, kratos):
    user = flows.register(kratos)
    for value in (f"Basic {user.token}", user.token, "Bearer", "Bearer  ", f"Token {user.token}"):
        response = client.get("/auth", headers={"Authorization": value})
        assert response.status_code == 401, value
        assert "X-User-Id" not in response.headers


def test_session_token_header_wins_over_a_valid_cookie(client, kratos):
    """Kratos reads X-Session-Token first; a bad one is not rescued by the cookie."""
    user = flows.register(kratos)
    cookie = flows.browser_login(kratos, user)
    headers = {**_cookie_header(cookie), "X-Session-Token": "ory_st_" + "b" * 32}
    assert client.get("/auth", headers=headers).status_code == 401


@pytest.mark.parametrize("cookie", ["garbage", "", "FORGED"])
def test_bad_session_cookie_is_not_rescued_by_a_bearer_token(client, kratos, cookie):
    """Kratos answers 500 for this pair (it cannot decode the cookie); the bridge denies."""
    user = flows.register(kratos)
    cookie = _forged_cookie() if cookie == "FORGED" else cookie
    headers = {"Cookie": f"ory_kratos_session={cookie}", "Authorization": f"Bearer {user.token}"}
    direct = httpx.get(kratos.public_url + "/sessions/whoami", headers=headers)
    assert direct.status_code != 200
    response = client.get("/auth", headers=headers)
    assert response.status_code == 401
    assert "X-User-Id" not in response.headers


def test_bearer_token_is_used_when_there_is_no_session_cookie(client, kratos):
    user = flows.register(kratos)
    headers = {"Cookie": "theme=dark", "Authorization": f"Bearer {user.token}"}
    response = client.get("/auth", headers=headers)
    assert response.status_code == 200
    assert response.headers["X-User-Id"] == user.identity_id


def test_thousand_distinct_garbage_cookies_barely_reach_kratos(client, kratos):
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "-_="
    garbage = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(500)
    ] + [os.urandom(rng.randint(8, 200)).hex() for _ in range(500)]
    assert len(set(garbage)) == 1000
    before = kratos.whoami_calls()
    for value in garbage:
        response = client.get("/auth", headers=_cookie_header(value))
        assert response.status_code == 401
    assert kratos.whoami_calls() - before < 10


def test_repeated_rejected_token_is_asked_once(client, kratos):
    token = "ory_st_" + "c" * 32
    before = kratos.whoami_calls()
    for _ in range(100):
        assert client.get("/auth", headers={"X-Session-Token": token}).status_code == 401
    assert kratos.whoami_calls() - before == 1


def test_unknown_path_and_method_get_json_errors(client):
    assert client.get("/nope").get_json()["error"] == "not_found"
    assert client.post("/whoami").status_code == 405

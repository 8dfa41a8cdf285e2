"""Drive a real Kratos over plain HTTP the way a user's browser or app would."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import httpx
import pyotp

from tests.support.harness import Kratos

JSON = {"Accept": "application/json"}


@dataclass
class User:
    email: str
    password: str
    identity_id: str
    token: str  # session token of the registration session
    totp_secret: str | None = None


def _check(response: httpx.Response, *expected: int) -> dict:
    assert response.status_code in expected, (response.status_code, response.text[:2000])
    return response.json() if response.content else {}


def register(kratos: Kratos, local_part: str = "user") -> User:
    email = f"{local_part}-{secrets.token_hex(6)}@example.test"
    password = "correct-horse-" + secrets.token_hex(8)
    flow = _check(httpx.get(kratos.public_url + "/self-service/registration/api"), 200)
    body = _check(
        httpx.post(
            flow["ui"]["action"],
            json={"method": "password", "traits": {"email": email}, "password": password},
        ),
        200,
    )
    return User(email, password, body["identity"]["id"], body["session_token"])


def login_api(kratos: Kratos, user: User) -> str:
    flow = _check(httpx.get(kratos.public_url + "/self-service/login/api"), 200)
    body = _check(
        httpx.post(
            flow["ui"]["action"],
            json={"method": "password", "identifier": user.email, "password": user.password},
        ),
        200,
    )
    return body["session_token"]


def login_api_many(kratos: Kratos, user: User, count: int) -> list[str]:
    """``count`` more sessions of ``user``, quickly: one flow takes many logins, each a
    session of its own, on one connection."""
    with httpx.Client() as client:
        flow = _check(client.get(kratos.public_url + "/self-service/login/api"), 200)
        body = {"method": "password", "identifier": user.email, "password": user.password}
        return [
            _check(client.post(flow["ui"]["action"], json=body), 200)["session_token"]
            for _ in range(count)
        ]


def enable_totp(kratos: Kratos, user: User) -> str:
    """Add TOTP in the settings API flow; the session doing it becomes aal2."""
    headers = {"X-Session-Token": user.token}
    flow = _check(httpx.get(kratos.public_url + "/self-service/settings/api", headers=headers), 200)
    secret = next(
        node["attributes"]["text"]["text"]
        for node in flow["ui"]["nodes"]
        if node["attributes"].get("id") == "totp_secret_key"
    )
    body = _check(
        httpx.post(
            flow["ui"]["action"],
            headers=headers,
            json={"method": "totp", "totp_code": pyotp.TOTP(secret).now()},
        ),
        200,
    )
    assert body["state"] == "success", body
    user.totp_secret = secret
    return secret


def upgrade_to_aal2(kratos: Kratos, user: User, token: str) -> None:
    """Second-factor login with TOTP on an existing aal1 session token."""
    headers = {"X-Session-Token": token}
    flow = _check(
        httpx.get(kratos.public_url + "/self-service/login/api?aal=aal2", headers=headers), 200
    )
    _check(
        httpx.post(
            flow["ui"]["action"],
            headers=headers,
            json={"method": "totp", "totp_code": pyotp.TOTP(user.totp_secret).now()},
        ),
        200,
    )


def logout_api(kratos: Kratos, token: str) -> None:
    _check(
        httpx.request(
            "DELETE", kratos.public_url + "/self-service/logout/api", json={"session_token": token}
        ),
        204,
    )


def browser_login(kratos: Kratos, user: User) -> str:
    """Log in through the browser flow with a cookie jar; return the session cookie's value."""
    with httpx.Client(follow_redirects=False, headers=JSON) as browser:
        flow = _check(browser.get(kratos.public_url + "/self-service/login/browser"), 200)
        csrf = csrf_token(flow)
        response = browser.post(
            flow["ui"]["action"],
            json={
                "method": "password",
                "identifier": user.email,
                "password": user.password,
                "csrf_token": csrf,
            },
        )
        _check(response, 200)
        return browser.cookies["ory_kratos_session"]


def csrf_token(flow: dict) -> str:
    """The CSRF token of a browser flow (its hidden ``csrf_token`` node)."""
    return next(
        node["attributes"]["value"]
        for node in flow["ui"]["nodes"]
        if node["attributes"].get("name") == "csrf_token"
    )


def session_of(kratos: Kratos, **credential: str) -> httpx.Response:
    """Ask Kratos directly, to compare with what the bridge says."""
    headers = {}
    if "token" in credential:
        headers["X-Session-Token"] = credential["token"]
    if "cookie" in credential:
        headers["Cookie"] = f"ory_kratos_session={credential['cookie']}"
    return httpx.get(kratos.public_url + "/sessions/whoami", headers=headers)

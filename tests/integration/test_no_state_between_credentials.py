"""Nothing one credential's Kratos call leaves behind may answer for another credential.

The attack: Kratos re-issues a victim's session cookie on ``/sessions/whoami`` (after an
admin extend). If the bridge's HTTP client kept that cookie, every later whoami the
process makes would carry it, and Kratos reads the session cookie before
``Authorization: Bearer``: a forged bearer token would be answered as the victim.
"""

from __future__ import annotations

import secrets
import string
import time

import httpx
import pytest

from tests.conftest import SECRET
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer


def _forged_token() -> str:
    return "ory_st_" + "".join(secrets.choice(string.ascii_letters) for _ in range(32))


def _extend_so_whoami_reissues_the_cookie(kratos, cookie: str) -> str:
    """Extend the victim's session; Kratos's next whoami for the cookie brings Set-Cookie."""
    session_id = flows.session_of(kratos, cookie=cookie).json()["id"]
    time.sleep(1.1)  # the cookie's embedded expiry must be older than the extended one
    extended = httpx.patch(f"{kratos.admin_url}/admin/sessions/{session_id}/extend")
    assert extended.status_code in (200, 204)
    return session_id


def _attack(get, kratos, victim_headers: dict[str, str], victim, other) -> None:
    """``get(path, headers)`` asks the bridge. The victim's revalidation brings a
    Set-Cookie; afterwards every other credential must get exactly Kratos's answer."""
    reissued = get("/auth", victim_headers)
    assert reissued.status_code == 200
    assert reissued.headers["X-User-Id"] == victim.identity_id

    forged = _forged_token()
    for header in ({"Authorization": f"Bearer {forged}"}, {"X-Session-Token": forged}):
        assert httpx.get(kratos.public_url + "/sessions/whoami", headers=header).status_code == 401
        answer = get("/auth", header)
        assert answer.status_code == 401, answer.headers.get("X-User-Id")
        assert "X-User-Id" not in answer.headers
        assert get("/whoami", header).status_code == 401

    for header in ({"Authorization": f"Bearer {other.token}"}, {"X-Session-Token": other.token}):
        answer = get("/auth", header)
        assert answer.status_code == 200
        assert answer.headers["X-User-Id"] == other.identity_id
        assert get("/whoami", header).get_json_or_json()["identity"]["id"] == other.identity_id


class _Answer:
    """One shape for Flask test-client and httpx answers."""

    def __init__(self, status_code, headers, body):
        self.status_code, self.headers, self._body = status_code, headers, body

    def get_json_or_json(self):
        return self._body()


def _in_process(client):
    def get(path, headers):
        response = client.get(path, headers=headers)
        return _Answer(response.status_code, response.headers, response.get_json)

    return get


def _over_http(url):
    def get(path, headers):
        response = httpx.get(url + path, headers=headers)
        return _Answer(response.status_code, response.headers, response.json)

    return get


def test_reissued_cookie_is_not_sent_with_another_credential(make_client, kratos):
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER="0")
    victim, other = flows.register(kratos, "victim"), flows.register(kratos, "other")
    cookie = flows.browser_login(kratos, victim)
    victim_headers = {"Cookie": f"ory_kratos_session={cookie}"}
    assert client.get("/auth", headers=victim_headers).status_code == 200
    _extend_so_whoami_reissues_the_cookie(kratos, cookie)
    _attack(_in_process(client), kratos, victim_headers, victim, other)


def test_victim_on_a_session_token_leaves_nothing_either(make_client, kratos):
    """Same attack with the victim on a session token (Kratos re-issues no cookie for a
    token, so this guards the headers the client sends, not its cookie jar)."""
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER="0")
    victim, other = flows.register(kratos, "victim"), flows.register(kratos, "other")
    victim_headers = {"X-Session-Token": victim.token}
    assert client.get("/auth", headers=victim_headers).status_code == 200
    session_id = flows.session_of(kratos, token=victim.token).json()["id"]
    time.sleep(1.1)
    assert httpx.patch(f"{kratos.admin_url}/admin/sessions/{session_id}/extend").is_success
    _attack(_in_process(client), kratos, victim_headers, victim, other)


@pytest.fixture
def two_worker_bridge(kratos, redis_server, workdir, prefix):
    server = BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": prefix,
            "BRIDGE_REVALIDATE_AFTER": "0",
            "BRIDGE_WORKERS": "2",
        },
        workdir,
    )
    yield server
    server.stop()


def test_attack_on_two_worker_processes(two_worker_bridge, kratos):
    """Each worker has its own client; the victim is revalidated often enough that both
    have seen a re-issued cookie, then every forged request is refused by both."""
    get = _over_http(two_worker_bridge.url)
    victim, other = flows.register(kratos, "victim"), flows.register(kratos, "other")
    cookie = flows.browser_login(kratos, victim)
    victim_headers = {"Cookie": f"ory_kratos_session={cookie}"}
    _extend_so_whoami_reissues_the_cookie(kratos, cookie)
    for _ in range(8):  # new connections, spread over both workers
        _attack(get, kratos, victim_headers, victim, other)
    assert "Traceback" not in two_worker_bridge.log()

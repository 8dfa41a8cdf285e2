"""``KratosClient.whoami_async``: the whoami call as a coroutine on an event loop, against
the real Kratos. It reads Kratos's answer as ``whoami`` does (one reading, shared), and
what it sends is a pure function of the credential: a cookie Kratos re-issues on one
credential's call never rides along on the next one's."""

from __future__ import annotations

import asyncio
import secrets
import string
import time

import httpx
import pytest

from bridge.errors import KratosUnavailable, SessionInvalid
from bridge.kratos.whoami import KratosClient
from bridge.pipeline.credentials import Credential, Kind
from tests.support import kratos_flows as flows
from tests.support.harness import free_port

COOKIE = "ory_kratos_session"


def _token(token: str) -> Credential:
    return Credential(Kind.TOKEN, (token,))


def _forged() -> Credential:
    return _token("ory_st_" + "".join(secrets.choice(string.ascii_letters) for _ in range(32)))


def _on_a_loop(public_url: str, calls):
    """``calls(client)``, a coroutine, on a fresh loop with a client closed after it."""

    async def run():
        client = KratosClient(public_url, COOKIE, timeout=5)
        try:
            return await calls(client)
        finally:
            client.close()

    return asyncio.run(run())


def test_a_session_kratos_accepts_and_a_credential_it_refuses(kratos):
    user = flows.register(kratos)

    async def calls(client):
        accepted = await client.whoami_async(_token(user.token))
        with pytest.raises(SessionInvalid):
            await client.whoami_async(_forged())
        return accepted

    accepted = _on_a_loop(kratos.public_url, calls)
    assert accepted.view["identity"]["id"] == user.identity_id
    assert accepted.set_cookies == ()


def test_kratos_out_of_reach_is_unavailable():
    async def calls(client):
        with pytest.raises(KratosUnavailable):
            await client.whoami_async(_forged())

    _on_a_loop(f"http://127.0.0.1:{free_port()}", calls)


def test_a_reissued_cookie_never_answers_for_the_next_credential(kratos):
    """The attack of ``test_no_state_between_credentials``, on the loop's client: Kratos
    re-issues the victim's cookie; a forged token asked next on the same client (and its
    kept connection) is still refused, and another user is still that user."""
    victim, other = flows.register(kratos), flows.register(kratos)
    cookie = flows.browser_login(kratos, victim)
    session_id = flows.session_of(kratos, cookie=cookie).json()["id"]
    time.sleep(1.1)  # the cookie's embedded expiry must be older than the extended one
    assert httpx.patch(f"{kratos.admin_url}/admin/sessions/{session_id}/extend").is_success

    async def calls(client):
        reissued = await client.whoami_async(Credential(Kind.COOKIE, (cookie,)))
        assert reissued.set_cookies, "Kratos did not re-issue the cookie: no attack staged"
        for _ in range(2):
            with pytest.raises(SessionInvalid):
                await client.whoami_async(_forged())
            answer = await client.whoami_async(_token(other.token))
            assert answer.view["identity"]["id"] == other.identity_id

    _on_a_loop(kratos.public_url, calls)

"""A Kratos database blip is not a logout, on the real Kratos with its real database
failing under it.

Kratos v1.3.1 answers whoami with ``401`` for every error it meets reading the session,
its database's included. The failures are made in Kratos's own SQLite file by a second
connection, as a database fails: a table whoami reads goes away for a while and comes
back. (A lock cannot do it: the database is in WAL mode, where a writer's lock never
stops a reader.)

- ``identity_credentials`` away: whoami fails (it loads the identity's credentials),
  while the admin API's session read, which does not, still says the session is active.
- ``sessions`` away: whoami and the admin API's read both fail.

Either way the bridge refuses the request as Kratos unavailable (``503``) and loses
nothing: the mirror and the app's data are kept, no ended event is written, and the
session works again as soon as the database does. A real end (the session revoked in
Kratos) still ends it, with one event.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import orjson
import pytest

from bridge.sessions.rejection import CONFIRM_BURST, CONFIRM_EVERY_MS, DOUBT_MS
from tests.conftest import store_of
from tests.support import kratos_flows as flows
from tests.support.harness import Kratos, free_port, wait_until


@pytest.fixture(scope="module")
def own_kratos(workdir) -> Iterator[Kratos]:
    """A Kratos for this module alone: its database fails under it, and comes back."""
    server = Kratos(workdir)
    yield server
    server.stop()


APP_TOKEN = "app-token-" + "b" * 40
EVERY_TIME = {"BRIDGE_REVALIDATE_AFTER": "0", "BRIDGE_APP_TOKEN": APP_TOKEN}
ADMIN_READ = "/admin/sessions/{param}"  # the endpoint as Kratos's metrics name it


@contextmanager
def table_away(kratos: Kratos, table: str) -> Iterator[None]:
    """``table`` missing from Kratos's database, as a failing database would have it,
    until the block ends."""
    connection = sqlite3.connect(kratos.database, isolation_level=None, timeout=10)
    try:
        connection.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
        try:
            yield
        finally:
            connection.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
    finally:
        connection.close()


def credential(token: str | None = None, cookie: str | None = None) -> dict[str, str]:
    return {"X-Session-Token": token} if token else {"Cookie": f"ory_kratos_session={cookie}"}


def auth(client, token: str | None = None, cookie: str | None = None) -> tuple[int, str | None]:
    response = client.get("/auth", headers=credential(token, cookie))
    if response.status_code != 200:
        assert "X-User-Id" not in response.headers
    return response.status_code, (response.get_json() or {}).get("error")


def write_app_data(client, token: str | None = None, cookie: str | None = None) -> str:
    response = client.patch(
        "/whoami/app",
        data=orjson.dumps({"cart": ["book", 2]}),
        headers={
            **credential(token, cookie),
            "X-Bridge-App-Token": APP_TOKEN,
            "Content-Type": "application/merge-patch+json",
        },
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["session_id"]


def ended_events(client, session_id: str) -> list[dict[str, str]]:
    entries = store_of(client).read_ended("0-0", 1000, 1)
    return [fields for _, fields in entries if fields["session_id"] == session_id]


def assert_nothing_lost(client, session_id: str) -> None:
    mirrored = store_of(client).load(session_id, with_app=True)
    assert mirrored is not None, "the mirror was dropped"
    assert orjson.loads(mirrored.app["cart"]) == ["book", 2]
    assert ended_events(client, session_id) == []


@pytest.mark.parametrize("table", ["identity_credentials", "sessions"])
def test_a_database_blip_refuses_with_503_and_loses_nothing(
    make_client, own_kratos: Kratos, table: str
) -> None:
    """``identity_credentials``: the admin API says the session is active (a blip);
    ``sessions``: the admin API fails too (it cannot say). Both: 503, all kept."""
    client = make_client(own_kratos, **EVERY_TIME)
    user = flows.register(own_kratos, "blip")
    assert auth(client, user.token) == (200, None)
    session_id = write_app_data(client, user.token)

    with table_away(own_kratos, table):
        assert flows.session_of(own_kratos, token=user.token).status_code == 401  # Kratos's word
        for _ in range(CONFIRM_BURST + 2):  # past the budget of admin questions, too
            assert auth(client, user.token) == (503, "kratos_unavailable")
        assert_nothing_lost(client, session_id)

    assert auth(client, user.token) == (200, None)
    whoami = client.get("/whoami", headers={"X-Session-Token": user.token}).get_json()
    assert whoami["session_id"] == session_id and whoami["app"] == {"cart": ["book", 2]}
    assert ended_events(client, session_id) == []


def test_a_cookie_through_a_blip_is_kept_too(make_client, own_kratos: Kratos) -> None:
    """A cookie Kratos refuses may have lapsed while its session lives, so its refusal is
    doubted for a while only (``DOUBT_MS``): a blip shorter than that is 503 and costs
    nothing, as for a token."""
    client = make_client(own_kratos, **EVERY_TIME)
    user = flows.register(own_kratos, "cookie-blip")
    cookie = flows.browser_login(own_kratos, user)
    assert auth(client, cookie=cookie) == (200, None)
    session_id = write_app_data(client, cookie=cookie)
    with table_away(own_kratos, "identity_credentials"):
        assert auth(client, cookie=cookie) == (503, "kratos_unavailable")
        assert_nothing_lost(client, session_id)
    assert auth(client, cookie=cookie) == (200, None)
    assert_nothing_lost(client, session_id)


def test_a_real_end_still_ends_the_session_once(make_client, own_kratos: Kratos) -> None:
    client = make_client(own_kratos, **EVERY_TIME)
    user = flows.register(own_kratos, "revoked")
    assert auth(client, user.token) == (200, None)
    session_id = write_app_data(client, user.token)
    revoked = httpx.delete(f"{own_kratos.admin_url}/admin/sessions/{session_id}")
    assert revoked.status_code == 204

    assert auth(client, user.token) == (401, "session_invalid")
    assert store_of(client).load(session_id) is None
    assert auth(client, user.token) == (401, "session_invalid")
    events = ended_events(client, session_id)
    assert [(e["reason"], e["by"]) for e in events] == [("rejected", "kratos")]


def test_a_blip_then_a_real_end_ends_it(make_client, own_kratos: Kratos) -> None:
    """A session kept through a blip is not kept for good: revoked while the database is
    still failing, it ends at the next question the budget allows."""
    client = make_client(own_kratos, **EVERY_TIME)
    user = flows.register(own_kratos, "blip-then-end")
    assert auth(client, user.token) == (200, None)
    session_id = write_app_data(client, user.token)
    with table_away(own_kratos, "identity_credentials"):
        assert auth(client, user.token) == (503, "kratos_unavailable")
        revoked = httpx.delete(f"{own_kratos.admin_url}/admin/sessions/{session_id}")
        assert revoked.status_code == 204
        time.sleep(CONFIRM_EVERY_MS / 1000)  # the budget has a question again by now
        assert auth(client, user.token) == (401, "session_invalid")
    assert store_of(client).load(session_id) is None
    assert [e["reason"] for e in ended_events(client, session_id)] == ["rejected"]


def test_with_the_admin_api_unreachable_a_401_is_refused_and_nothing_dropped(
    make_client, own_kratos: Kratos
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    client = make_client(own_kratos, BRIDGE_KRATOS_ADMIN_URL=closed, **EVERY_TIME)
    user = flows.register(own_kratos, "no-admin")
    assert auth(client, user.token) == (200, None)
    session_id = write_app_data(client, user.token)
    with table_away(own_kratos, "identity_credentials"):
        assert auth(client, user.token) == (503, "kratos_unavailable")
        assert_nothing_lost(client, session_id)
    assert auth(client, user.token) == (200, None)


def test_the_admin_api_is_asked_only_for_mirrored_sessions_and_within_a_budget(
    make_client, own_kratos: Kratos
) -> None:
    client = make_client(own_kratos, **EVERY_TIME)
    before = own_kratos.calls(ADMIN_READ)
    for _ in range(5):  # never mirrored: refused as Kratos says, without a question
        assert auth(client, "ory_st_" + "x" * 32) == (401, "session_invalid")
    assert own_kratos.calls(ADMIN_READ) == before

    user = flows.register(own_kratos, "budget")
    assert auth(client, user.token) == (200, None)
    with table_away(own_kratos, "identity_credentials"):
        started = time.monotonic()
        for _ in range(20):
            assert auth(client, user.token) == (503, "kratos_unavailable")
        elapsed_ms = (time.monotonic() - started) * 1000
    # The promise: a burst of questions at once, then one per CONFIRM_EVERY_MS, however
    # fast the client asks.
    budget = CONFIRM_BURST + int(elapsed_ms // CONFIRM_EVERY_MS)
    asked = own_kratos.calls(ADMIN_READ) - before
    assert 1 <= asked <= budget, (asked, budget)


def test_one_client_spending_its_budget_spends_nobody_else_s(
    make_client, own_kratos: Kratos
) -> None:
    """What the check keeps between requests is per session (the budget of questions)
    and per credential (how long a refusal has been doubted): a client replaying its own
    refused credential through a blip neither holds up nor ends another user's session.
    Revoked meanwhile, the other session is asked about at once (its own budget) and
    ends; the first is still kept."""
    client = make_client(own_kratos, **EVERY_TIME)
    attacker, victim = flows.register(own_kratos, "spender"), flows.register(own_kratos, "other")
    assert auth(client, attacker.token) == (200, None)
    assert auth(client, victim.token) == (200, None)
    attacker_session = write_app_data(client, attacker.token)
    victim_session = flows.session_of(own_kratos, token=victim.token).json()["id"]
    with table_away(own_kratos, "identity_credentials"):
        for _ in range(CONFIRM_BURST * 5):
            assert auth(client, attacker.token) == (503, "kratos_unavailable")
        revoked = httpx.delete(f"{own_kratos.admin_url}/admin/sessions/{victim_session}")
        assert revoked.status_code == 204
        assert auth(client, victim.token) == (401, "session_invalid")
        assert_nothing_lost(client, attacker_session)
    assert [e["reason"] for e in ended_events(client, victim_session)] == ["rejected"]
    assert auth(client, attacker.token) == (200, None)


def test_a_long_blip_stays_503_for_a_token_and_costs_a_cookie_a_login_never_its_data(
    make_client, own_kratos: Kratos
) -> None:
    """Past ``DOUBT_MS``: a token, which is its session, is still 503 while Kratos holds
    the session active; a cookie, which could have lapsed, is refused alone (401). Neither
    session loses its mirror or data, nor gets an ended event, and both work once the
    database does (the cookie once the process's memory of refusing it,
    ``BRIDGE_NEGATIVE_CACHE_TTL``, is past)."""
    client = make_client(own_kratos, BRIDGE_NEGATIVE_CACHE_TTL="1", **EVERY_TIME)
    user = flows.register(own_kratos, "long-blip")
    cookie = flows.browser_login(own_kratos, user)
    token_session = write_app_data(client, token=user.token)
    cookie_session = write_app_data(client, cookie=cookie)
    with table_away(own_kratos, "identity_credentials"):
        started = time.monotonic()
        while auth(client, cookie=cookie) != (401, "session_invalid"):
            assert time.monotonic() - started < DOUBT_MS / 1000 + 10, "the cookie kept 503"
            assert auth(client, token=user.token) == (503, "kratos_unavailable")
            time.sleep(0.5)
        assert time.monotonic() - started >= DOUBT_MS / 1000 - 1
        assert auth(client, token=user.token) == (503, "kratos_unavailable")
        for session in (token_session, cookie_session):
            assert_nothing_lost(client, session)
    assert auth(client, token=user.token) == (200, None)
    wait_until(lambda: auth(client, cookie=cookie) == (200, None), 10, "the cookie again")

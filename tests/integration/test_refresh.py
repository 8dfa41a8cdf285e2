"""Sessions in use are refreshed off the request path, and the copy is still never used
past ``revalidate_after``: not while a refresh runs, not when it fails.

``from_memory`` is what the server's event loop asks on every ``/auth``; these tests
ask it the same way, with the real Kratos and store behind it.
"""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

from bridge.errors import SessionInvalid
from bridge.pipeline.credentials import extract
from bridge.sessions import refresh
from bridge.sessions.refresh import REFRESH_AT
from bridge.web.request import HeaderView
from tests.support import kratos_flows as flows
from tests.support.harness import SlowLink

REVALIDATE_AFTER = 1.0


def _mirror(client):
    return client.application.extensions["bridge"].mirror


def _credential(user):
    return extract(HeaderView([("x-session-token", user.token)]), "ory_kratos_session")


def _ask_from_memory(mirror, credential, seconds: float):
    """Ask like busy traffic would, every 20 ms; yield (time, answer) with the answer a
    session, None (not in memory) or "rejected"."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        asked_at = time.time() * 1000  # before the call: the copy is judged at or after it
        try:
            known = mirror.from_memory(credential)
            answer = known.session if known is not None else None
        except SessionInvalid:
            answer = "rejected"
        yield asked_at, answer
        time.sleep(0.02)


def test_a_busy_session_stays_answered_from_memory(make_client, kratos, monkeypatch):
    # Each refresh is due as early as the jitter allows (its whole slice plus the lead:
    # 1.6 s before the copy goes stale in an 8 s window), so that on a loaded machine a
    # late timer and a slow whoami still land in time; with the jitter drawn at random,
    # the lead alone (0.4 s) may be all there is. The jitter's spread and the lead's
    # growth have tests of their own below.
    monkeypatch.setattr(refresh, "draw_jitter", lambda: 0.999)
    revalidate_after = 8 * REVALIDATE_AFTER
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER=str(revalidate_after))
    mirror, user = _mirror(client), flows.register(kratos)
    credential = _credential(user)
    first = mirror.resolve(credential).session
    calls = kratos.whoami_calls()

    asked_for = 2 * revalidate_after  # past the first freshness: renewed, or it fails
    answers = list(_ask_from_memory(mirror, credential, asked_for))
    assert all(answer not in (None, "rejected") for _, answer in answers)
    for asked_at, answer in answers:
        assert asked_at - answer.validated_at_ms < revalidate_after * 1000
    assert answers[-1][1].validated_at_ms > first.validated_at_ms
    refreshed = kratos.whoami_calls() - calls
    # At most one per REFRESH_AT x revalidate_after (2 in the 16 s asked, and one more for
    # where the first falls), not one per ask (hundreds); how many fewer depends on how
    # fast Kratos answers, so no lower bound beyond the one the line above has seen.
    most = int(asked_for / (REFRESH_AT * revalidate_after)) + 1
    assert 1 <= refreshed <= most, (refreshed, most)


def test_a_session_revoked_while_in_use_is_refused_within_the_bound(make_client, kratos):
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER=str(REVALIDATE_AFTER))
    mirror, user = _mirror(client), flows.register(kratos)
    credential = _credential(user)
    mirror.resolve(credential)
    flows.logout_api(kratos, user.token)
    revoked_at = time.time() * 1000

    answers = list(_ask_from_memory(mirror, credential, 2 * REVALIDATE_AFTER))
    for asked_at, answer in answers:
        if asked_at >= revoked_at + REVALIDATE_AFTER * 1000:
            assert answer in (None, "rejected")
    # The refresh saw the 401: the copy is gone before the bound, and stays gone.
    assert answers[-1][1] == "rejected"
    gone = next(at for at, answer in answers if answer in (None, "rejected"))
    assert gone < revoked_at + REVALIDATE_AFTER * 1000
    assert client.get("/auth", headers={"X-Session-Token": user.token}).status_code == 401


def test_kratos_down_during_refresh_leaves_nothing_past_freshness(make_client, own_kratos):
    client = make_client(
        own_kratos, BRIDGE_REVALIDATE_AFTER=str(REVALIDATE_AFTER), BRIDGE_KRATOS_TIMEOUT="0.3"
    )
    mirror, user = _mirror(client), flows.register(own_kratos)
    credential = _credential(user)
    validated = mirror.resolve(credential).session.validated_at_ms
    own_kratos.stop()

    answers = list(_ask_from_memory(mirror, credential, 2 * REVALIDATE_AFTER))
    for asked_at, answer in answers:
        if asked_at >= validated + REVALIDATE_AFTER * 1000:
            assert answer is None
        elif asked_at < validated + REFRESH_AT * REVALIDATE_AFTER * 1000:
            assert answer is not None
    response = client.get("/auth", headers={"X-Session-Token": user.token})
    assert response.status_code == 503


def test_a_cookie_kratos_reissues_during_a_refresh_reaches_the_browser(make_client, kratos):
    """After an extend, Kratos re-issues the cookie on whoami; when that whoami is a
    background refresh, the next request answered from memory carries the Set-Cookie."""
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER=str(REVALIDATE_AFTER))
    user = flows.register(kratos)
    cookie = flows.browser_login(kratos, user)
    headers = {"Cookie": f"ory_kratos_session={cookie}"}
    session_id = client.get("/whoami", headers=headers).get_json()["session_id"]
    time.sleep(1.1)  # the cookie's embedded expiry must be older than the extended one
    assert client.get("/auth", headers=headers).status_code == 200  # a fresh copy again
    import httpx

    assert httpx.patch(f"{kratos.admin_url}/admin/sessions/{session_id}/extend").is_success
    relayed = []
    deadline = time.monotonic() + 2 * REVALIDATE_AFTER
    while time.monotonic() < deadline:
        response = client.get("/auth", headers=headers)
        assert response.status_code == 200
        for set_cookie in response.headers.getlist("Set-Cookie"):
            relayed.append(set_cookie)  # and the browser takes it, as a browser does
            headers = {"Cookie": set_cookie.split(";")[0]}
        time.sleep(0.05)
    assert len(relayed) == 1  # once, by the first answer after the refresh
    assert relayed[0].startswith("ory_kratos_session=")
    assert flows.session_of(kratos, cookie=headers["Cookie"].split("=", 1)[1]).is_success


def test_only_a_session_asked_for_again_is_refreshed_ahead(make_client, kratos):
    """A copy asked for once in the last quarter of its window is left to expire (a
    rarely used session costs Kratos no call ahead of time); asked for twice, it is
    refreshed before its freshness ends."""
    # The asks below must land in the last quarter of the window: 0.75 s wide here, so
    # that a sleep overshooting on a busy machine does not carry them past its end.
    revalidate_after = 3 * REVALIDATE_AFTER
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER=str(revalidate_after))
    mirror = _mirror(client)
    once, twice = flows.register(kratos), flows.register(kratos)
    for user in (once, twice):
        mirror.resolve(_credential(user))
    calls = kratos.whoami_calls()
    time.sleep(REFRESH_AT * revalidate_after + 0.05)
    assert mirror.from_memory(_credential(once)) is not None
    assert mirror.from_memory(_credential(twice)) is not None
    assert mirror.from_memory(_credential(twice)) is not None
    time.sleep((1 - REFRESH_AT) * revalidate_after + 0.1)  # past the first freshness
    assert kratos.whoami_calls() - calls == 1
    assert mirror.from_memory(_credential(once)) is None
    assert mirror.from_memory(_credential(twice)) is not None


def test_the_jitter_spreads_refreshes_of_sessions_validated_together(
    make_client, kratos, monkeypatch
):
    """Two sessions validated together, both busy: the one whose refresh drew the most
    jitter is renewed a slice of the window earlier than the one that drew none."""
    shares = itertools.chain([0.999, 0.0], itertools.repeat(0.0))
    monkeypatch.setattr(refresh, "draw_jitter", lambda: next(shares))
    revalidate_after = 3 * REVALIDATE_AFTER  # a slice of 0.45 s between the two
    client = make_client(kratos, BRIDGE_REVALIDATE_AFTER=str(revalidate_after))
    mirror = _mirror(client)
    early, late = flows.register(kratos), flows.register(kratos)
    credentials = [_credential(early), _credential(late)]
    first = [mirror.resolve(credential).session.validated_at_ms for credential in credentials]
    time.sleep(REFRESH_AT * revalidate_after + 0.05)
    for credential in credentials:  # scheduled in this order: "early" draws 0.999
        assert mirror.from_memory(credential) is not None
        assert mirror.from_memory(credential) is not None
    renewed: dict[int, int] = {}  # the first renewal of each, after its validation
    deadline = time.monotonic() + revalidate_after
    while len(renewed) < 2 and time.monotonic() < deadline:
        for n, credential in enumerate(credentials):
            known = mirror.from_memory(credential)
            if n not in renewed and known is not None:
                if known.session.validated_at_ms > first[n]:
                    renewed[n] = known.session.validated_at_ms - first[n]
        time.sleep(0.02)
    assert sorted(renewed) == [0, 1], renewed
    assert renewed[0] < renewed[1], renewed


def test_a_refresh_that_came_back_late_makes_the_next_one_due_earlier(
    make_client, kratos, monkeypatch
):
    """Kratos slower than the lead allows: the first refresh's answer lands after the copy
    went stale, and the next refresh is due that much earlier, so the copy is renewed in
    time from then on. (No jitter: the lead alone sets when each refresh is due.)"""
    monkeypatch.setattr(refresh, "draw_jitter", lambda: 0.0)
    link = SlowLink(kratos.public_port, delay=0)
    try:
        # A base lead of 150 ms, at most 750 ms: room for a 250 ms answer, twice over.
        revalidate_after = 3 * REVALIDATE_AFTER
        slow_kratos = SimpleNamespace(public_url=link.url, admin_url=kratos.admin_url)
        client = make_client(slow_kratos, BRIDGE_REVALIDATE_AFTER=str(revalidate_after))
        mirror, user = _mirror(client), flows.register(kratos)
        credential = _credential(user)
        renewed = [mirror.resolve(credential).session.validated_at_ms]
        link.delay = 0.25
        answers = list(_ask_from_memory(mirror, credential, 2.2 * revalidate_after))
    finally:
        link.close()

    for asked_at, answer in answers:
        if answer not in (None, "rejected"):
            assert asked_at - answer.validated_at_ms < revalidate_after * 1000
            if answer.validated_at_ms != renewed[-1]:
                renewed.append(answer.validated_at_ms)
    assert len(renewed) == 3, renewed
    first_gap, second_gap = renewed[1] - renewed[0], renewed[2] - renewed[1]
    assert first_gap >= revalidate_after * 1000 - 150  # due 150 ms before the end
    assert second_gap <= first_gap - 200, (first_gap, second_gap)
    # From the first renewal on, the copy never lapsed again.
    first_renewed = next(
        i
        for i, (_, a) in enumerate(answers)
        if a not in (None, "rejected") and a.validated_at_ms == renewed[1]
    )
    assert all(answer not in (None, "rejected") for _, answer in answers[first_renewed:])

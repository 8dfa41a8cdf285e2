"""Analytics that outlive the sessions: the registry on both stores (the same
specification for the in-process and the Redis one), then the statistics of a scripted
day on a real bridge, a real Kratos with a short session lifespan, and real Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bridge.observe.analytics import device_kind, user_agent_family
from bridge.store.memory.registry import MemoryRegistry
from bridge.store.registry import Sighting, day_of
from tests.conftest import SECRET, bridge_settings
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, Kratos, RedisServer, forwarded, wait_until

TOKEN = "admin-token-for-tests-" + "s" * 20
LIFESPAN_S = 6


@pytest.fixture(params=["memory", "redis"])
def registry(request: pytest.FixtureRequest, kratos: Kratos, redis_server: RedisServer):
    if request.param == "memory":
        yield MemoryRegistry(retention_days=30)
        return
    from bridge.wiring import build_store

    settings = bridge_settings(kratos, redis_server.url, f"reg{uuid.uuid4().hex[:8]}:")
    store = build_store(settings)
    yield store.registry
    store.close()


def seen(sid: str, *, started: int, expires: int, at: int, requests: int = 1, aal="aal1"):
    return Sighting(
        session_id=sid,
        identity_id="identity-" + sid[:4],
        label=f"{sid[:4]}@example.test",
        aal=aal,
        methods=("password",),
        device={"user_agent": "curl/8", "user_agent_family": "curl", "device_kind": "script"},
        started_at_ms=started,
        expires_at_ms=expires,
        last_seen_ms=at,
        requests=requests,
    )


def ids(n: int) -> list[str]:
    return sorted((str(uuid.uuid4()) for _ in range(n)), reverse=True)


def test_registry_pages_newest_first_and_adds_up_requests(registry) -> None:
    now = int(time.time() * 1000)
    a, b, c = ids(3)
    registry.report([seen(a, started=now - 3000, expires=now + 60_000, at=now)], now)
    registry.report([seen(b, started=now - 1000, expires=now + 60_000, at=now)], now)
    registry.report([seen(c, started=now - 1000, expires=now + 60_000, at=now)], now)
    registry.report(
        [seen(a, started=now - 3000, expires=now + 90_000, at=now + 5, requests=4)], now
    )

    first = registry.page(2, None)
    assert [r["session_id"] for r in first.records] == [b, c]  # same start: id descending
    rest = registry.page(2, first.next_token)
    assert [r["session_id"] for r in rest.records] == [a]
    assert rest.next_token is None
    (record,) = registry.records([a])
    assert record["requests"] == 5
    assert record["expires_at"] == now + 90_000
    assert record["first_seen"] == now and record["last_seen"] == now + 5
    counts = registry.counts([day_of(now - 3000), day_of(now)], now - 10_000, now)
    assert counts.active == 3
    assert sum(d.get("started", 0) for d in counts.days.values()) == 3


def test_an_ended_session_ends_once_and_is_not_registered_again(registry) -> None:
    now = int(time.time() * 1000)
    (sid,) = ids(1)
    registry.report([seen(sid, started=now - 5000, expires=now + 60_000, at=now)], now)
    assert registry.end(sid, "revoked", now) is True
    assert registry.end(sid, "revoked", now) is False
    registry.report([seen(sid, started=now - 5000, expires=now + 60_000, at=now + 1)], now + 1)
    assert registry.records([sid]) == []
    counts = registry.counts([day_of(now)], now - 10_000, now + 1)
    assert counts.days[day_of(now)]["ended:revoked"] == 1
    assert counts.days[day_of(now)]["started"] == 1
    assert [e["reason"] for e in counts.ended] == ["revoked"]
    assert counts.ended[0]["duration_ms"] == "5000"


def test_a_session_ended_before_it_was_registered_is_not_registered_later(registry) -> None:
    now = int(time.time() * 1000)
    (sid,) = ids(1)
    assert registry.end(sid, "revoked", now) is False
    registry.report([seen(sid, started=now - 5000, expires=now + 60_000, at=now)], now + 1)
    assert registry.records([sid]) == []
    assert registry.active(now + 1) == 0


def test_the_sweep_ends_expired_sessions_at_their_expiry(registry) -> None:
    now = int(time.time() * 1000)
    short, long = ids(2)
    registry.report(
        [
            seen(short, started=now - 2000, expires=now + 50, at=now),
            seen(long, started=now - 2000, expires=now + 60_000, at=now, aal="aal2"),
        ],
        now,
    )
    assert registry.sweep(now) == 0
    assert registry.sweep(now + 100) == 1
    counts = registry.counts([day_of(now)], now - 10_000, now + 100)
    assert (counts.active, counts.active_aal2) == (1, 1)
    (ended,) = counts.ended
    assert (ended["session_id"], ended["reason"], ended["duration_ms"]) == (
        short,
        "expired",
        "2050",
    )


def test_aal2_events_and_unique_identities_per_day(registry) -> None:
    now = int(time.time() * 1000)
    a, b = ids(2)
    registry.report([seen(a, started=now, expires=now + 60_000, at=now)], now)
    registry.report([seen(b, started=now, expires=now + 60_000, at=now)], now)
    registry.count_aal2("totp", now)
    registry.count_aal2("totp", now)
    registry.count_aal2("webauthn", now)
    counts = registry.counts([day_of(now)], now - 1000, now)
    assert counts.days[day_of(now)]["aal2:totp"] == 2
    assert counts.days[day_of(now)]["aal2:webauthn"] == 1
    assert counts.unique_identities[day_of(now)] == 2
    assert counts.unique_identities_total == 2


def test_a_page_token_from_elsewhere_is_refused(registry) -> None:
    from bridge.errors import BadRequest

    with pytest.raises(BadRequest):
        registry.page(10, "1.2.3")


@pytest.mark.parametrize(
    ("agent", "family", "kind"),
    [
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/120.0 Safari/537.36 Edg/120.0",
            "Edge",
            "desktop",
        ),
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
            "Safari",
            "mobile",
        ),
        (
            "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
            "Firefox",
            "desktop",
        ),
        ("python-httpx/0.28.1", "Python", "script"),
        ("Googlebot/2.1 (+http://www.google.com/bot.html)", "Other", "bot"),
        ("", "Other", "other"),
    ],
)
def test_user_agent_families_and_device_kinds(agent: str, family: str, kind: str) -> None:
    assert user_agent_family(agent) == family
    assert device_kind(agent, family) == kind


@pytest.fixture(scope="module")
def short_kratos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kratos]:
    server = Kratos(tmp_path_factory.mktemp("short-kratos"), lifespan=f"{LIFESPAN_S}s")
    yield server
    server.stop()


@pytest.mark.parametrize("store_kind", ["redis", "embedded"])
def test_statistics_of_a_scripted_day(
    store_kind: str, short_kratos: Kratos, redis_server: RedisServer, workdir: Path
) -> None:
    kratos = short_kratos
    env = {
        "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
        "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
        "BRIDGE_KEY_PREFIX": f"stats{uuid.uuid4().hex[:8]}:",
        "BRIDGE_SECRET": SECRET,
        "BRIDGE_ADMIN_TOKEN": TOKEN,
        "BRIDGE_REVALIDATE_AFTER": "0",  # every request asks Kratos: a logout shows at once
        "BRIDGE_WORKERS": "1",
    }
    if store_kind == "redis":
        env["BRIDGE_REDIS_URL"] = redis_server.url
    bridge = BridgeServer(env, workdir)
    admin = {"Authorization": f"Bearer {TOKEN}"}

    def auth(token: str) -> int:
        headers = {"X-Session-Token": token, **forwarded("/")}
        return httpx.get(bridge.url + "/forward-auth", headers=headers).status_code

    try:
        expiring, upgraded, leaving = (flows.register(kratos, name) for name in "xyz")
        expiring_token = flows.login_api(kratos, expiring)
        leaving_token = flows.login_api(kratos, leaving)
        flows.enable_totp(kratos, upgraded)  # its registration session becomes aal2
        assert [auth(expiring_token) for _ in range(3)] == [200] * 3
        assert [auth(upgraded.token) for _ in range(2)] == [200] * 2
        assert auth(leaving_token) == 200
        flows.logout_api(kratos, leaving_token)
        assert auth(leaving_token) == 401
        upgraded_sid = flows.session_of(kratos, token=upgraded.token).json()["id"]
        revoke = httpx.delete(f"{bridge.admin_url}/admin/sessions/{upgraded_sid}", headers=admin)
        assert revoke.status_code == 200
        time.sleep(LIFESPAN_S + 0.5)  # the one left expires
        assert flows.session_of(kratos, token=expiring_token).status_code == 401

        def stats() -> dict:
            response = httpx.get(f"{bridge.admin_url}/admin/stats?since=1d", headers=admin)
            assert response.status_code == 200, response.text
            return response.json()

        wait_until(lambda: sum(stats()["days"][-1]["ended"].values()) == 3, 10, "ended sessions")
        got = stats()
        today = got["days"][-1]
        assert today["sessions_started"] == 3
        assert today["unique_identities"] == 3
        assert today["ended"] == {"expired": 1, "revoked": 1, "logged_out": 1}
        assert today["aal2_events"] == {"totp": 1}
        assert today["requests"] == 6
        assert got["aal2_events_by_method"] == {"totp": 1}
        assert got["active_sessions"] == 0
        assert sum(got["sessions_started_by_hour"]) == 3
        assert got["session_duration_seconds"]["count"] == 3
        assert got["requests_per_session"]["mean"] == 2.0
        assert got["requests_per_session"]["p90"] == 3.0
        assert got["user_agents"] == [{"family": "Python", "sessions": 3}]
        assert got["devices"] == [{"kind": "script", "sessions": 3}]
    finally:
        bridge.stop()

"""A slow Kratos or Redis: each request waits a bounded time in all, and requests that
need neither (a fresh session, /health/alive) are not held up behind it.

Run against ``kratos-bridge serve`` with the real Kratos and Redis behind a relay that
trickles their answers one byte at a time (never slow enough for a per-read timeout)
or with Kratos paused by SIGSTOP. The bounds asserted are the documented ones plus a
generous margin; what matters is seconds, not the tens of seconds seen before.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from tests.conftest import SECRET
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, RedisServer, SlowLink, forwarded

KRATOS_TIMEOUT = 1.0
REDIS_TIMEOUT = 0.5
BOUND = KRATOS_TIMEOUT + 2 * REDIS_TIMEOUT  # README: the longest any request waits
MARGIN = 1.5


def _bridge(workdir, kratos_url, admin_url, **env):
    return BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos_url,
            "BRIDGE_KRATOS_ADMIN_URL": admin_url,
            "BRIDGE_KRATOS_TIMEOUT": str(KRATOS_TIMEOUT),
            "BRIDGE_REDIS_TIMEOUT": str(REDIS_TIMEOUT),
            "BRIDGE_REVALIDATE_AFTER": "120",
            "BRIDGE_THREADS": "2",
            "BRIDGE_WORKERS": "1",
            **env,
        },
        workdir,
    )


def _stuck_requests(url: str, users) -> tuple[list[threading.Thread], list]:
    """One /auth per user (more than the bridge's threads), each timed."""
    results = []

    def ask(user):
        started = time.monotonic()
        response = httpx.get(url + "/auth", headers={"X-Session-Token": user.token}, timeout=60)
        results.append((response.status_code, response.json()["error"], time.monotonic() - started))

    threads = [threading.Thread(target=ask, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # they are all waiting on the slow dependency now
    return threads, results


def _others_are_not_held_up(url: str, known, results) -> None:
    """While the slow requests wait, the fresh session and liveness answer at once:
    before any slow request has been answered."""
    fresh = httpx.get(url + "/auth", headers={"X-Session-Token": known.token}, timeout=60)
    alive = httpx.get(url + "/health/alive", timeout=60)
    assert (fresh.status_code, fresh.headers["X-User-Id"]) == (200, known.identity_id)
    assert alive.status_code == 200
    assert results == []


def _all_answered_503_within_the_bound(threads, results, errors) -> None:
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == len(threads)
    for status, error, took in results:
        assert status == 503
        assert error in errors
        assert took < BOUND + MARGIN, took


def _bounded_while_slow(bridge, kratos, slow_down, errors) -> None:
    """A session made fresh first, four more waiting; once ``slow_down()`` has run, the
    waiting ones get 503 within the bound and the fresh one is not held up by them."""
    known = flows.register(kratos)
    assert httpx.get(bridge.url + "/auth", headers={"X-Session-Token": known.token}).is_success
    waiting = [flows.register(kratos) for _ in range(4)]
    slow_down()
    threads, results = _stuck_requests(bridge.url, waiting)
    _others_are_not_held_up(bridge.url, known, results)
    _all_answered_503_within_the_bound(threads, results, errors)


def test_kratos_trickling_its_answer(own_kratos, workdir):
    link = SlowLink(own_kratos.public_port, delay=0)
    bridge = _bridge(workdir, link.url, own_kratos.admin_url)

    def trickle():
        link.delay, link.trickle = 0.25, True

    try:
        _bounded_while_slow(bridge, own_kratos, trickle, {"kratos_unavailable", "timeout"})
        assert "Traceback" not in bridge.log()
    finally:
        bridge.stop()
        link.close()


def test_kratos_paused(own_kratos, workdir):
    bridge = _bridge(workdir, own_kratos.public_url, own_kratos.admin_url)
    try:
        _bounded_while_slow(
            bridge,
            own_kratos,
            lambda: os.kill(own_kratos.process.pid, signal.SIGSTOP),
            {"kratos_unavailable", "timeout"},
        )
        started = time.monotonic()
        ready = httpx.get(bridge.url + "/health/ready", timeout=60)
        assert ready.status_code == 503
        assert time.monotonic() - started < BOUND + MARGIN
    finally:
        os.kill(own_kratos.process.pid, signal.SIGCONT)
        bridge.stop()


def test_redis_trickling_its_answers(kratos, workdir, prefix):
    redis_server = RedisServer(workdir)
    link = SlowLink(redis_server.port, delay=0)
    bridge = _bridge(
        workdir,
        kratos.public_url,
        kratos.admin_url,
        BRIDGE_REDIS_URL=f"redis://127.0.0.1:{link.port}/0",
        BRIDGE_SECRET=SECRET,
        BRIDGE_KEY_PREFIX=prefix,
    )

    def trickle():
        link.delay, link.trickle = 0.2, True

    try:
        _bounded_while_slow(bridge, kratos, trickle, {"store_unavailable", "timeout"})
        assert "Traceback" not in bridge.log()
    finally:
        bridge.stop()
        link.close()
        redis_server.stop()


def test_public_route_goes_without_a_session_when_kratos_is_paused(own_kratos, workdir):
    """A public route needs no session: with Kratos stuck and every thread waiting on it,
    requests carrying a token still reach the app, anonymously, within the bound."""
    rules = workdir / "public-rules.yml"
    rules.write_text("rules:\n  - {match: {path: /public/}, access: public}\n")
    bridge = _bridge(
        workdir,
        own_kratos.public_url,
        own_kratos.admin_url,
        BRIDGE_RULES_FILE=str(rules),
        BRIDGE_THREADS="1",  # most requests wait for the thread, past the bound
    )
    users = [flows.register(own_kratos) for _ in range(6)]
    results = []

    def ask(user):
        headers = {"X-Session-Token": user.token, **forwarded("/public/page")}
        started = time.monotonic()
        response = httpx.get(bridge.url + "/forward-auth", headers=headers, timeout=60)
        took = time.monotonic() - started
        results.append((response.status_code, response.headers.get("X-User-Id"), took))

    os.kill(own_kratos.process.pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=ask, args=(user,)) for user in users]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(results) == len(users)
        for status, user_id, took in results:
            assert (status, user_id) == (200, "")
            assert took < BOUND + MARGIN, took
    finally:
        os.kill(own_kratos.process.pid, signal.SIGCONT)
        bridge.stop()

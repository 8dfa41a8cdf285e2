"""The store's steps of a miss as coroutines on an event loop (``store.on_loop()``), on
the embedded store and on real Redis in its three topologies. On Redis they use the same
keys and scripts as the threaded store, so what one writes the other reads, and the lock
one takes keeps the other waiting until it is let go; a cluster run fails with CROSSSLOT
if a call strays from its slot, and a Sentinel run goes through the master the Sentinels
name. The embedded store is one process's: "another process" is that process again."""

from __future__ import annotations

import asyncio

import pytest

from bridge.errors import StoreUnavailable
from bridge.sessions.session import aal2_event
from bridge.store.base import CredentialEntry, Lock, Rejection
from bridge.wiring import build_store
from tests.conftest import bridge_settings, topology_url
from tests.support.harness import free_port
from tests.support.mirrored import now_ms, session

# Freshness, locks and remembered rejections: far longer than a busy machine stalls a step.
WINDOW_MS = 60_000


@pytest.fixture(params=["embedded", "standalone", "sentinel", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    return topology_url(request.param, request)


@pytest.fixture
def open_store(store_url, kratos, prefix):
    """``open_store()``: a store on the topology (several: several processes, but one
    embedded store)."""
    opened = []

    def open_one(url: str | None = None):
        if store_url is None and url is None and opened:
            return opened[0]
        opened.append(build_store(bridge_settings(kratos, url or store_url, prefix)))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def on_a_loop(store, steps):
    """``steps(on_loop)``, a coroutine, on a fresh loop with the store's loop client."""

    async def run():
        on_loop = store.on_loop()
        try:
            return await steps(on_loop)
        finally:
            await on_loop.aclose()

    return asyncio.run(run())


def test_what_the_loop_saves_the_threads_read_and_back(open_store):
    store = open_store()
    by_threads = session("s-threads")
    store.save("fp-threads", by_threads, None, now_ms())

    async def steps(on_loop):
        assert (
            await on_loop.lookup("fp-loop", now_ms(), WINDOW_MS, 0, with_app=False)
        ).entry is None
        saved = await on_loop.save("fp-loop", session("s-loop"), None, now_ms())
        assert saved.cached and saved.csrf_token
        return await on_loop.lookup("fp-threads", now_ms(), WINDOW_MS, 0, with_app=False)

    found = on_a_loop(store, steps)
    assert found.session is not None and found.session.id == "s-threads"
    assert found.entry == CredentialEntry("s-threads", by_threads.validated_at_ms)
    other_process = open_store()  # knows no pointer yet: reads it from Redis
    seen = other_process.lookup("fp-loop", now_ms(), WINDOW_MS, 0, with_app=False)
    assert seen.session is not None and seen.session.id == "s-loop"


def test_the_loops_lock_keeps_another_process_waiting_until_let_go(open_store):
    store, other_process = open_store(), open_store()
    stale = session("s-lock", validated_at=now_ms() - 2 * WINDOW_MS)
    store.save("fp-lock", stale, None, now_ms())

    async def take(on_loop):
        found = await on_loop.lookup("fp-lock", now_ms(), WINDOW_MS, WINDOW_MS, with_app=False)
        return found, await on_loop.revalidation_pending("s-lock")

    found, pending = on_a_loop(store, take)
    assert isinstance(found.lock, Lock) and pending
    waiting = other_process.lookup("fp-lock", now_ms(), WINDOW_MS, WINDOW_MS, with_app=False)
    assert waiting.lock is None and waiting.peer_busy

    async def let_go(on_loop):
        await on_loop.release_revalidation(found.lock)
        return await on_loop.revalidation_pending("s-lock")

    assert on_a_loop(store, let_go) is False
    again = other_process.lookup("fp-lock", now_ms(), WINDOW_MS, WINDOW_MS, with_app=False)
    assert isinstance(again.lock, Lock)
    other_process.release_revalidation(again.lock)


def test_a_save_on_the_loop_lets_go_of_the_lock_it_took(open_store):
    store = open_store()
    store.save(
        "fp-renew", session("s-renew", validated_at=now_ms() - 2 * WINDOW_MS), None, now_ms()
    )

    async def renew(on_loop):
        found = await on_loop.lookup("fp-renew", now_ms(), WINDOW_MS, WINDOW_MS, with_app=False)
        assert isinstance(found.lock, Lock)
        saved = await on_loop.save("fp-renew", session("s-renew"), None, now_ms(), found.lock)
        return saved, await on_loop.revalidation_pending("s-renew")

    saved, pending = on_a_loop(store, renew)
    assert saved.cached and not pending
    fresh = open_store().lookup("fp-renew", now_ms(), WINDOW_MS, WINDOW_MS, with_app=False)
    assert fresh.session is not None and fresh.lock is None and not fresh.peer_busy


@pytest.mark.parametrize("known_here", [True, False], ids=["known", "pointer-only"])
def test_a_rejection_forgotten_on_the_loop_is_seen_by_every_process(open_store, known_here):
    """Known here, the session's keys go in one round trip; known only to the pointer (a
    process that never saw the session), the pointer names it first."""
    writer = open_store()
    mirrored = session("s-gone", validated_at=now_ms() - 2 * WINDOW_MS)
    writer.save("fp-gone", mirrored, None, now_ms())
    store = writer if known_here else open_store()

    async def reject(on_loop):
        found = await on_loop.lookup("fp-gone", now_ms(), WINDOW_MS, WINDOW_MS, with_app=False)
        rejection = Rejection(now_ms(), keep_ms=WINDOW_MS)
        await on_loop.forget("fp-gone", found.session, rejection, found.lock)
        return await on_loop.revalidation_pending("s-gone")

    assert on_a_loop(store, reject) is False
    seen = open_store().lookup("fp-gone", now_ms(), WINDOW_MS, 0, with_app=False)
    assert isinstance(seen.entry, Rejection) and seen.session is None
    assert open_store().load("s-gone") is None


def test_an_upgrade_saved_on_the_loop_is_recorded_once(open_store):
    """The rare follow-up (an AAL2 event, appended durably) runs as the threaded store
    runs it; a second save of the same upgrade appends nothing."""
    store = open_store()
    upgraded = session("s-aal2", aal="aal2")
    event = aal2_event(upgraded, now_ms())
    before = len(store.aal2_events(1000))

    async def save_twice(on_loop):
        first = await on_loop.save("fp-aal2", upgraded, event, now_ms())
        second = await on_loop.save("fp-aal2", upgraded, event, now_ms())
        return first, second

    first, second = on_a_loop(store, save_twice)
    assert first.cached and first.aal2_event_id is not None
    assert second.cached and second.aal2_event_id is None
    assert len(store.aal2_events(1000)) == before + 1


def test_use_on_the_loop_refuses_an_idle_session(open_store):
    store = open_store()
    store.save("fp-idle", session("s-idle"), None, now_ms())

    async def uses(on_loop):
        first = await on_loop.use("s-idle", now_ms() - 10_000, 1000)
        return first, await on_loop.use("s-idle", now_ms(), 1000)

    first, later = on_a_loop(store, uses)
    assert first is None
    assert later is not None and later.session_id == "s-idle"


def test_redis_out_of_reach_is_store_unavailable(open_store):
    store = open_store(f"redis://127.0.0.1:{free_port()}")

    async def lookup(on_loop):
        with pytest.raises(StoreUnavailable):
            await on_loop.lookup("fp", now_ms(), WINDOW_MS, 0, with_app=False)

    on_a_loop(store, lookup)

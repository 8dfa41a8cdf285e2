"""Refresh-ahead: sessions in use are re-validated shortly before their freshness ends,
on threads of their own, so that busy sessions' requests never wait for Kratos.

Once a copy is past ``REFRESH_AT`` of ``revalidate_after`` and asked for again (the
mirror decides), one refresh is scheduled, due ``lead`` before the copy stops being
fresh. Due late, not at once, so that a session in use costs Kratos barely more than
one call per ``revalidate_after``; due early enough that the answer is back before the
copy goes stale. The credential is held in memory only until its refresh has run.

When refreshes fall behind (a CPU too small for the load, a slow Kratos), the lead
grows with them: it is twice the recent delay from a refresh's due time to its end,
at most the part of the window after ``REFRESH_AT`` (a quarter), and copies are
looked at for a refresh earlier (twice the lead before the end), so that a busy
session is found busy before its refresh is due. The work stays bounded: a few threads
run the refreshes, the next is taken only when one is free, and a refresh that could
only start once its copy is stale is dropped (a request that still needs the session
re-validates it on the ordinary path; the next window schedules a refresh again).

Each refresh's due time is moved earlier by a random part of a slice of the window
(``JITTER_SHARE``, less whatever the lead already takes of the last quarter). Sessions
first validated together (a warm-up, a restart) would otherwise come due together in
every window after, a herd larger than Kratos and the CPU can take at once; with the
jitter they spread a little further apart each window.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bridge.logs import Throttled
from bridge.pipeline.credentials import Credential

log = logging.getLogger(__name__)
_behind = Throttled(log, interval=60.0)

REFRESH_AT = 0.75
"""Share of ``revalidate_after`` after which a copy in use is scheduled for a refresh
(while refreshes keep up; see ``refresh_zone``)."""

JITTER_SHARE = 0.15
"""Share of ``revalidate_after`` over which refreshes' due times are spread, before the
lead (while refreshes keep up, due between 80% and 95% of the window). With the lead
never more than the part after ``REFRESH_AT``, so no refresh is due earlier than one
was without the jitter at the longest lead; on average a session costs Kratos about 8%
more calls."""

LEAD_PER_DELAY = 2.0
"""The lead as a multiple of the recent delay: room for a refresh twice as slow."""

REFRESH_THREADS = 4
"""Refreshes under way at once, at most: enough that refreshes waiting on Kratos or Redis
keep up with a few hundred sessions a second, few enough that the event loop keeps the
CPU for the requests it answers from memory."""


def refresh_lead_ms(revalidate_after_ms: int) -> int:
    """How long before the end of freshness a refresh is due when refreshes keep up: 5%
    of the window, at least 100 ms (a Kratos call under load) and at most 1 s."""
    return max(100, min(1000, revalidate_after_ms // 20))


def refresh_lead(revalidate_after: float, recent_delay: float) -> float:
    """Seconds before the end of freshness a refresh is due: the base lead, or
    ``LEAD_PER_DELAY`` times the recent delay (from due to done) if longer, but never
    earlier than ``REFRESH_AT`` of the window, where refreshes are first scheduled."""
    base = refresh_lead_ms(int(revalidate_after * 1000)) / 1000
    most = (1 - REFRESH_AT) * revalidate_after
    return max(base, min(most, LEAD_PER_DELAY * recent_delay))


def jitter_slice(revalidate_after: float, lead: float) -> float:
    """Seconds over which a refresh's due time is spread before the lead: ``JITTER_SHARE``
    of the window, or what the lead leaves of the part after ``REFRESH_AT``."""
    most = (1 - REFRESH_AT) * revalidate_after
    return max(0.0, min(JITTER_SHARE * revalidate_after, most - lead))


_jitter_source = random.Random()  # noqa: S311 (when a refresh runs is no secret)


def draw_jitter() -> float:
    """The share of the slice one refresh is moved earlier by, uniform in [0, 1)."""
    return _jitter_source.random()


def refresh_zone(revalidate_after: float, lead: float) -> float:
    """Seconds into the window from which a copy asked for twice is scheduled: at
    ``REFRESH_AT``, or earlier when the lead is long, so that a busy session is found
    busy (two asks) before its refresh is due, not after."""
    return min(REFRESH_AT * revalidate_after, revalidate_after - 2 * lead)


def recent_delay(previous: float, elapsed: float, observed: float, window: float) -> float:
    """The recent delay, from the one ``elapsed`` seconds before and one more observed:
    the longest seen, fading by half each ``window``. A slow spell moves the lead at
    once; one quick refresh within it does not move it back."""
    if window <= 0:
        return observed
    return max(observed, previous * 0.5 ** (elapsed / window))


@dataclass(frozen=True, slots=True)
class Taken:
    """A refresh handed to a thread: ``due`` is when it was due, by the lead then (and
    its jitter)."""

    fingerprint: str
    credential: Credential
    due: float
    stale_at: float


class RefreshQueue:
    """Refreshes waiting for their time, the one due soonest first. No threads and no
    clock: times are ``time.monotonic()`` seconds, passed in. ``jitter`` draws each
    refresh's share of the jitter slice (``draw_jitter`` when not given)."""

    def __init__(self, revalidate_after: float, jitter: Callable[[], float] | None = None) -> None:
        self._window = revalidate_after
        self._jitter = jitter
        # (stale_at less the jitter, order, fingerprint, credential, added_at, stale_at):
        # the jitter is drawn once, so the order by due time holds as the lead changes.
        self._waiting: list[tuple[float, int, str, Credential, float, float]] = []
        self._order = itertools.count()
        self._pending: set[str] = set()
        self._recent_delay = 0.0
        self._observed_at = 0.0
        self.dropped = 0
        self.zone = refresh_zone(revalidate_after, self.lead())

    def lead(self) -> float:
        """Seconds before its copy goes stale that a refresh is due, as of now."""
        return refresh_lead(self._window, self._recent_delay)

    def pending(self, fingerprint: str) -> bool:
        """Scheduled and not finished (or dropped) yet."""
        return fingerprint in self._pending

    def add(self, fingerprint: str, credential: Credential, stale_at: float, now: float) -> bool:
        """Schedule a refresh of the copy that stops being fresh at ``stale_at``, unless
        one is pending already. ``True`` when it is the next due now (so a thread waiting
        for the one that was must look again)."""
        if fingerprint in self._pending:
            return False
        self._pending.add(fingerprint)
        share = (self._jitter or draw_jitter)()
        jittered = stale_at - share * jitter_slice(self._window, self.lead())
        entry = (jittered, next(self._order), fingerprint, credential, now, stale_at)
        heapq.heappush(self._waiting, entry)
        return self._waiting[0][2] == fingerprint

    def take(self, now: float) -> Taken | float | None:
        """The refresh due at ``now``, or else the seconds until the next one is due
        (``None``: none waits). One whose copy is stale by ``now`` is dropped: it would
        cost Kratos a call that no copy in use gains from."""
        while self._waiting:
            jittered, _, fingerprint, credential, added_at, stale_at = self._waiting[0]
            # Never due before the part after REFRESH_AT, however long the lead grew.
            early = min(stale_at - jittered + self.lead(), (1 - REFRESH_AT) * self._window)
            # Scheduled after the lead began (the copy was asked for late): due at once.
            due = max(stale_at - early, added_at)
            if now < due:
                return due - now
            heapq.heappop(self._waiting)
            if now < stale_at:
                return Taken(fingerprint, credential, due, stale_at)
            self._pending.discard(fingerprint)
            self.dropped += 1
            self._observe(now, now - due)
        return None

    def finished(self, taken: Taken, now: float) -> None:
        self._pending.discard(taken.fingerprint)
        self._observe(now, now - taken.due)

    def clear(self) -> None:
        self._waiting.clear()
        self._pending.clear()

    def _observe(self, now: float, delay: float) -> None:
        elapsed = max(0.0, now - self._observed_at)
        self._recent_delay = recent_delay(self._recent_delay, elapsed, delay, self._window)
        self._observed_at = now
        self.zone = refresh_zone(self._window, self.lead())


class Refresher:
    """Runs ``refresh(credential, fingerprint)`` once per scheduled fingerprint when
    due, on ``threads`` threads: at most that many refreshes are ever under way, and
    the next is taken from the queue only once a thread is free for it."""

    def __init__(
        self,
        refresh: Callable[[Credential, str], None],
        revalidate_after: float,
        threads: int = REFRESH_THREADS,
    ) -> None:
        self._refresh = refresh
        self._queue = RefreshQueue(revalidate_after)
        self._wake = threading.Condition()
        self._free = threading.Semaphore(threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bridge-refresh")
        self._closed = False
        threading.Thread(target=self._run, name="bridge-refresh-timer", daemon=True).start()

    @property
    def zone(self) -> float:
        """Seconds into the window after which a copy in use is to be scheduled."""
        return self._queue.zone

    def schedule(self, fingerprint: str, credential: Credential, stale_at: float) -> None:
        """Refresh the copy that stops being fresh at ``stale_at`` (``time.monotonic()``),
        the lead ahead, unless a refresh of it is pending already."""
        if self._queue.pending(fingerprint):  # the cheap check, without the lock
            return
        with self._wake:
            now = time.monotonic()
            if not self._closed and self._queue.add(fingerprint, credential, stale_at, now):
                self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._queue.clear()
            self._wake.notify()
        self._free.release()  # the timer may be waiting for a thread
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while True:
            self._free.acquire()
            with self._wake:
                taken = self._next()
            if taken is None:
                return
            self._pool.submit(self._run_one, taken)

    def _next(self) -> Taken | None:
        """The next refresh due, once it is (``None``: closed). Holds ``_wake``."""
        dropped = self._queue.dropped
        while not self._closed:
            taken = self._queue.take(time.monotonic())
            if self._queue.dropped > dropped:
                _behind.warning(
                    "background refreshes fall behind: %d dropped so far, their copies "
                    "stale before a thread was free",
                    self._queue.dropped,
                )
                dropped = self._queue.dropped
            if isinstance(taken, Taken):
                return taken
            self._wake.wait(taken)
        return None

    def _run_one(self, taken: Taken) -> None:
        try:
            self._refresh(taken.credential, taken.fingerprint)
        except Exception:
            log.exception("background refresh failed")
        finally:
            with self._wake:
                self._queue.finished(taken, time.monotonic())
            self._free.release()

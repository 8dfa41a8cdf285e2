"""Refresh-ahead: sessions in use are re-validated shortly before their freshness ends,
on threads of their own, so that busy sessions' requests never wait for Kratos.

Once a copy is past ``REFRESH_AT`` of ``revalidate_after`` and asked for again (the
mirror decides), one refresh is scheduled, due ``lead`` before the copy stops being
fresh. Due late, not at once, so that a
session in use costs Kratos barely more than one call per ``revalidate_after``; due
early enough that the answer is back before the copy goes stale. The credential is
held in memory only until its refresh has run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from bridge.pipeline.credentials import Credential

log = logging.getLogger(__name__)

REFRESH_AT = 0.75
"""Share of ``revalidate_after`` after which a copy in use is scheduled for a refresh."""


def refresh_lead_ms(revalidate_after_ms: int) -> int:
    """How long before the end of freshness a refresh is due: 5% of the window, at least
    100 ms (a Kratos call under load) and at most 1 s."""
    return max(100, min(1000, revalidate_after_ms // 20))


class Refresher:
    """Runs ``refresh(credential, fingerprint)`` once per scheduled fingerprint when due."""

    def __init__(self, refresh: Callable[[Credential, str], None], threads: int = 2) -> None:
        self._refresh = refresh
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bridge-refresh")
        self._due: list[tuple[float, int, Credential, str]] = []
        self._order = itertools.count()
        self._pending: set[str] = set()
        self._wake = threading.Condition()
        self._closed = False
        threading.Thread(target=self._run, name="bridge-refresh-timer", daemon=True).start()

    def schedule(self, fingerprint: str, credential: Credential, due: float) -> None:
        """Refresh at ``due`` (``time.monotonic()``), unless one is pending already."""
        if fingerprint in self._pending:  # the cheap check, without the lock
            return
        with self._wake:
            if fingerprint in self._pending or self._closed:
                return
            self._pending.add(fingerprint)
            heapq.heappush(self._due, (due, next(self._order), credential, fingerprint))
            if self._due[0][3] == fingerprint:
                self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._due.clear()
            self._wake.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        with self._wake:
            while not self._closed:
                if not self._due:
                    self._wake.wait()
                    continue
                wait = self._due[0][0] - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                _, _, credential, fingerprint = heapq.heappop(self._due)
                self._pool.submit(self._run_one, credential, fingerprint)

    def _run_one(self, credential: Credential, fingerprint: str) -> None:
        try:
            self._refresh(credential, fingerprint)
        except Exception:
            log.exception("background refresh failed")
        finally:
            with self._wake:
                self._pending.discard(fingerprint)

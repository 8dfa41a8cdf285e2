"""The session registry: who the bridge saw, and analytics that outlive the sessions.

The mirror (``SessionStore``) forgets a session when it expires; the registry remembers
what operators ask about afterwards, in bounded structures:

- one record per live session (identity, label, AAL, methods, device, started, expires,
  first and last seen, requests), listed newest first; dropped when the session ends;
- per UTC day: sessions started (and per hour of day), requests, AAL2 events per
  method, ended sessions per reason, user-agent families and device kinds of the
  sessions started, and a HyperLogLog of the identities seen; kept
  ``retention_days`` past the day;
- a capped stream of ended sessions (reason, duration, requests), for percentiles.

A session ends ``expired`` (its expiry passed: found by ``sweep``), ``revoked`` (by an
admin) or ``logged_out`` (Kratos refused a credential of a session the bridge knew). An
ended session is not registered again until its expiry has passed, so a process still
reporting it does not start it twice.

Redis keeps all of it in one hash slot (``<prefix>{registry}:...``), so every step is
one script on standalone, Sentinel and Cluster alike.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.errors import BadRequest

ENDED_STREAM_MAXLEN = 10_000
REASONS = ("expired", "revoked", "logged_out")
GONE_UNKNOWN_MS = 7 * 24 * 3600 * 1000
"""How long a session that ended before it was registered stays unregistrable (its
expiry is not known): a process still reporting it must not start it then."""
DAY_MS = 24 * 3600 * 1000
_PAGE_TOKEN = re.compile(r"([0-9]{1,15})\.([0-9a-fA-F-]{36})")


@dataclass(frozen=True, slots=True)
class Sighting:
    """One session as a process saw it since it last reported it."""

    session_id: str
    identity_id: str
    label: str | None
    aal: str
    methods: tuple[str, ...]
    device: dict[str, str]
    started_at_ms: int
    expires_at_ms: int
    last_seen_ms: int
    requests: int

    def record(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "identity_id": self.identity_id,
            "label": self.label,
            "aal": self.aal,
            "methods": list(self.methods),
            "device": self.device,
            "started_at": self.started_at_ms,
            "expires_at": self.expires_at_ms,
            "first_seen": self.last_seen_ms,
            "last_seen": self.last_seen_ms,
            "requests": self.requests,
        }


@dataclass(frozen=True)
class Counts:
    """What the statistics are made of, read in one step."""

    days: dict[str, dict[str, int]]  # day -> counter -> value
    unique_identities: dict[str, int]  # day -> approximate count
    unique_identities_total: int  # over all the days asked for, approximate
    active: int
    active_aal2: int
    ended: list[dict[str, str]] = field(default_factory=list)  # newest last


@dataclass(frozen=True)
class Page:
    records: list[dict[str, Any]]
    next_token: str | None


class SessionRegistry(Protocol):
    """Failures raise ``StoreUnavailable``."""

    def report(self, sightings: Sequence[Sighting], now_ms: int) -> None:
        """Register sessions (a first sighting counts a started session) and add the
        requests and last-seen times of the others."""

    def end(self, session_id: str, reason: str, now_ms: int) -> bool:
        """Record that a session ended; ``True`` the first time only."""

    def sweep(self, now_ms: int) -> int:
        """End the registered sessions whose expiry has passed; how many."""

    def active(self, now_ms: int) -> int:
        """How many registered sessions have not expired."""

    def count_aal2(self, method: str, at_ms: int) -> None: ...

    def page(self, size: int, token: str | None) -> Page:
        """Live sessions, newest (started) first, ``size`` at a time."""

    def records(self, session_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The records of these sessions that are registered, in the order asked."""

    def counts(self, days: Sequence[str], since_ms: int, now_ms: int) -> Counts: ...


def day_of(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))


def hour_of(ms: int) -> int:
    return time.gmtime(ms / 1000).tm_hour


def days_between(since_ms: int, until_ms: int) -> list[str]:
    """The UTC days from the one holding ``since_ms`` to the one holding ``until_ms``."""
    first = since_ms - since_ms % DAY_MS
    return [day_of(ms) for ms in range(first, until_ms + 1, DAY_MS)]


def keep_until(day: str, retention_days: int) -> int:
    """When a day's keys go: ``retention_days`` after the day ended."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d")) * 1000 + DAY_MS * (1 + retention_days)


def page_token(record: dict[str, Any]) -> str:
    return f"{record['started_at']}.{record['session_id']}"


def read_page_token(token: str | None) -> tuple[int, str] | None:
    """``(started_at, session id)`` of the last record of the previous page."""
    if token is None:
        return None
    match = _PAGE_TOKEN.fullmatch(token)
    if match is None:
        raise BadRequest("page_token is not one this API gave out")
    return int(match[1]), match[2].lower()


def paged(records: Iterable[dict[str, Any]], size: int, token: str | None) -> Page:
    """One page of ``records``: newest (started) first, then by id, after ``token``."""
    after = read_page_token(token)
    ranked = sorted(records, key=lambda r: (r["started_at"], r["session_id"]), reverse=True)
    if after is not None:
        ranked = [r for r in ranked if (r["started_at"], r["session_id"]) < after]
    return Page(ranked[:size], page_token(ranked[size - 1]) if len(ranked) > size else None)


def after_token(ranked: Sequence[tuple[str, int]], token: tuple[int, str] | None) -> list[str]:
    """Session ids from ``ranked`` (newest first: started desc, then id desc) that come
    after ``token``."""
    if token is None:
        return [sid for sid, _ in ranked]
    started, last = token
    return [sid for sid, at in ranked if at < started or (at == started and sid < last)]

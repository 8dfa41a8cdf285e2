"""Session analytics: what the forward-auth path saw, reported to the session registry
off the request path, and the statistics made from it.

On the request path an allowed request costs one dict lookup and an increment (no I/O,
no lock: two threads counting the same session at the same instant may lose one count).
A thread reports, about once a second, the sessions this process has not reported yet
and, at most once a minute per session, the requests and last-seen time of the others.
It also ends the sessions whose expiry passed (``sweep``), and sends the ended
(logged-out) sessions and AAL2 events the mirror told it of.

What is exact and what is not: sessions started, AAL2 events, ended sessions and active
sessions are counted exactly (up to a report lost with a process that died); unique
identities are HyperLogLog estimates (within about 1%) on Redis; requests lag by up to a
minute; durations and requests per session come from the last ``ENDED_STREAM_MAXLEN``
ended sessions in the window.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.clock import iso, now_ms, parse_timestamp_ms
from bridge.errors import BridgeError
from bridge.logs import Throttled
from bridge.observe.decision_log import Trace
from bridge.sessions.mirror import SessionEvents
from bridge.sessions.session import MirroredSession, first_method
from bridge.store.registry import (
    ENDED_STREAM_MAXLEN,
    REASONS,
    SessionRegistry,
    Sighting,
    days_between,
)
from bridge.web.request import HeaderView
from bridge.web.responses import Reply

log = logging.getLogger(__name__)
_failures = Throttled(log, interval=60.0)  # a Redis outage: one line a minute per process

REPORT_EVERY_SECONDS = 1.0
SEEN_AGAIN_EVERY_MS = 60_000  # at most one last-seen write per session per minute
SWEEP_EVERY_SECONDS = 10.0
TOP_USER_AGENTS = 10
DURATION_BUCKETS = (  # the session-duration histogram: label, upper bound in seconds
    ("< 1 min", 60),
    ("1-10 min", 600),
    ("10-60 min", 3600),
    ("1-8 h", 8 * 3600),
    ("8-24 h", 24 * 3600),
    ("> 1 day", math.inf),
)

_FAMILIES = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("Edge", r"Edg(e|A|iOS)?/"),
        ("Opera", r"OPR/|Opera"),
        ("Samsung Internet", r"SamsungBrowser/"),
        ("Chrome", r"Chrome/|CriOS/|Chromium/"),
        ("Firefox", r"Firefox/|FxiOS/"),
        ("Safari", r"Safari/"),
        ("curl", r"^curl/"),
        ("Python", r"python-requests|python-httpx|aiohttp|Python-urllib"),
        ("Go", r"Go-http-client"),
    )
)
_BOT = re.compile(r"bot\b|crawler|spider|Googlebot|bingbot", re.IGNORECASE)
_TABLET = re.compile(r"iPad|Tablet")
_MOBILE = re.compile(r"Mobi|Android|iPhone")
_DESKTOP = re.compile(r"Windows|Macintosh|X11|CrOS|Linux")
_SCRIPT = frozenset(("curl", "Python", "Go"))


def user_agent_family(user_agent: str) -> str:
    """A browser family by the usual tokens (the first that matches, in an order that
    tells Edge and Opera from the Chrome they include); ``Other`` when none does."""
    for name, pattern in _FAMILIES:
        if pattern.search(user_agent):
            return name
    return "Other"


def device_kind(user_agent: str, family: str) -> str:
    if _BOT.search(user_agent):
        return "bot"
    if family in _SCRIPT:
        return "script"
    if _TABLET.search(user_agent):
        return "tablet"
    if _MOBILE.search(user_agent):
        return "mobile"
    if _DESKTOP.search(user_agent):
        return "desktop"
    return "other"


def sighting(session: MirroredSession, requests: int, last_seen_ms: int) -> Sighting:
    view = session.kratos
    device = view.get("device") or {}
    agent = str(device.get("user_agent") or "")
    family = user_agent_family(agent)
    traits = view["identity"].get("traits") or {}
    label = session.email or traits.get("username")
    return Sighting(
        session_id=session.id,
        identity_id=session.identity_id,
        label=label if isinstance(label, str) else None,
        aal=session.aal,
        methods=tuple(dict.fromkeys(str(m["method"]) for m in view["authentication_methods"])),
        device={
            "ip_address": str(device.get("ip_address") or ""),
            "user_agent": agent,
            "location": str(device.get("location") or ""),
            "user_agent_family": family,
            "device_kind": device_kind(agent, family),
        },
        started_at_ms=_started_at_ms(view, session.validated_at_ms),
        expires_at_ms=session.expires_at_ms,
        last_seen_ms=last_seen_ms,
        requests=requests,
    )


def _started_at_ms(view: dict[str, Any], fallback: int) -> int:
    for name in ("issued_at", "authenticated_at"):
        try:
            return parse_timestamp_ms(view.get(name))
        except ValueError:
            continue
    return fallback


@dataclass(slots=True)
class _Seen:
    session: MirroredSession
    requests: int = 0
    reported_at_ms: int = 0  # 0: never reported by this process
    # Last seen is coarse: the first sighting's report, then the report after requests.


@dataclass
class _Outbox:
    ended: list[tuple[str, str, int]] = field(default_factory=list)
    aal2: list[tuple[str, int]] = field(default_factory=list)


class Recorder(SessionEvents):
    """One per process: counts what the forward-auth path allowed, and reports it."""

    def __init__(self, registry: SessionRegistry, clock: Callable[[], int] = now_ms) -> None:
        self._registry = registry
        self._clock = clock
        self._seen: dict[str, _Seen] = {}
        self._outbox = _Outbox()
        self._outbox_lock = threading.Lock()
        self._reporting = threading.Lock()  # one report at a time: the thread, flush, end_now
        self._stop = threading.Event()
        self._last_sweep = 0.0
        self._thread = threading.Thread(target=self._run, name="analytics", daemon=True)
        self._thread.start()

    def watch(
        self, dialect: str, method: str, headers: HeaderView, reply: Reply, trace: Trace
    ) -> None:
        """A ``DecisionWatcher``: each allowed request with a session is a page view."""
        session = trace.session
        if reply.status != 200 or session is None:
            return
        seen = self._seen.get(session.id)
        if seen is None:
            self._seen[session.id] = _Seen(session, 1)
            return
        seen.session = session
        seen.requests += 1

    def session_seen(self, session: MirroredSession) -> None:
        """A session seen without a request (a Kratos web hook): registered, no page view."""
        if session.id not in self._seen:
            self._seen[session.id] = _Seen(session)

    def aal2_recorded(self, session: MirroredSession, event: dict[str, str]) -> None:
        method = first_method(event)
        with self._outbox_lock:
            self._outbox.aal2.append((method, self._clock()))

    def logged_out(self, session: MirroredSession, at_ms: int) -> None:
        reason = "expired" if session.expires_at_ms <= at_ms else "logged_out"
        with self._outbox_lock:
            self._outbox.ended.append((session.id, reason, at_ms))

    def end_now(self, session_id: str, reason: str, at_ms: int) -> None:
        """A session ended here and now (an admin revoked it): its last requests and its
        end are reported before this returns."""
        with self._outbox_lock:
            self._outbox.ended.append((session_id, reason, at_ms))
        self.flush()

    def flush(self) -> None:
        """Report everything now, due or not (at shutdown, for the statistics, in tests)."""
        self._report(force=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * REPORT_EVERY_SECONDS)
        try:
            self.flush()
        except BridgeError as error:
            log.warning("analytics not reported at shutdown: %s", error)

    def _run(self) -> None:
        while not self._stop.wait(REPORT_EVERY_SECONDS):
            try:
                self._report(force=False)
                if time.monotonic() - self._last_sweep >= SWEEP_EVERY_SECONDS:
                    self._registry.sweep(self._clock())
                    self._last_sweep = time.monotonic()
            except BridgeError as error:
                _failures.warning("analytics not reported: %s", error)
            except Exception:
                log.exception("analytics report failed")

    def _report(self, *, force: bool) -> None:
        with self._reporting:
            with self._outbox_lock:
                outbox, self._outbox = self._outbox, _Outbox()
            try:
                self._report_seen(outbox, force=force)
                self._send(outbox)
            except BaseException:
                with self._outbox_lock:  # sent again next time; each step is idempotent
                    self._outbox.ended[:0] = outbox.ended
                    self._outbox.aal2[:0] = outbox.aal2
                raise

    def _report_seen(self, outbox: _Outbox, *, force: bool) -> None:
        now = self._clock()
        ending = {session_id for session_id, _, _ in outbox.ended}
        due: list[tuple[_Seen, int]] = []
        for sid, seen in list(self._seen.items()):
            # A session that ends is reported one last time, so its requests count.
            final = sid in ending or seen.session.expires_at_ms <= now
            waited = now - seen.reported_at_ms >= SEEN_AGAIN_EVERY_MS
            if seen.reported_at_ms and seen.requests == 0:
                if final or waited:
                    self._seen.pop(sid, None)  # not seen since its last report
                continue
            if seen.reported_at_ms and not (force or final or waited):
                continue
            due.append((seen, seen.requests))
            if final:
                self._seen.pop(sid, None)
        sightings = [sighting(seen.session, requests, now) for seen, requests in due]
        if sightings:
            self._registry.report(sightings, now)
        for seen, requests in due:
            seen.requests -= requests  # what arrived meanwhile counts next time
            seen.reported_at_ms = now

    def _send(self, outbox: _Outbox) -> None:
        while outbox.aal2:
            method, at = outbox.aal2[0]
            self._registry.count_aal2(method, at)
            outbox.aal2.pop(0)
        while outbox.ended:
            session_id, reason, at = outbox.ended[0]
            self._registry.end(session_id, reason, at)
            outbox.ended.pop(0)


def statistics(
    registry: SessionRegistry, since_ms: int, now: int, retention_days: int
) -> dict[str, Any]:
    """The statistics ``/admin/stats`` serves, for the days from ``since_ms`` to ``now``."""
    days = days_between(since_ms, now)
    counts = registry.counts(days, since_ms, now)
    per_day, by_hour = [], [0] * 24
    by_method: dict[str, int] = {}
    agents: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for day in days:
        counters = counts.days.get(day, {})
        aal2 = _prefixed(counters, "aal2:")
        for method, count in aal2.items():
            by_method[method] = by_method.get(method, 0) + count
        for hour, count in _prefixed(counters, "hour:").items():
            by_hour[int(hour)] += count
        for family, count in _prefixed(counters, "ua:").items():
            agents[family] = agents.get(family, 0) + count
        for kind, count in _prefixed(counters, "device:").items():
            kinds[kind] = kinds.get(kind, 0) + count
        ended = _prefixed(counters, "ended:")
        per_day.append(
            {
                "day": day,
                "sessions_started": counters.get("started", 0),
                "unique_identities": counts.unique_identities.get(day, 0),
                "aal2_events": aal2,
                "requests": counters.get("requests", 0),
                "ended": {reason: ended.get(reason, 0) for reason in REASONS},
            }
        )
    durations = sorted(int(e["duration_ms"]) / 1000 for e in counts.ended)
    requests = sorted(int(e["requests"]) for e in counts.ended)
    return {
        "since": iso(since_ms),
        "until": iso(now),
        "generated_at": iso(now),
        "retention_days": retention_days,
        "active_sessions": counts.active,
        "active_aal2_sessions": counts.active_aal2,
        "aal2_share": round(counts.active_aal2 / counts.active, 4) if counts.active else 0.0,
        "unique_identities": counts.unique_identities_total,
        "days": per_day,
        "sessions_started_by_hour": by_hour,
        "aal2_events_by_method": by_method,
        "session_duration_seconds": _summary(durations, mean=False),
        "session_duration_histogram": _histogram(durations),
        "requests_per_session": _summary(requests, mean=True),
        "user_agents": [
            {"family": name, "sessions": count}
            for name, count in sorted(agents.items(), key=lambda item: (-item[1], item[0]))
        ][:TOP_USER_AGENTS],
        "devices": [
            {"kind": name, "sessions": count}
            for name, count in sorted(kinds.items(), key=lambda item: (-item[1], item[0]))
        ],
        "ended_sample_limit": ENDED_STREAM_MAXLEN,
    }


def _histogram(durations: list[float]) -> list[int]:
    """How many of ``durations`` (seconds, sorted) fall in each of ``DURATION_BUCKETS``."""
    counts = [0] * len(DURATION_BUCKETS)
    bounds = [bound for _, bound in DURATION_BUCKETS]
    for duration in durations:
        counts[next(i for i, bound in enumerate(bounds) if duration < bound)] += 1
    return counts


def _prefixed(counters: dict[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: v for k, v in counters.items() if k.startswith(prefix)}


def _summary(values: list[float] | list[int], *, mean: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"count": len(values), "approximate": True}
    for name, share in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        summary[name] = _nearest_rank(values, share)
    if mean:
        summary["mean"] = round(sum(values) / len(values), 3) if values else None
    return summary


def _nearest_rank(values: list[float] | list[int], share: float) -> float | None:
    if not values:
        return None
    return float(values[max(0, math.ceil(share * len(values)) - 1)])

"""The session registry in process, beside the embedded store: the same behaviour as
``bridge.store.redis.registry`` with plain dicts (unique identities are counted exactly here)."""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Any

from bridge.store.registry import (
    ENDED_STREAM_MAXLEN,
    GONE_UNKNOWN_MS,
    Counts,
    Page,
    Sighting,
    day_of,
    hour_of,
    keep_until,
    paged,
)


class MemoryRegistry:
    def __init__(self, retention_days: int) -> None:
        self._retention_days = retention_days
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self._gone: dict[str, int] = {}
        self._days: dict[str, dict[str, int]] = defaultdict(dict)
        self._identities: dict[str, set[str]] = defaultdict(set)
        self._ended: deque[dict[str, str]] = deque(maxlen=ENDED_STREAM_MAXLEN)

    def report(self, sightings: Sequence[Sighting], now_ms: int) -> None:
        with self._lock:
            self._drop_old_days(now_ms)
            for seen in sightings:
                gone = self._gone.get(seen.session_id)
                before = self._records.get(seen.session_id)
                if (gone is not None and gone > now_ms) or (
                    before is None and seen.expires_at_ms <= now_ms
                ):
                    continue  # an expired session is not registered; a registered one is
                record = seen.record()
                if before is None:
                    day = self._days[day_of(seen.started_at_ms)]
                    for counter in (
                        "started",
                        f"hour:{hour_of(seen.started_at_ms)}",
                        f"ua:{seen.device.get('user_agent_family', 'Other')}",
                        f"device:{seen.device.get('device_kind', 'other')}",
                    ):
                        _add(day, counter, 1)
                else:
                    record["first_seen"] = before["first_seen"]
                    record["requests"] = before["requests"] + seen.requests
                    record["last_seen"] = max(before["last_seen"], seen.last_seen_ms)
                    record["expires_at"] = max(before["expires_at"], seen.expires_at_ms)
                self._records[seen.session_id] = record
                seen_day = day_of(seen.last_seen_ms)
                self._identities[seen_day].add(seen.identity_id)
                if seen.requests:
                    _add(self._days[seen_day], "requests", seen.requests)

    def end(self, session_id: str, reason: str, now_ms: int) -> bool:
        with self._lock:
            return self._finish(session_id, reason, now_ms, now_ms)

    def sweep(self, now_ms: int) -> int:
        with self._lock:
            self._gone = {sid: until for sid, until in self._gone.items() if until > now_ms}
            due = sorted(
                (r["expires_at"], sid)
                for sid, r in self._records.items()
                if r["expires_at"] <= now_ms
            )
            return sum(self._finish(sid, "expired", at, now_ms) for at, sid in due)

    def active(self, now_ms: int) -> int:
        with self._lock:
            return sum(1 for r in self._records.values() if r["expires_at"] > now_ms)

    def _finish(self, session_id: str, reason: str, at_ms: int, now_ms: int) -> bool:
        record = self._records.pop(session_id, None)
        if record is None:
            until = now_ms + GONE_UNKNOWN_MS
            self._gone[session_id] = max(self._gone.get(session_id, 0), until)
            return False
        self._gone[session_id] = record["expires_at"]
        self._ended.append(
            {
                "session_id": session_id,
                "identity_id": record["identity_id"],
                "reason": reason,
                "aal": record["aal"],
                "started_at": str(record["started_at"]),
                "ended_at": str(at_ms),
                "duration_ms": str(max(0, at_ms - record["started_at"])),
                "requests": str(record["requests"]),
                "recorded_at": str(now_ms),
            }
        )
        _add(self._days[day_of(now_ms)], f"ended:{reason}", 1)
        return True

    def count_aal2(self, method: str, at_ms: int) -> None:
        with self._lock:
            _add(self._days[day_of(at_ms)], f"aal2:{method}", 1)

    def page(self, size: int, token: str | None) -> Page:
        with self._lock:
            found = paged(self._records.values(), size, token)
            return Page([dict(r) for r in found.records], found.next_token)

    def records(self, session_ids: Sequence[str]) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(self._records[sid]) for sid in session_ids if sid in self._records]

    def counts(self, days: Sequence[str], since_ms: int, now_ms: int) -> Counts:
        with self._lock:
            live = [r for r in self._records.values() if r["expires_at"] > now_ms]
            return Counts(
                days={day: dict(self._days.get(day, {})) for day in days},
                unique_identities={day: len(self._identities.get(day, ())) for day in days},
                unique_identities_total=len(
                    set().union(*(self._identities.get(day, set()) for day in days))
                ),
                active=len(live),
                active_aal2=sum(1 for r in live if r["aal"] == "aal2"),
                ended=[e for e in self._ended if int(e["recorded_at"]) >= since_ms],
            )

    def _drop_old_days(self, now_ms: int) -> None:
        for day in [d for d in self._days if keep_until(d, self._retention_days) <= now_ms]:
            del self._days[day]
        for day in [d for d in self._identities if keep_until(d, self._retention_days) <= now_ms]:
            del self._identities[day]


def _add(counters: dict[str, int], name: str, amount: int) -> None:
    counters[name] = counters.get(name, 0) + amount

"""What the admin API and the dashboard do with sessions, in one place: list, find, show
and revoke them, read the AAL2 events and the statistics. An identity's sessions and one
session's detail are Kratos's (its admin API), joined with what the bridge saw.

A revocation is Kratos's first: the session is disabled through Kratos's admin API, and
only once Kratos said so is the mirror dropped, with an announcement that makes every
bridge process drop its own copy at once (``AdminStore.end_session``). A Kratos failure
raises ``KratosUnavailable`` and changes nothing here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from bridge.clock import iso, now_ms, parse_timestamp_ms
from bridge.errors import NotFound, StoreUnavailable
from bridge.kratos.admin import KratosAdmin
from bridge.observe.analytics import statistics
from bridge.sessions.ending import SessionEnder
from bridge.sessions.session import first_method
from bridge.store.base import AdminStore
from bridge.store.registry import paged

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.kratos.whoami import KratosClient
    from bridge.observe.analytics import Recorder
    from bridge.observe.metrics import Metrics
    from bridge.store import SessionStore

SEARCH_SCAN_LIMIT = 10_000  # registry records a search reads at most
EVENT_SCAN_LIMIT = 50_000  # stream entries one events call reads at most
_SEARCH_PAGE = 500


class AdminParts(Protocol):
    """What the operators' side uses of the process's parts (``bridge.wiring.Bridge``)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> SessionStore: ...

    @property
    def kratos(self) -> KratosClient: ...  # its readiness, for the health line

    @property
    def recorder(self) -> Recorder | None: ...

    @property
    def metrics(self) -> Metrics | None: ...


@dataclass(frozen=True)
class Listing:
    sessions: list[dict[str, Any]]
    next_page_token: str | None


@dataclass(frozen=True)
class Events:
    events: list[dict[str, str]]
    next_page_token: str | None


@dataclass(frozen=True)
class Latest:
    """The newest matching events, and what all of them add up to."""

    events: list[dict[str, str]]  # newest first
    total: int
    per_day: dict[str, dict[str, int]]  # day -> first method -> events
    scan_limited: bool  # the window held more than EVENT_SCAN_LIMIT entries


class SessionAdmin:
    def __init__(self, bridge: AdminParts, kratos: KratosAdmin | None = None) -> None:
        settings = bridge.settings
        self._bridge = bridge
        self._store: AdminStore = bridge.store
        self.kratos = kratos or KratosAdmin.of(settings)
        self._ender = SessionEnder(self._store, bridge.recorder, settings.request_budget)

    def page(self, size: int, token: str | None) -> Listing:
        """Live sessions, newest first."""
        page = self._store.registry.page(size, token)
        return Listing([summary(r) for r in page.records], page.next_token)

    def of_identity(self, identity_id: str, size: int, token: str | None) -> Listing:
        """Every session Kratos holds for the identity, active or not, newest first: Kratos
        is the truth, so a session created a moment ago, or never used through the bridge,
        is listed. Each is joined with what the bridge saw of it, where it did
        (``seen_by_bridge``). Kratos failing is ``KratosUnavailable``, never a list of only
        what the bridge saw."""
        in_kratos = self.kratos.identity_sessions(identity_id)
        if in_kratos is None:
            raise NotFound("Kratos knows no such identity")
        ids = [found["id"] for found in in_kratos]
        seen = {record["session_id"]: record for record in self._store.registry.records(ids)}
        ranked = [
            {
                "session_id": found["id"],
                "started_at": _time_ms(found.get("issued_at")),
                "row": joined(found, seen.get(found["id"]), identity_id),
            }
            for found in in_kratos
        ]
        page = paged(ranked, size, token)
        return Listing([ranked_row["row"] for ranked_row in page.records], page.next_token)

    def search(self, text: str, size: int) -> list[dict[str, Any]]:
        """Live sessions whose label (email) contains ``text`` (case-insensitive), or whose
        session or identity id is ``text``; newest first, reading at most
        ``SEARCH_SCAN_LIMIT`` records."""
        needle = text.strip().lower()
        found: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(SEARCH_SCAN_LIMIT // _SEARCH_PAGE):
            page = self._store.registry.page(_SEARCH_PAGE, token)
            for record in page.records:
                label = (record.get("label") or "").lower()
                ids = (record["session_id"], record["identity_id"])
                if needle in ids or (needle and needle in label):
                    found.append(summary(record))
                    if len(found) == size:
                        return found
            token = page.next_token
            if token is None:
                break
        return found

    def show(self, session_id: str, *, app_values: bool = False) -> dict[str, Any]:
        """The session as Kratos holds it (``kratos``: its own fields, devices and identity
        included), joined with what the bridge saw of it where it did (``session``, as a
        row of an identity's list, with ``seen_by_bridge``; its device-change signals;
        the mirror's view and the app data's names). With ``app_values`` (an operator asked
        to see them), also the app data as stored, under ``app``. Kratos is asked first
        and is the truth: ``NotFound`` when it knows no such session, whatever the bridge
        saw, and ``KratosUnavailable`` when it cannot say, never an answer of only what the
        bridge saw."""
        in_kratos = self.kratos.session(session_id)
        if in_kratos is None:
            raise NotFound("Kratos knows no such session")
        found = self._store.registry.records([session_id])
        identity_id = (in_kratos.get("identity") or {}).get("id") or ""
        mirrored = self._store.load(session_id, with_app=True)
        unified = None
        if mirrored is not None:  # the app data's names only, not its values
            unified = {k: v for k, v in mirrored.to_json().items() if k != "app"}
        shown = {
            "session": joined(in_kratos, found[0] if found else None, identity_id),
            "kratos": kratos_fields(in_kratos),
            "device_changes": self.device_changes(session_id),
            "active_in_kratos": in_kratos.get("active") is True,
            "unified": unified,
            "app_keys": sorted(mirrored.app) if mirrored is not None else [],
        }
        if app_values:
            shown["app"] = dict(mirrored.app) if mirrored is not None else {}
        return shown

    def revoke(self, session_id: str) -> list[str]:
        known = self.kratos.revoke(session_id)
        self._end(session_id)  # also when Kratos knows none: nor should the bridge
        if not known:
            raise NotFound("Kratos knows no such session")
        return [session_id]

    def revoke_identity(self, identity_id: str, spared: str | None = None) -> list[str]:
        in_kratos = self.kratos.active_session_ids(identity_id)
        if in_kratos is None:
            raise NotFound("Kratos knows no such identity")
        known = self._store.identity_session_ids(identity_id, now_ms())
        doomed = [sid for sid in dict.fromkeys([*in_kratos, *known]) if sid != spared]
        if spared is None:
            self.kratos.revoke_identity(identity_id)
            for sid in doomed:
                self._end(sid)
            return doomed
        for sid in doomed:  # each ended here as soon as Kratos has, should a later one fail
            if sid in in_kratos:
                self.kratos.revoke(sid)
            self._end(sid)
        return doomed

    def _end(self, session_id: str) -> None:
        try:
            self._ender.end(session_id, "revoked", by="admin")
        except StoreUnavailable as error:
            raise StoreUnavailable(
                f"session {session_id} is revoked in Kratos, but the bridge could not record "
                f"it ({error}): bridge processes refuse it within BRIDGE_REVALIDATE_AFTER"
            ) from None

    def aal2_events(
        self,
        since_ms: int,
        until_ms: int,
        size: int,
        after: str | None = None,
        identity_id: str | None = None,
        method: str | None = None,
        session_id: str | None = None,
    ) -> Events:
        """AAL2 events oldest first, filtered; ``next_page_token`` when there may be more."""
        events: list[dict[str, str]] = []
        last = after
        scanned = 0
        while len(events) < size:
            if scanned >= EVENT_SCAN_LIMIT:  # a rare filter: the caller pages on from here
                return Events(events, last)
            batch = self._store.aal2_event_range(last, since_ms, until_ms, max(size, 1000))
            scanned += len(batch)
            for entry_id, fields in batch:
                last = entry_id
                if _wanted(fields, identity_id, method, session_id):
                    at = iso(int(entry_id.split("-")[0]))
                    events.append({"id": entry_id, "at": at, **fields})
                    if len(events) == size:
                        break
            if len(batch) < max(size, 1000):
                break
        return Events(events, last if len(events) == size else None)

    def latest_aal2_events(
        self,
        since_ms: int,
        until_ms: int,
        limit: int,
        identity_id: str | None = None,
        method: str | None = None,
    ) -> Latest:
        newest: deque[dict[str, str]] = deque(maxlen=limit)
        per_day: dict[str, dict[str, int]] = {}
        total, token = 0, None
        for _ in range(EVENT_SCAN_LIMIT // 1000):
            found = self.aal2_events(since_ms, until_ms, 1000, token, identity_id, method)
            for event in found.events:
                total += 1
                newest.append(event)
                counts = per_day.setdefault(event["at"][:10], {})
                first = first_method(event)
                counts[first] = counts.get(first, 0) + 1
            token = found.next_page_token
            if token is None:
                return Latest(list(reversed(newest)), total, per_day, scan_limited=False)
        return Latest(list(reversed(newest)), total, per_day, scan_limited=True)

    def device_changes(self, session_id: str, limit: int = 100) -> list[dict[str, str]]:
        """The session's device-change signals (from the capped stream), oldest first."""
        return [
            {"id": entry_id, "at": iso(int(entry_id.split("-")[0])), **fields}
            for entry_id, fields in self._store.device_changes(10_000)
            if fields.get("session_id") == session_id
        ][:limit]

    def stats(self, since_ms: int, now: int) -> dict[str, Any]:
        recorder = self._bridge.recorder
        if recorder is not None:
            recorder.flush()  # this process's own counts, up to now
        self._store.registry.sweep(now)  # sessions that expired are counted as ended by now
        retention = self._bridge.settings.analytics_retention_days
        return statistics(self._store.registry, since_ms, now, retention)

    def active_sessions(self) -> int:
        return self._store.registry.active(now_ms())


def _wanted(
    fields: dict[str, str], identity_id: str | None, method: str | None, session_id: str | None
) -> bool:
    if identity_id is not None and fields.get("identity_id") != identity_id:
        return False
    if session_id is not None and fields.get("session_id") != session_id:
        return False
    return method is None or method in (fields.get("methods") or "").split(",")


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """A registry record as the admin API shows a session."""
    return {
        "session_id": record["session_id"],
        "identity_id": record["identity_id"],
        "label": record.get("label"),
        "aal": record["aal"],
        "methods": record["methods"],
        "device": record["device"],
        "started_at": iso(record["started_at"]),
        "expires_at": iso(record["expires_at"]),
        "first_seen_at": iso(record["first_seen"]),
        "last_seen_at": iso(record["last_seen"]),
        "requests": record["requests"],
    }


def from_kratos(found: dict[str, Any]) -> dict[str, Any]:
    """A session the bridge never saw, as Kratos describes it."""
    identity = found.get("identity") or {}
    traits = identity.get("traits") or {}
    device = (found.get("devices") or [{}])[0] or {}
    return {
        "session_id": found.get("id"),
        "identity_id": identity.get("id"),
        "label": traits.get("email") if isinstance(traits.get("email"), str) else None,
        "aal": _plain(found.get("authenticator_assurance_level")),
        "methods": [_plain(m.get("method")) for m in found.get("authentication_methods") or []],
        "device": {
            "ip_address": device.get("ip_address") or "",
            "user_agent": device.get("user_agent") or "",
            "location": device.get("location") or "",
        },
        "started_at": _text_time(found.get("issued_at")),
        "expires_at": _text_time(found.get("expires_at")),
        "first_seen_at": None,
        "last_seen_at": None,
        "requests": 0,
    }


def kratos_fields(found: dict[str, Any]) -> dict[str, Any]:
    """Kratos's own fields of a session (as its admin API gives it, with devices and
    identity), as the session detail shows them: what an operator judges a session by,
    without the identity's admin metadata or Kratos's bookkeeping."""
    identity = found.get("identity") or {}
    return {
        "active": found.get("active") is True,
        "issued_at": _text_time(found.get("issued_at")),
        "authenticated_at": _text_time(found.get("authenticated_at")),
        "expires_at": _text_time(found.get("expires_at")),
        "aal": _plain(found.get("authenticator_assurance_level")),
        "authentication_methods": [
            {
                "method": _plain(method.get("method")),
                "aal": _plain(method.get("aal")),
                "completed_at": _text_time(method.get("completed_at")),
                "provider": method.get("provider"),
            }
            for method in found.get("authentication_methods") or []
        ],
        "devices": [
            {
                "id": device.get("id"),
                "ip_address": device.get("ip_address"),
                "user_agent": device.get("user_agent"),
                "location": device.get("location") or None,
            }
            for device in found.get("devices") or []
        ],
        "identity": {
            "id": identity.get("id"),
            "schema_id": identity.get("schema_id"),
            "state": identity.get("state"),
            "traits": identity.get("traits"),
            "metadata_public": identity.get("metadata_public"),
            "verifiable_addresses": [
                {
                    "value": address.get("value"),
                    "via": address.get("via"),
                    "verified": address.get("verified") is True,
                    "status": address.get("status"),
                }
                for address in identity.get("verifiable_addresses") or []
            ],
        },
    }


def joined(found: dict[str, Any], seen: dict[str, Any] | None, identity_id: str) -> dict[str, Any]:
    """A session as Kratos holds it (its AAL, methods, times and ``active``), with what the
    bridge saw of it when it did: the label, the device as classified, first and last
    seen, requests."""
    row = from_kratos(found)
    row["identity_id"] = row["identity_id"] or identity_id
    row["active"] = bool(found.get("active"))
    row["seen_by_bridge"] = seen is not None
    if seen is not None:
        bridge_saw = summary(seen)
        for field in _SEEN_FIELDS:
            row[field] = bridge_saw[field]
        row["label"] = row["label"] or bridge_saw["label"]
    return row


_SEEN_FIELDS = ("device", "first_seen_at", "last_seen_at", "requests")


def _time_ms(value: Any) -> int:
    """Milliseconds since the epoch of a time Kratos gave (0 when it gave none)."""
    text = _text_time(value)
    return parse_timestamp_ms(text) if text else 0


def _plain(value: Any) -> Any:
    """A value the SDK gives as an enum (an AAL), as Kratos's own text: ``aal1``, not the
    enum's name, wherever it is shown."""
    return value.value if isinstance(value, Enum) else value


def _text_time(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z") if hasattr(value, "isoformat") else str(value)

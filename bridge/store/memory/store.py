"""The embedded store: the Redis store's semantics in one process, for running without Redis.

Same key names, same expiries (checked against the wall clock on every read),
same AAL2 stream with the same capped length; one lock makes each call atomic.
It is not shared between processes, so the server runs a single process with it.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from bridge.clock import now_ms
from bridge.errors import AppDataTooLarge, SessionEnded, TooManyAppFields
from bridge.sessions.session import MirroredSession, new_csrf_token
from bridge.store.base import (
    AAL2_MARKER_GRACE_MS,
    ENDED,
    MAX_APP_FIELDS,
    MAX_DEVICE_CHANGES_PER_SESSION,
    CredentialEntry,
    EndedListener,
    Idle,
    Keys,
    Lock,
    Lookup,
    Rejection,
    SaveResult,
    StreamEntry,
)
from bridge.store.memory.registry import MemoryRegistry


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _size(app: dict[str, str]) -> int:
    """What an app hash counts against its cap: UTF-8 bytes of names and values."""
    return sum(len(name.encode()) + len(value.encode()) for name, value in app.items())


class MemoryStore:
    """In-process session store with expiring keys."""

    _SWEEP_EVERY = 1024

    def __init__(
        self,
        keys: Keys,
        stream_maxlen: int,
        device_stream_maxlen: int = 100_000,
        retention_days: int = 90,
    ) -> None:
        self.keys = keys
        self.registry = MemoryRegistry(retention_days)
        self.error_observer: Callable[[str], None] | None = None  # nothing here fails so
        self._followers: list[EndedListener] = []
        self._devices: deque[tuple[str, dict[str, str]]] = deque(maxlen=device_stream_maxlen)
        self._lock = threading.Lock()
        self._ended_appended = threading.Condition(self._lock)
        self._ended: deque[StreamEntry] = deque(maxlen=stream_maxlen)
        # Per consumer group: the newest entry given out, and entries given but not acked.
        self._groups: dict[str, tuple[str, set[str]]] = {}
        self._values: dict[str, Any] = {}
        self._expires: dict[str, int] = {}
        self._stream: deque[tuple[str, dict[str, str]]] = deque(maxlen=stream_maxlen)
        self._last_event_ms = 0
        self._event_seq = itertools.count()
        self._writes = 0

    def find_credential(self, fingerprint: str) -> CredentialEntry | Rejection | None:
        with self._lock:
            pointer = self._get(self.keys.credential(fingerprint))
            if not isinstance(pointer, CredentialEntry):
                return pointer
            return self._credential(pointer.session_id, fingerprint)

    def load(self, session_id: str, *, with_app: bool = False) -> MirroredSession | None:
        with self._lock:
            return self._load(session_id, with_app)

    def lookup(
        self,
        fingerprint: str,
        now_ms: int,
        fresh_for_ms: int,
        lock_ms: int,
        *,
        with_app: bool,
        idle_ms: int = 0,
    ) -> Lookup:
        with self._lock:
            pointer = self._get(self.keys.credential(fingerprint))
            if not isinstance(pointer, CredentialEntry):
                return Lookup(pointer)
            if idle_ms:
                idle = self._use(pointer.session_id, now_ms, idle_ms)
                if idle is not None:
                    return Lookup(None, idle=idle)
            entry = self._credential(pointer.session_id, fingerprint)
            if not isinstance(entry, CredentialEntry):
                return Lookup(entry)
            session = self._load(entry.session_id, with_app)
            if session is None:
                return Lookup(entry)
            session = replace(session, validated_at_ms=entry.validated_at_ms)
            if lock_ms == 0 or now_ms - entry.validated_at_ms < fresh_for_ms:
                return Lookup(entry, session)
            lock = self._claim(entry.session_id, lock_ms)
            return Lookup(entry, session, lock=lock, peer_busy=lock is None)

    def save(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
        release: Lock | None = None,
    ) -> SaveResult:
        sid, expires_at = session.id, session.expires_at_ms
        validated_at = session.validated_at_ms
        with self._lock:
            self._maybe_sweep()
            self._release(release)
            # The same steps as the Redis store's, run under one lock.
            pointer_key = self.keys.credential(fingerprint)
            pointer = self._get(pointer_key)
            newer_rejection = isinstance(pointer, Rejection) and (
                validated_at < pointer.rejected_at_ms
            )
            newer_acceptance = isinstance(pointer, CredentialEntry) and (
                pointer.validated_at_ms > validated_at
            )
            if not (newer_rejection or newer_acceptance):
                self._set(pointer_key, CredentialEntry(sid, validated_at), expires_at)
            state = self._save_session(fingerprint, session)

            index_key = self.keys.identity_sessions(session.identity_id)
            index = {m: s for m, s in (self._get(index_key) or {}).items() if s > now_ms}
            index[sid] = max(index.get(sid, 0), expires_at)
            self._set(index_key, index, max(index.values()))

            if newer_rejection:
                self._forget_session(
                    sid, fingerprint, pointer.rejected_at_ms, self._expires[pointer_key]
                )
                return SaveResult(False, None)
            if state == "ended":
                return SaveResult(False, None)
            stored = self._get(self.keys.session(sid)) or {"expires_at": 0, "csrf": ""}
            if state == "recorded" or aal2_event is None:
                return SaveResult(True, None, stored["csrf"])
            # The session's expiry, which a newer answer may have moved past this one's.
            keep_until = max(expires_at, stored["expires_at"])
            event_id = self._record_upgrade(sid, aal2_event, keep_until)
            return SaveResult(True, event_id, stored["csrf"])

    def forget(
        self,
        fingerprint: str,
        seen: MirroredSession | None,
        rejection: Rejection,
        release: Lock | None = None,
    ) -> None:
        rejected_at = rejection.rejected_at_ms
        with self._lock:
            self._maybe_sweep()
            self._release(release)
            keep_until = rejected_at + max(rejection.keep_ms, 1)
            pointer_key = self.keys.credential(fingerprint)
            pointer = self._get(pointer_key)
            named = pointer.session_id if isinstance(pointer, CredentialEntry) else None
            newer = (
                pointer.rejected_at_ms > rejected_at
                if isinstance(pointer, Rejection)
                else pointer is not None and pointer.validated_at_ms > rejected_at
            )
            if not newer:
                self._set(pointer_key, Rejection(rejected_at), now_ms() + max(rejection.keep_ms, 1))
            sid = seen.id if seen is not None else named
            if sid is not None:
                self._forget_session(sid, fingerprint, rejected_at, keep_until)

    def end_session(self, session_id: str, ended_at_ms: int, keep_ms: int) -> bool:
        with self._lock:
            existed = self._get(self.keys.session(session_id)) is not None
            self._mark_ended(session_id, ended_at_ms, ended_at_ms + keep_ms)
            followers = list(self._followers)
        for listener in followers:
            listener(session_id, ended_at_ms)
        return existed

    def follow_ended(self, listener: EndedListener) -> None:
        with self._lock:
            self._followers.append(listener)

    def use(self, session_id: str, at_ms: int, idle_ms: int) -> Idle | None:
        with self._lock:
            return self._use(session_id, at_ms, idle_ms)

    def record_uses(self, uses: Mapping[str, int]) -> None:
        with self._lock:
            for session_id, at_ms in uses.items():
                self._use(session_id, at_ms, 0)

    def claim_extension(self, session_id: str, expires_at_ms: int) -> bool:
        with self._lock:
            self._maybe_sweep()
            key = self.keys.extension(session_id, expires_at_ms)
            if self._get(key) is not None:
                return False
            self._set(key, True, expires_at_ms)
            return True

    def claim_revalidation(self, session_id: str, ttl_ms: int) -> Lock | None:
        with self._lock:
            self._maybe_sweep()
            return self._claim(session_id, ttl_ms)

    def release_revalidation(self, lock: Lock) -> None:
        with self._lock:
            self._release(lock)

    def revalidation_pending(self, session_id: str) -> bool:
        with self._lock:
            return self._get(self.keys.revalidating(session_id)) is not None

    def identity_session_ids(self, identity_id: str, now_ms: int) -> list[str]:
        with self._lock:
            index = self._get(self.keys.identity_sessions(identity_id)) or {}
            ordered = sorted(index.items(), key=lambda item: item[1])
            return [m for m, s in ordered if s > now_ms and self._get(self.keys.session(m))]

    def aal2_events(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        with self._lock:
            return [(eid, dict(fields)) for eid, fields in itertools.islice(self._stream, count)]

    def aal2_event_range(
        self, after_id: str | None, since_ms: int, until_ms: int, count: int
    ) -> list[tuple[str, dict[str, str]]]:
        after = _entry_order(after_id) if after_id is not None else (since_ms, -1)
        with self._lock:
            found = [
                (eid, dict(fields))
                for eid, fields in self._stream
                if after < _entry_order(eid) and _entry_order(eid)[0] <= until_ms
            ]
        return found[:count]

    def record_device_change(
        self, change_id: str, fields: dict[str, str], keep_until_ms: int
    ) -> bool:
        with self._lock:
            key = self.keys.device_change(change_id)
            if self._get(key) is not None:
                return False
            counter = self.keys.device_session_count(fields.get("session_id", ""))
            if (self._get(counter) or 0) >= MAX_DEVICE_CHANGES_PER_SESSION:
                return False
            self._set(key, True, keep_until_ms)
            counter = self.keys.device_session_count(fields.get("session_id", ""))
            count = self._get(counter) or 0
            if count >= MAX_DEVICE_CHANGES_PER_SESSION:
                return False
            self._set(counter, count + 1, keep_until_ms)
            self._devices.append((self._next_event_id(), dict(fields)))
            return True

    def device_changes(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        with self._lock:
            return [(eid, dict(fields)) for eid, fields in itertools.islice(self._devices, count)]

    def record_ended(
        self, session_id: str, fields: dict[str, str], keep_until_ms: int
    ) -> str | None:
        with self._lock:
            key = self.keys.session_ended(session_id)
            if self._get(key) is not None:
                return None
            entry_id = self._next_event_id()
            self._ended.append((entry_id, dict(fields)))
            self._set(key, entry_id, keep_until_ms)
            self._ended_appended.notify_all()
            return entry_id

    def last_ended_id(self) -> str:
        with self._lock:
            return self._last_ended_id()

    def read_ended(self, after_id: str, count: int, block_ms: int) -> list[StreamEntry]:
        after = _entry_order(after_id)
        with self._lock:
            self._ended_appended.wait_for(
                lambda: self._ended and _entry_order(self._ended[-1][0]) > after, block_ms / 1000
            )
            found = [(e, dict(f)) for e, f in self._ended if _entry_order(e) > after]
        return found[:count]

    def read_ended_group(
        self, group: str, consumer: str, count: int, block_ms: int
    ) -> list[StreamEntry]:
        with self._lock:
            if group not in self._groups:
                self._groups[group] = (self._last_ended_id(), set())

            def unread() -> list[StreamEntry]:
                given = _entry_order(self._groups[group][0])
                return [(e, dict(f)) for e, f in self._ended if _entry_order(e) > given][:count]

            self._ended_appended.wait_for(unread, block_ms / 1000)
            found = unread()
            if found:
                self._groups[group] = (found[-1][0], self._groups[group][1] | {e for e, _ in found})
            return found

    def ack_ended(self, group: str, entry_ids: list[str]) -> None:
        with self._lock:
            if group in self._groups:
                self._groups[group][1].difference_update(entry_ids)

    def update_app(
        self, session_id: str, values: Mapping[str, str], delete: Iterable[str], max_bytes: int
    ) -> dict[str, str]:
        with self._lock:
            self._maybe_sweep()
            session_key, app_key = self.keys.session(session_id), self.keys.app(session_id)
            if self._get(session_key) is None:
                raise SessionEnded()
            stored = self._get(app_key) or {}
            adds = sum(1 for name in values if name not in stored)
            if adds and len(stored) + adds > MAX_APP_FIELDS:
                raise TooManyAppFields(MAX_APP_FIELDS, len(stored) + adds)
            app = {**stored, **values}
            for name in delete:
                app.pop(name, None)
            size = _size(app)
            if size > max_bytes and size > _size(stored):
                raise AppDataTooLarge(max_bytes, size)
            if app:
                self._set(app_key, app, self._expires[session_key])
            else:
                self._delete(app_key)  # as Redis drops a hash without fields
            return dict(app)

    def load_app(self, session_id: str) -> dict[str, str]:
        with self._lock:
            if self._get(self.keys.session(session_id)) is None:
                raise SessionEnded()
            return dict(self._get(self.keys.app(session_id)) or {})

    def ping(self) -> None:
        return None

    def topology(self) -> dict[str, object]:
        return {"kind": "embedded"}

    def on_loop(self) -> MemoryStoreOnLoop:
        """The steps of a miss as coroutines (``MissStepsOnLoop``)."""
        return MemoryStoreOnLoop(self)

    def close(self) -> None:
        with self._lock:
            self._followers.clear()

    # The helpers below run with the lock held.

    def _credential(self, sid: str, fingerprint: str) -> CredentialEntry | Rejection | None:
        value = (self._get(self.keys.credentials(sid)) or {}).get(fingerprint)
        return CredentialEntry(sid, value) if isinstance(value, int) else value

    def _save_session(self, fingerprint: str, session: MirroredSession) -> str:
        """The session step: ``ended`` (a newer rejection; nothing written), ``recorded``
        (no AAL2 event to add) or ``unrecorded``."""
        sid, expires_at = session.id, session.expires_at_ms
        validated_at = session.validated_at_ms
        credentials_key = self.keys.credentials(sid)
        credentials = self._get(credentials_key) or {}
        ended = credentials.get(ENDED)
        if ended is not None and validated_at < ended:
            return "ended"
        known = credentials.get(fingerprint)
        if not isinstance(known, int) or known <= validated_at:
            credentials[fingerprint] = validated_at
        self._set(
            credentials_key, credentials, max(self._expires.get(credentials_key, 0), expires_at)
        )
        stored = self._get(self.keys.session(sid))
        moved = False
        if stored is None or stored["validated_at"] <= validated_at:
            moved = stored is not None and stored["expires_at"] < expires_at
            csrf = stored["csrf"] if stored is not None else new_csrf_token()
            record = {"kratos": session.kratos, "validated_at": validated_at, "csrf": csrf}
            self._set(self.keys.session(sid), {**record, "expires_at": expires_at}, expires_at)
            self._expire_at(self.keys.app(sid), expires_at)
        marker = self.keys.aal2_marker(sid)
        upgrade = self._get(marker)
        if moved:  # Kratos extended it: what belongs to it lives as long (see the Redis store)
            for name in credentials.keys() - {fingerprint, ENDED}:
                self._keep_until(self.keys.credential(name), expires_at)
            if upgrade is not None:
                self._keep_until(self.keys.aal2_upgrade(upgrade), expires_at + AAL2_MARKER_GRACE_MS)
        if upgrade is None:
            return "unrecorded"
        self._keep_until(marker, expires_at + AAL2_MARKER_GRACE_MS)
        return "recorded"

    def _use(self, sid: str, at: int, idle_ms: int) -> Idle | None:
        """The Redis store's ``use`` script."""
        used_key = self.keys.last_use(sid)
        used = self._get(used_key)
        if used == "idle":
            return Idle(sid, first=False)
        if used is not None and idle_ms and at - used > idle_ms:
            self._values[used_key] = "idle"
            return Idle(sid, first=True)
        if used is not None and used >= at:
            return None
        session_key = self.keys.session(sid)
        if self._get(session_key) is not None:
            expires_at = max(self._expires[session_key], self._expires.get(used_key, 0))
            self._set(used_key, at, expires_at)
        elif used is not None:
            self._values[used_key] = at
        return None

    def _record_upgrade(self, sid: str, event: dict[str, str], expires_at: int) -> str | None:
        keep_until = expires_at + AAL2_MARKER_GRACE_MS
        upgrade_key = self.keys.aal2_upgrade(event["upgrade_id"])
        appended = None
        if self._get(upgrade_key) is None:
            appended = self._next_event_id()
            self._stream.append((appended, dict(event)))
            self._set(upgrade_key, appended, keep_until)
        self._keep_until(upgrade_key, keep_until)
        marker = self.keys.aal2_marker(sid)
        self._set(marker, event["upgrade_id"], max(self._expires.get(marker, 0), keep_until))
        return appended

    def _forget_session(
        self, sid: str, fingerprint: str, rejected_at: int, keep_until: int
    ) -> None:
        credentials_key = self.keys.credentials(sid)
        credentials = self._get(credentials_key) or {}
        known = credentials.get(fingerprint)
        if isinstance(known, int) and known > rejected_at:
            return
        credentials[fingerprint] = Rejection(rejected_at)
        self._set(credentials_key, credentials, self._expires.get(credentials_key, keep_until))
        self._mark_ended(sid, rejected_at, keep_until)

    def _mark_ended(self, sid: str, ended_at: int, keep_until: int) -> None:
        """No save asked before ``ended_at`` may write the session again; its mirror and
        app data go."""
        credentials_key = self.keys.credentials(sid)
        credentials = self._get(credentials_key) or {}
        credentials[ENDED] = max(credentials.get(ENDED, 0), ended_at)
        expires = max(self._expires.get(credentials_key, 0), keep_until)
        self._set(credentials_key, credentials, expires)
        self._delete(self.keys.session(sid))
        self._delete(self.keys.app(sid))

    def _load(self, session_id: str, with_app: bool) -> MirroredSession | None:
        record = self._get(self.keys.session(session_id))
        if record is None:
            return None
        return MirroredSession(
            kratos=record["kratos"],
            validated_at_ms=record["validated_at"],
            expires_at_ms=record["expires_at"],
            app=dict(self._get(self.keys.app(session_id)) or {}) if with_app else {},
            csrf_token=record["csrf"],
        )

    def _claim(self, session_id: str, ttl_ms: int) -> Lock | None:
        key = self.keys.revalidating(session_id)
        if self._get(key) is not None:
            return None
        lock = Lock(session_id, os.urandom(12).hex())
        self._set(key, lock.token, now_ms() + ttl_ms)
        return lock

    def _release(self, lock: Lock | None) -> None:
        if lock is None:
            return
        key = self.keys.revalidating(lock.session_id)
        if self._get(key) == lock.token:
            self._delete(key)

    def _get(self, key: str) -> Any:
        expires = self._expires.get(key)
        if expires is not None and expires <= now_ms():
            self._delete(key)
            return None
        return self._values.get(key)

    def _set(self, key: str, value: Any, expires_at_ms: int) -> None:
        self._values[key] = value
        self._expires[key] = expires_at_ms

    def _keep_until(self, key: str, expires_at_ms: int) -> None:
        """Move an existing key's expiry later, never earlier (PEXPIREAT … GT)."""
        if self._get(key) is not None:
            self._expires[key] = max(self._expires[key], expires_at_ms)

    def _expire_at(self, key: str, expires_at_ms: int) -> None:
        if self._get(key) is not None:
            self._expires[key] = expires_at_ms

    def _delete(self, key: str) -> None:
        self._values.pop(key, None)
        self._expires.pop(key, None)

    def _maybe_sweep(self) -> None:
        self._writes += 1
        if self._writes % self._SWEEP_EVERY:
            return
        now = now_ms()
        for key in [k for k, e in self._expires.items() if e <= now]:
            self._delete(key)

    def _last_ended_id(self) -> str:
        return self._ended[-1][0] if self._ended else "0-0"

    def _next_event_id(self) -> str:
        """Stream ids shaped like Redis's ``<ms>-<seq>``, strictly increasing."""
        now = now_ms()
        if now > self._last_event_ms:
            self._last_event_ms, self._event_seq = now, itertools.count()
        return f"{self._last_event_ms}-{next(self._event_seq)}"


class MemoryStoreOnLoop:
    """The embedded store's steps of a miss as coroutines. It does no I/O, so each runs at
    once on the loop (its lock is held for microseconds, by one caller at a time)."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    async def lookup(
        self,
        fingerprint: str,
        now_ms: int,
        fresh_for_ms: int,
        lock_ms: int,
        *,
        with_app: bool,
        idle_ms: int = 0,
    ) -> Lookup:
        return self._store.lookup(
            fingerprint, now_ms, fresh_for_ms, lock_ms, with_app=with_app, idle_ms=idle_ms
        )

    async def save(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
        release: Lock | None = None,
    ) -> SaveResult:
        return self._store.save(fingerprint, session, aal2_event, now_ms, release)

    async def forget(
        self,
        fingerprint: str,
        seen: MirroredSession | None,
        rejection: Rejection,
        release: Lock | None = None,
    ) -> None:
        self._store.forget(fingerprint, seen, rejection, release)

    async def release_revalidation(self, lock: Lock) -> None:
        self._store.release_revalidation(lock)

    async def revalidation_pending(self, session_id: str) -> bool:
        return self._store.revalidation_pending(session_id)

    async def use(self, session_id: str, at_ms: int, idle_ms: int) -> Idle | None:
        return self._store.use(session_id, at_ms, idle_ms)

    async def aclose(self) -> None:
        return None

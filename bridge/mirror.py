"""From credential to session: the mirror first, Kratos when the mirror is missing or stale.

Rules this module keeps:

- A mirrored session is trusted for ``revalidate_after`` seconds; after that
  Kratos is asked again, so a logout or revocation takes effect within that bound.
- Kratos rejecting a credential drops the mirror at once and is remembered for
  ``negative_cache_ttl`` seconds.
- Concurrent requests for one credential make one Kratos call per process
  (``SingleFlight``); for a stale session, processes take a short lock in the
  store and the others wait for its result instead of asking Kratos too.
- Each process keeps the sessions it saw fresh in memory, used only within the same
  ``revalidate_after`` bound, so a warm request needs neither Redis nor Kratos.
- Kratos unreachable means no answer from a stale mirror: the caller gets
  ``KratosUnavailable`` and answers 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from bridge.credentials import Credential, Fingerprints
from bridge.errors import SessionInvalid
from bridge.kratos import KratosClient
from bridge.session import MirroredSession, aal2_event, mirror
from bridge.store import Rejection, SessionStore

log = logging.getLogger(__name__)

T = TypeVar("T")

_PEER_POLL_SECONDS = 0.005


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Resolved:
    """A session the bridge may answer from, and cookies Kratos re-issued on the way."""

    session: MirroredSession
    set_cookies: tuple[str, ...] = ()
    # False when a newer rejection won the race to the store: answer, but do not reuse.
    cacheable: bool = True


class SessionMirror:
    """Resolves credentials to mirrored sessions."""

    def __init__(
        self,
        store: SessionStore,
        kratos: KratosClient,
        secret: bytes,
        revalidate_after: float,
        negative_cache_ttl: float,
        kratos_timeout: float,
        redis_timeout: float,
        recent_max: int = 50_000,
    ) -> None:
        self._store = store
        self._kratos = kratos
        self._fingerprints = Fingerprints(secret)
        self._revalidate_after_ms = int(revalidate_after * 1000)
        self._negative_ttl_ms = int(negative_cache_ttl * 1000)
        # The lock must outlive the call it guards: the Kratos call (bounded as a whole)
        # and the Redis commands around it.
        self._lock_ttl_ms = int((kratos_timeout + 2 * redis_timeout) * 1000) + 500
        self._in_flight: SingleFlight[Resolved] = SingleFlight()
        # This process's copy of sessions it validated or read, by credential fingerprint.
        # A copy is used only while fresh, so it keeps the same revalidate_after bound as
        # the store and spares the store round trips on the hot path.
        self._recent: dict[str, MirroredSession] = {}
        self._recent_max = recent_max

    def fresh_copy(self, credential: Credential) -> MirroredSession | None:
        """This process's copy of the session behind ``credential`` if it is fresh. No I/O,
        so the server may call it on its event loop."""
        recent = self._recent.get(self._fingerprints.of(credential))
        return recent if recent is not None and self._is_fresh(recent) else None

    def resolve(
        self, credential: Credential, *, with_app: bool = False, refresh: bool = False
    ) -> Resolved:
        """The session behind ``credential``, accepted by Kratos no more than
        ``revalidate_after`` before this call started; with ``refresh``, accepted after
        it started (used when a route needs more than the known AAL)."""
        started = now_ms()
        fingerprint = self._fingerprints.of(credential)
        if not (with_app or refresh):
            recent = self._recent.get(fingerprint)
            if recent is not None and self._is_fresh(recent):
                return Resolved(recent)
        session = self._mirrored(fingerprint, with_app)
        if session is not None and not refresh and self._is_fresh(session):
            resolved = Resolved(session)
        else:
            resolved = self._validate(credential, fingerprint, session, started, refresh)
        if resolved.cacheable:
            self._remember(fingerprint, resolved.session)
        # The mirror read above already carried the app data; an answer from Kratos (or a
        # peer's) did not, so only then is it read.
        if with_app and resolved.session is not session:
            app = self._store.load(resolved.session.id, with_app=True)
            if app is not None:
                session = replace(resolved.session, app=app.app)
                resolved = Resolved(session, resolved.set_cookies, resolved.cacheable)
        return resolved

    def _validate(
        self,
        credential: Credential,
        fingerprint: str,
        seen: MirroredSession | None,
        started: int,
        refresh: bool,
    ) -> Resolved:
        # Joining a call already under way is only right if it was asked late enough for
        # this request. If not, the next call for this key begins after that one ended,
        # so after `started`: one more round always suffices.
        oldest = started if refresh else started - self._revalidate_after_ms
        key = fingerprint + (":refresh" if refresh else "")

        def revalidate() -> Resolved:
            return self._revalidate(credential, fingerprint, seen, refresh)

        resolved = self._in_flight.do(key, revalidate)
        if resolved.session.validated_at_ms < oldest:
            resolved = self._in_flight.do(key, revalidate)
        return resolved

    def _is_fresh(self, session: MirroredSession) -> bool:
        return session.is_fresh(now_ms(), self._revalidate_after_ms)

    def _remember(self, fingerprint: str, session: MirroredSession) -> None:
        # Bounded the cheap way: a full map is dropped whole and refills from the store.
        if len(self._recent) >= self._recent_max:
            self._recent.clear()
        self._recent[fingerprint] = session

    def _mirrored(self, fingerprint: str, with_app: bool) -> MirroredSession | None:
        """The mirror as seen through this credential: fresh only if *it* was validated."""
        entry = self._store.find_credential(fingerprint)
        if isinstance(entry, Rejection):
            if now_ms() - entry.rejected_at_ms < self._negative_ttl_ms:
                raise SessionInvalid("Kratos rejected this credential recently")
            return None
        if entry is None:
            return None
        session = self._store.load(entry.session_id, with_app=with_app)
        if session is None:
            return None
        return replace(session, validated_at_ms=entry.validated_at_ms)

    def _fresh_mirror(self, fingerprint: str) -> MirroredSession | None:
        current = self._mirrored(fingerprint, with_app=False)
        return current if current is not None and self._is_fresh(current) else None

    def _revalidate(
        self,
        credential: Credential,
        fingerprint: str,
        seen: MirroredSession | None,
        refresh: bool,
    ) -> Resolved:
        if refresh:
            return self._ask_kratos(credential, fingerprint, seen)
        # A call for this credential may have finished between our read and SingleFlight.
        current = self._mirrored(fingerprint, with_app=False)
        if current is not None and self._is_fresh(current):
            return Resolved(current)
        seen = current or seen
        if seen is None:
            return self._ask_kratos(credential, fingerprint, seen)
        token = self._store.claim_revalidation(seen.id, self._lock_ttl_ms)
        if token is None:
            fresh = self._wait_for_peer(fingerprint, seen.id)
            return Resolved(fresh) if fresh else self._ask_kratos(credential, fingerprint, seen)
        try:
            # A peer may have saved and let go between our read and our claim.
            if (fresh := self._fresh_mirror(fingerprint)) is not None:
                return Resolved(fresh)
            return self._ask_kratos(credential, fingerprint, seen)
        finally:
            self._store.release_revalidation(seen.id, token)

    def _wait_for_peer(self, fingerprint: str, session_id: str) -> MirroredSession | None:
        """Another process is asking Kratos about this session: if it is about this same
        credential, use its answer; stop waiting as soon as it lets go of the lock."""
        deadline = time.monotonic() + self._lock_ttl_ms / 1000
        while time.monotonic() < deadline:
            time.sleep(_PEER_POLL_SECONDS)
            # Read the lock first: a save that lands after this read is still seen below.
            pending = self._store.revalidation_pending(session_id)
            if (fresh := self._fresh_mirror(fingerprint)) is not None:
                return fresh
            if not pending:
                return None
        return None

    def _ask_kratos(
        self, credential: Credential, fingerprint: str, seen: MirroredSession | None
    ) -> Resolved:
        # Freshness counts from when we asked: Kratos's answer may describe any moment
        # between the question and the answer.
        asked_at = now_ms()
        try:
            answer = self._kratos.whoami(credential)
        except SessionInvalid:
            # Any acceptance asked before this answer arrived is older news: the store
            # refuses to cache it for as long as such a call can still be under way.
            keep_ms = max(self._negative_ttl_ms, self._lock_ttl_ms)
            self._store.forget(fingerprint, seen, Rejection(now_ms(), keep_ms))
            raise
        session = mirror(answer, asked_at)
        seen_at = now_ms()
        saved = self._store.save(fingerprint, session, aal2_event(session, seen_at), seen_at)
        if saved.aal2_event_id is not None:
            log.info("aal2 event %s for session %s", saved.aal2_event_id, session.id)
        return Resolved(session, answer.set_cookies, cacheable=saved.cached)


@dataclass
class _Call(Generic[T]):
    done: threading.Event = field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None


class SingleFlight(Generic[T]):
    """Runs one call per key at a time; concurrent callers with that key share its outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, _Call[T]] = {}

    def do(self, key: str, function: Callable[[], T]) -> T:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = _Call()
        assert call is not None
        if leader:
            try:
                call.result = function()
            except BaseException as error:
                call.error = error
            finally:
                with self._lock:
                    del self._calls[key]
                call.done.set()
        else:
            call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

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
from bridge.store import REJECTED, SessionStore

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
        recent_max: int = 50_000,
    ) -> None:
        self._store = store
        self._kratos = kratos
        self._fingerprints = Fingerprints(secret)
        self._revalidate_after_ms = int(revalidate_after * 1000)
        self._negative_ttl_ms = int(negative_cache_ttl * 1000)
        # httpx applies the timeout per phase (connect, write, read), so a call can take
        # a few times it; the lock must outlive the call it guards.
        self._lock_ttl_ms = int(3 * kratos_timeout * 1000) + 500
        self._in_flight: SingleFlight[Resolved] = SingleFlight()
        # This process's copy of sessions it validated or read, by credential fingerprint.
        # A copy is used only while fresh, so it keeps the same revalidate_after bound as
        # the store and spares the store round trips on the hot path.
        self._recent: dict[str, MirroredSession] = {}
        self._recent_max = recent_max

    def resolve(self, credential: Credential, *, with_app: bool = False) -> Resolved:
        fingerprint = self._fingerprints.of(credential)
        if not with_app:
            recent = self._recent.get(fingerprint)
            if recent is not None and self._is_fresh(recent):
                return Resolved(recent)
        try:
            session = self._mirrored(fingerprint, with_app)
            if session is not None and self._is_fresh(session):
                resolved = Resolved(session)
            else:
                resolved = self._in_flight.do(
                    fingerprint, lambda: self._revalidate(credential, fingerprint, session)
                )
        except SessionInvalid:
            self._recent.pop(fingerprint, None)
            raise
        if resolved.cacheable:
            self._remember(fingerprint, resolved.session)
        if with_app and not resolved.session.app:
            app = self._store.load(resolved.session.id, with_app=True)
            if app is not None:
                session = replace(resolved.session, app=app.app)
                resolved = Resolved(session, resolved.set_cookies, resolved.cacheable)
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
        if entry is REJECTED:
            raise SessionInvalid("Kratos rejected this credential recently")
        if entry is None:
            return None
        session = self._store.load(entry.session_id, with_app=with_app)
        if session is None:
            return None
        return replace(session, validated_at_ms=entry.validated_at_ms)

    def _revalidate(
        self, credential: Credential, fingerprint: str, stale: MirroredSession | None
    ) -> Resolved:
        # A call for this credential may have finished between our read and SingleFlight.
        current = self._mirrored(fingerprint, with_app=False)
        if current is not None and self._is_fresh(current):
            return Resolved(current)
        stale = current or stale
        token = None
        if stale is not None:
            token = self._store.claim_revalidation(stale.id, self._lock_ttl_ms)
            if token is None:
                fresh = self._wait_for_peer(fingerprint, stale.id)
                if fresh is not None:
                    return Resolved(fresh)
        try:
            return self._ask_kratos(credential, fingerprint, stale)
        finally:
            if token is not None:
                self._store.release_revalidation(stale.id, token)

    def _wait_for_peer(self, fingerprint: str, session_id: str) -> MirroredSession | None:
        """Another process is asking Kratos about this session: if it is about this same
        credential, use its answer; stop waiting as soon as it lets go of the lock."""
        deadline = time.monotonic() + self._lock_ttl_ms / 1000
        while time.monotonic() < deadline:
            time.sleep(_PEER_POLL_SECONDS)
            current = self._mirrored(fingerprint, with_app=False)
            if current is not None and self._is_fresh(current):
                return current
            if not self._store.revalidation_pending(session_id):
                return None
        return None

    def _ask_kratos(
        self, credential: Credential, fingerprint: str, stale: MirroredSession | None
    ) -> Resolved:
        # Freshness counts from when we asked: Kratos's answer may describe any moment
        # between the question and the answer.
        asked_at = now_ms()
        try:
            answer = self._kratos.whoami(credential)
        except SessionInvalid:
            self._store.forget(
                fingerprint,
                stale.id if stale else None,
                stale.identity_id if stale else None,
                self._negative_ttl_ms,
            )
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

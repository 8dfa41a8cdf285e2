"""From credential to session: this process's copy, then the store, then Kratos.

Rules this module keeps:

- A session is answered from Kratos's acceptance of *this* credential, asked at most
  ``revalidate_after`` before the request began (with 0: after it began); after that
  Kratos is asked again, so a logout or revocation takes effect within that bound.
- Kratos rejecting a credential drops the mirror and this process's copy at once, and
  is remembered for ``negative_cache_ttl`` seconds (in the store and in this process).
  For a session the store mirrors, the admin API confirms the rejection first
  (``bridge.sessions.rejection``): Kratos answers ``401`` on its own database errors too,
  and such a blip is refused as Kratos unavailable, dropping nothing; a credential
  refused while its session lives (a lapsed cookie) is refused alone, the session kept.
- A request the process's copy cannot answer costs one store round trip to read what
  the store knows (and, for a stale session, to take the re-validation lock), then at
  most one Kratos call and one more round trip to save (and let go of the lock).
- Concurrent requests for one credential make one Kratos call per process
  (``SingleFlight``); across processes, the one that took the lock asks and the others
  wait for its answer.
- A session in use is refreshed off the request path shortly before its copy stops
  being fresh (``bridge.sessions.refresh``), so busy sessions do not wait for Kratos. The copy is
  still never used past ``revalidate_after``: a refresh that fails or is slow leaves
  requests to the ordinary path.
- Kratos unreachable means no answer from a stale copy: ``KratosUnavailable`` (503).
- Every session answered for a request is told to ``bridge.sessions.activity`` (sliding
  expiry, last use); with an idle timeout, the lookup a stale copy makes refuses a
  session unused for too long (``SessionEnded``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Generic, NoReturn, TypeVar

from bridge.bounded import BoundedMap
from bridge.clock import now_ms
from bridge.errors import (
    BridgeError,
    RejectedRecently,
    SessionEnded,
    SessionInvalid,
    StoreUnavailable,
)
from bridge.kratos.whoami import KratosClient
from bridge.pipeline.credentials import Credential, Fingerprints, Kind
from bridge.sessions.ending import record_end
from bridge.sessions.refresh import REFRESH_AT, Refresher, refresh_lead_ms
from bridge.sessions.rejection import RejectionCheck, Verdict
from bridge.sessions.session import MirroredSession, aal2_event
from bridge.store.base import Idle, Lock, MirrorStore, Rejection

if TYPE_CHECKING:
    from bridge.sessions.activity import SessionActivity

log = logging.getLogger(__name__)

T = TypeVar("T")

_PEER_POLL_SECONDS = 0.005


class SessionEvents:
    """What the mirror and the web hooks tell those who watch sessions (analytics,
    metrics): an AAL2 event recorded (once per upgrade, by the process that appended it),
    a session whose credential Kratos refused (logged out), a session mirrored without a
    request (a hook). These do nothing; watchers override them and
    must not block (the calls are on the request path)."""

    def aal2_recorded(self, session: MirroredSession, event: dict[str, str]) -> None:
        return None

    def logged_out(self, session: MirroredSession, at_ms: int) -> None:
        return None

    def session_seen(self, session: MirroredSession) -> None:
        """Seen without a request of its own (a Kratos web hook mirrored it)."""
        return None


class AllOf(SessionEvents):
    def __init__(self, watchers: list[SessionEvents]) -> None:
        self._watchers = tuple(watchers)

    def aal2_recorded(self, session: MirroredSession, event: dict[str, str]) -> None:
        for watcher in self._watchers:
            watcher.aal2_recorded(session, event)

    def logged_out(self, session: MirroredSession, at_ms: int) -> None:
        for watcher in self._watchers:
            watcher.logged_out(session, at_ms)

    def session_seen(self, session: MirroredSession) -> None:
        for watcher in self._watchers:
            watcher.session_seen(session)


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
        store: MirrorStore,
        kratos: KratosClient,
        secret: bytes,
        revalidate_after: float,
        negative_cache_ttl: float,
        request_budget: float,
        recent_max: int = 50_000,
        events: SessionEvents | None = None,
        activity: SessionActivity | None = None,
        rejections: RejectionCheck | None = None,
    ) -> None:
        """``rejections``: what confirms a ``401`` for a mirrored session before it is
        acted on (without one, every ``401`` is taken at its word)."""
        self._store = store
        self._rejections = rejections
        self._activity = activity
        self._idle_limit_ms = activity.idle_limit_ms if activity is not None else 0
        if activity is not None:
            activity.bind(self._renew)
        self._events = events if events is not None else SessionEvents()
        self._kratos = kratos
        self._fingerprints = Fingerprints(secret)
        self._revalidate_after_ms = int(revalidate_after * 1000)
        self._refresh_after_ms = int(revalidate_after * 1000 * REFRESH_AT)
        # After a failed refresh, none for this long (the lead while refreshes keep up).
        self._refresh_pause_s = refresh_lead_ms(self._revalidate_after_ms) / 1000
        self._negative_ttl_ms = int(negative_cache_ttl * 1000)
        # The lock must outlive the call it guards: the Kratos call (bounded as a whole)
        # and the Redis commands around it.
        self._lock_ttl_ms = int(request_budget * 1000) + 500
        self._in_flight: SingleFlight[Resolved] = SingleFlight()
        # This process's copies, by credential fingerprint: sessions Kratos accepted
        # (used only while fresh) and when Kratos last rejected a credential.
        self._recent: BoundedMap[str, MirroredSession] = BoundedMap(recent_max)
        self._rejected: BoundedMap[str, int] = BoundedMap(recent_max)
        self._refresher = Refresher(self._refresh, revalidate_after)
        self._refresh_retry_at: BoundedMap[str, float] = BoundedMap(recent_max)
        self._zone_hit: BoundedMap[str, int] = BoundedMap(recent_max)
        self._refreshed_cookies: BoundedMap[str, tuple[str, ...]] = BoundedMap(recent_max)
        # Waiting for a peer never outlasts what a request may wait in all.
        self._peer_wait_s = request_budget
        # Sessions ended elsewhere (an admin revoked them), announced through the store:
        # their copies go at once, and no acceptance asked before the end is kept again.
        self._ended: BoundedMap[str, int] = BoundedMap(recent_max)
        self._copies_lock = threading.Lock()
        self._announcements_lost_at = 0
        store.follow_ended(self._session_ended)

    def from_memory(self, credential: Credential) -> Resolved | None:
        """What this process alone can say, with no I/O (so the server may call it on its
        event loop): the fresh copy of the session (with cookies a background refresh
        brought, the first time only), or ``RejectedRecently`` for a credential Kratos
        rejected recently, or ``None``. A copy near the end of its freshness is scheduled
        for a refresh."""
        fingerprint = self._fingerprints.of(credential)
        now = now_ms()
        recent = self._recent.get(fingerprint)
        rejected_at = self._rejected.get(fingerprint)
        if rejected_at is not None and now - rejected_at < self._negative_ttl_ms:
            if recent is None or rejected_at >= recent.validated_at_ms:
                raise RejectedRecently()
        if recent is None or not recent.is_fresh(now, self._revalidate_after_ms):
            return None
        age = now - recent.validated_at_ms
        if age >= self._refresher.zone * 1000 and self._busy(fingerprint, recent):
            self._schedule_refresh(credential, fingerprint, age)
        if self._activity is not None:
            self._activity.used(recent, credential, fingerprint, now)
        cookies = self._refreshed_cookies.get(fingerprint)
        if cookies is not None:
            self._refreshed_cookies.pop(fingerprint)
            return Resolved(recent, cookies)
        return Resolved(recent)

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
            if recent is not None and recent.is_fresh(started, self._revalidate_after_ms):
                if self._activity is not None:
                    self._activity.used(recent, credential, fingerprint, started)
                return Resolved(recent)
        fresh_for_ms = 0 if refresh else self._revalidate_after_ms
        key = fingerprint + (":refresh" if refresh else ":app" if with_app else "")

        def fetch() -> Resolved:
            return self._fetch(credential, fingerprint, fresh_for_ms, with_app=with_app, used=True)

        # Joining a call already under way is only right if it was asked late enough for
        # this request. If not, the next call for this key begins after that one ended,
        # so after `started`: one more round always suffices.
        resolved = self._in_flight.do(key, fetch)
        if resolved.session.validated_at_ms < started - fresh_for_ms:
            resolved = self._in_flight.do(key, fetch)
        if self._revoked_since(resolved.session):
            # Revoked after Kratos was asked (a call this request joined, say).
            raise SessionInvalid("the session was revoked")
        if resolved.cacheable:
            self._remember(fingerprint, resolved.session)
        if self._activity is not None:
            self._activity.used(resolved.session, credential, fingerprint, now_ms())
        return resolved

    def close(self) -> None:
        self._refresher.close()
        if self._activity is not None:
            self._activity.close()
        if self._rejections is not None:
            self._rejections.close()

    def _remember(self, fingerprint: str, session: MirroredSession) -> None:
        # A rejection that arrived after this acceptance was asked wins, also here.
        rejected_at = self._rejected.get(fingerprint)
        if rejected_at is not None and rejected_at >= session.validated_at_ms:
            return
        with self._copies_lock:
            if self._ended_since(session):
                return
            self._recent.put(fingerprint, replace(session, app={}) if session.app else session)

    def _ended_since(self, session: MirroredSession) -> bool:
        """Whether an announcement (of this session's end, or of a gap in them) came after
        Kratos was asked for this copy: then it is not kept."""
        return session.validated_at_ms <= self._announcements_lost_at or self._revoked_since(
            session
        )

    def _revoked_since(self, session: MirroredSession) -> bool:
        """Whether the session's end was announced after Kratos was asked for this copy."""
        ended_at = self._ended.get(session.id)
        return ended_at is not None and ended_at >= session.validated_at_ms

    def _session_ended(self, session_id: str | None, ended_at_ms: int) -> None:
        """The store announced an ended session (``None``: announcements may have been
        missed, so every copy goes, and none asked before now is kept)."""
        with self._copies_lock:
            if session_id is None:
                self._announcements_lost_at = now_ms()
                self._recent.clear()
                return
            self._ended.put(session_id, ended_at_ms)
            self._recent.drop_values(lambda copy: copy.id == session_id)

    def _busy(self, fingerprint: str, recent: MirroredSession) -> bool:
        """Asked for at least twice since its copy entered the refresh zone: likely to be
        asked for again, so worth a Kratos call ahead of time. A session asked for once in
        a while is left to the ordinary path, and costs Kratos nothing extra."""
        if self._zone_hit.get(fingerprint) == recent.validated_at_ms:
            return True
        self._zone_hit.put(fingerprint, recent.validated_at_ms)  # the first ask of this copy
        return False

    def _schedule_refresh(self, credential: Credential, fingerprint: str, age_ms: int) -> None:
        retry_at = self._refresh_retry_at.get(fingerprint)
        if retry_at is not None and time.monotonic() < retry_at:
            return  # the last refresh failed: no back-to-back calls to a troubled Kratos
        stale_in = (self._revalidate_after_ms - age_ms) / 1000
        self._refresher.schedule(fingerprint, credential, time.monotonic() + stale_in)

    def _refresh(self, credential: Credential, fingerprint: str) -> None:
        """Off the request path: nothing if this process's copy is gone (dropped) or
        young again (a request re-validated it meanwhile); a copy the store holds fresher
        than ours (a peer refreshed it) is taken as it is; otherwise Kratos is asked. A
        rejection drops the copy at once; any other failure leaves it to age out at
        ``revalidate_after``. Nothing either while Kratos says its rate limit is nearly
        used (Ory Network): the calls left are kept for requests, which ask on their own
        once the copy is stale (``bridge.kratos.rate_limit``)."""
        recent = self._recent.get(fingerprint)
        if recent is None or now_ms() - recent.validated_at_ms < self._refresh_after_ms:
            return
        if not self._kratos.rate_limit.spare():
            self._refresh_retry_at.put(fingerprint, time.monotonic() + self._refresh_pause_s)
            return

        def fetch() -> Resolved:
            return self._fetch(credential, fingerprint, self._refresh_after_ms, with_app=False)

        try:
            resolved = self._in_flight.do(fingerprint, fetch)
        except SessionInvalid:
            return  # the copy is dropped already
        except BridgeError as error:
            log.debug("background refresh failed: %s", type(error).__name__)
            self._refresh_retry_at.put(fingerprint, time.monotonic() + self._refresh_pause_s)
            return
        self._keep_refreshed(fingerprint, resolved)

    def _renew(self, credential: Credential, fingerprint: str) -> MirroredSession | None:
        """Off the request path, once Kratos extended the session: ask Kratos about the
        credential now, so that the mirror's expiry moves to Kratos's new one and the
        cookie Kratos re-issues goes out with this process's next answer for it. The
        session as Kratos now has it (``None``: Kratos refused the credential)."""

        def fetch() -> Resolved:
            return self._fetch(credential, fingerprint, 0, with_app=False)

        try:
            resolved = self._in_flight.do(fingerprint + ":renew", fetch)
        except SessionInvalid:
            return None  # the copy is dropped already
        self._keep_refreshed(fingerprint, resolved)
        return resolved.session

    def _keep_refreshed(self, fingerprint: str, resolved: Resolved) -> None:
        if resolved.set_cookies:
            # Kratos re-issued the cookie (an extend): the next request relays it.
            self._refreshed_cookies.put(fingerprint, resolved.set_cookies)
        if resolved.cacheable:
            self._remember(fingerprint, resolved.session)

    def _fetch(
        self,
        credential: Credential,
        fingerprint: str,
        fresh_for_ms: int,
        *,
        with_app: bool,
        used: bool = False,
    ) -> Resolved:
        """The store's copy if it is fresh for ``fresh_for_ms``, else Kratos's answer.
        ``used`` (a request, not a refresh) records the use and applies the idle limit."""
        now = now_ms()
        lock_ms = self._lock_ttl_ms if fresh_for_ms else 0
        idle_ms = self._idle_limit_ms if used else 0
        found = self._store.lookup(
            fingerprint, now, fresh_for_ms, lock_ms, with_app=with_app, idle_ms=idle_ms
        )
        if found.idle is not None:
            self._refuse_idle(fingerprint, found.idle)
        if isinstance(found.entry, Rejection):
            if now - found.entry.rejected_at_ms < self._negative_ttl_ms:
                self._recent.pop(fingerprint)
                self._rejected.put(fingerprint, found.entry.rejected_at_ms)
                raise RejectedRecently()
        seen = found.session
        if seen is not None and seen.is_fresh(now, fresh_for_ms):
            return Resolved(seen)
        if seen is not None and found.peer_busy:
            fresh = self._wait_for_peer(fingerprint, seen.id, fresh_for_ms)
            if fresh is not None:
                return Resolved(fresh)
        resolved = self._ask_kratos(credential, fingerprint, seen, found.lock)
        if idle_ms and found.entry is None:
            # A credential the store did not know yet: its session's use is checked now.
            idle = self._store.use(resolved.session.id, now, idle_ms)
            if idle is not None:
                self._refuse_idle(fingerprint, idle)
        if not with_app:
            return resolved
        # A session first seen through this credential may have app data already.
        if seen is not None and seen.id == resolved.session.id:
            app = seen.app
        else:
            app = self._app_data(resolved.session.id)
        return replace(resolved, session=replace(resolved.session, app=app))

    def _refuse_idle(self, fingerprint: str, idle: Idle) -> NoReturn:
        self._recent.pop(fingerprint)
        if self._activity is not None:
            self._activity.found_idle(idle)
        raise SessionEnded("the session has ended: unused for longer than the idle timeout")

    def _app_data(self, session_id: str) -> dict[str, str]:
        loaded = self._store.load(session_id, with_app=True)
        return loaded.app if loaded is not None else {}

    def _wait_for_peer(
        self, fingerprint: str, session_id: str, fresh_for_ms: int
    ) -> MirroredSession | None:
        """Another process is asking Kratos about this session: if it is about this same
        credential, use its answer; stop waiting as soon as it lets go of the lock."""
        deadline = time.monotonic() + self._peer_wait_s
        pause = _PEER_POLL_SECONDS
        while time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 1.5, 0.05)
            # Read the lock first: a save that lands after this read is still seen below.
            pending = self._store.revalidation_pending(session_id)
            now = now_ms()
            found = self._store.lookup(fingerprint, now, fresh_for_ms, 0, with_app=False)
            if found.session is not None and found.session.is_fresh(now, fresh_for_ms):
                return found.session
            if not pending:
                return None
        return None

    def _ask_kratos(
        self,
        credential: Credential,
        fingerprint: str,
        seen: MirroredSession | None,
        lock: Lock | None,
    ) -> Resolved:
        # Freshness counts from when we asked: Kratos's answer may describe any moment
        # between the question and the answer.
        asked_at = now_ms()
        asked_at_clock = time.monotonic()
        try:
            answer = self._kratos.whoami(credential)
        except SessionInvalid:
            if seen is not None and self._rejections is not None:
                try:  # a blip of Kratos's is not a logout: KratosUnavailable, all kept
                    verdict = self._rejections.confirm(
                        seen, fingerprint, credential.kind is Kind.COOKIE, asked_at_clock
                    )
                except BaseException:
                    self._let_go(lock)
                    raise
                if verdict is Verdict.CREDENTIAL_REFUSED:  # the session lives on: kept
                    self._recent.pop(fingerprint)
                    self._rejected.put(fingerprint, now_ms())
                    self._let_go(lock)
                    raise
            # Any acceptance asked before this answer arrived is older news: the store
            # refuses to cache it for as long as such a call can still be under way.
            rejected_at = now_ms()
            keep_ms = max(self._negative_ttl_ms, self._lock_ttl_ms)
            # The store's mirror is gone once the session expired; this process's copy is not.
            last_seen = seen if seen is not None else self._recent.get(fingerprint)
            self._recent.pop(fingerprint)
            self._rejected.put(fingerprint, rejected_at)
            self._store.forget(fingerprint, seen, Rejection(rejected_at, keep_ms), lock)
            if seen is not None:
                self._events.logged_out(seen, rejected_at)
            if last_seen is not None:
                self._tell_apps(last_seen, rejected_at)
            raise
        except BaseException:
            self._let_go(lock)
            raise
        if self._rejections is not None:
            self._rejections.accepted(fingerprint)
        session = MirroredSession.from_kratos(answer, asked_at)
        seen_at = now_ms()
        event = aal2_event(session, seen_at)
        saved = self._store.save(fingerprint, session, event, seen_at, lock)
        if saved.aal2_event_id is not None and event is not None:
            log.info("aal2 event %s for session %s", saved.aal2_event_id, session.id)
            self._events.aal2_recorded(session, event)
        if saved.cached:
            session = replace(session, csrf_token=saved.csrf_token)
        return Resolved(session, answer.set_cookies, cacheable=saved.cached)

    def _tell_apps(self, seen: MirroredSession, rejected_at: int) -> None:
        """Kratos refused a session the bridge knew: the ended stream says so once, as
        ``expired`` when it was past its expiry, else ``rejected`` (revoked in Kratos, or
        logged out elsewhere). The rejection is recorded already: a stream that cannot be
        written costs the event, not the answer."""
        reason = "expired" if seen.expires_at_ms <= rejected_at else "rejected"
        try:
            record_end(self._store, seen.id, seen, reason, rejected_at, by="kratos")
        except StoreUnavailable:
            log.warning("the end of session %s is not in the ended stream", seen.id)

    def _let_go(self, lock: Lock | None) -> None:
        if lock is None:
            return
        try:
            self._store.release_revalidation(lock)
        except StoreUnavailable:
            pass  # it expires on its own


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

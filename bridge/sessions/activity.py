"""What using a session does beyond being answered: sliding expiry and the idle timeout.

Sliding sessions (``BRIDGE_SESSION_EXTEND``, seconds; Kratos's
``session.earliest_possible_extend``): a session used that close to its expiry is
extended through Kratos's admin API, off the request path. The request that shows it is
answered from the copy; a worker claims the extension in the store (one claim per
session and expiry, so one extension per window across every process), asks Kratos to
extend it, then asks Kratos again with the credential that was used, so that the
mirror's expiry moves to Kratos's new one (the mirror's key expires exactly then) and
Kratos's re-issued cookie goes out with this process's next answer for that credential.
Other processes pass a re-issued cookie on when they next ask Kratos with the old one:
Kratos re-issues it on every whoami until the browser sends the new one.

Idle timeout (``BRIDGE_IDLE_TIMEOUT``, seconds): the store keeps when each session was
last used. A request the process's copy cannot answer reads it with the lookup it makes
anyway (and records the use there); answers from the copy are recorded in this process
and written in one batch every ``flush_interval / 2``, at most once per session. A
session found unused for longer than the timeout plus ``flush_interval`` (the most a
recorded use can lag) is refused (``session_ended``) from then on in every process,
across restarts (the mark is in the store, kept until the session's expiry); the process
that finds it ends it in the store (every process drops its copy at once) and revokes it
in Kratos, off the request path. So a session used within the timeout is never refused,
and one unused for the timeout plus ``flush_interval`` is refused at its next request.
A session unused and never presented again is left to expire in Kratos.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from bridge.bounded import BoundedMap
from bridge.errors import BridgeError
from bridge.logs import Throttled
from bridge.pipeline.credentials import Credential
from bridge.sessions.session import MirroredSession
from bridge.store.base import Idle, MirrorStore

log = logging.getLogger(__name__)
_mismatch = Throttled(log, interval=600.0)

Renew = Callable[[Credential, str], MirroredSession | None]
"""Ask Kratos about a credential now, save its answer and keep its re-issued cookies for
the next answer (``SessionMirror``); the session as Kratos now sees it."""


def flush_interval(idle_timeout: float) -> float:
    """The most a recorded use may lag the use, in seconds: a tenth of the idle timeout,
    from 1 s to 60 s. Answers from a process's copy are written twice as often."""
    return min(60.0, max(1.0, idle_timeout / 10))


def least_idle_timeout(revalidate_after: float) -> float:
    """The shortest idle timeout the limit can keep: 2 x ``revalidate_after`` (the most a
    copy answers from memory after its last use is 1.5 x) plus its own
    ``flush_interval``. Found among the three pieces ``flush_interval`` is made of."""
    twice = 2 * revalidate_after
    candidates = (twice + 1, twice / 0.9, twice + 60)
    return min(t for t in candidates if t >= twice + flush_interval(t) - 1e-9)


class SessionAdmin(Protocol):
    """What Kratos's admin API does for this module (``bridge.kratos.admin.KratosAdmin``)."""

    def extend(self, session_id: str) -> bool: ...

    def revoke(self, session_id: str) -> bool: ...

    def close(self) -> None: ...


class Ender(Protocol):
    """Ends a session in the store and every process (``bridge.sessions.ending``)."""

    def end(self, session_id: str, reason: str) -> None: ...


class SessionActivity:
    """One per process: told of every session answered for a request (``used``, no I/O)."""

    def __init__(
        self,
        store: MirrorStore,
        admin: SessionAdmin,
        ender: Ender,
        extend_window: float,
        idle_timeout: float,
        recent_max: int = 50_000,
    ) -> None:
        self._store = store
        self._admin = admin
        self._ender = ender
        self._extend_window_ms = int(extend_window * 1000)
        self._idle_ms = int(idle_timeout * 1000)
        self._flush_s = flush_interval(idle_timeout) / 2
        # The lookup refuses a session whose last recorded use is older than this.
        self.idle_limit_ms = self._idle_ms + int(flush_interval(idle_timeout) * 1000)
        if not self._idle_ms:
            self.idle_limit_ms = 0
        self._renew: Renew | None = None
        self._uses: dict[str, int] = {}
        # The expiry each session was last looked at for an extension, in this process.
        self._extending: BoundedMap[str, int] = BoundedMap(recent_max)
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="bridge-activity")
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if self._idle_ms:
            self._flusher = threading.Thread(target=self._run, name="bridge-uses", daemon=True)
            self._flusher.start()

    def bind(self, renew: Renew) -> None:
        self._renew = renew

    def used(
        self, session: MirroredSession, credential: Credential, fingerprint: str, now: int
    ) -> None:
        """A request was answered with ``session`` at ``now``: no I/O, no lock."""
        if self._idle_ms:
            self._uses[session.id] = now
        expires_at = session.expires_at_ms
        if self._extend_window_ms and now < expires_at <= now + self._extend_window_ms:
            if self._extending.get(session.id) != expires_at:
                self._extending.put(session.id, expires_at)
                self._submit(self._extend, session.id, expires_at, credential, fingerprint)

    def found_idle(self, idle: Idle) -> None:
        """A lookup found the session idle; the process that found it first ends it."""
        if idle.first:
            self._submit(self._end_idle, idle.session_id)

    def close(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=2 * self._flush_s)
        try:
            self._flush()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._admin.close()

    def _submit(self, task: Callable[..., None], *args: object) -> None:
        try:
            self._pool.submit(task, *args)
        except RuntimeError:
            pass  # shutting down: requests still answered get no background work

    def _extend(
        self, session_id: str, expires_at: int, credential: Credential, fingerprint: str
    ) -> None:
        try:
            if not self._store.claim_extension(session_id, expires_at):
                return  # another process (or an earlier request here) has it
            if not self._admin.extend(session_id):
                return  # Kratos knows it no more: the next whoami says so
            renewed = self._renew(credential, fingerprint) if self._renew else None
        except BridgeError as error:
            log.warning("session extension failed: %s", type(error).__name__)
            return
        if renewed is not None and renewed.expires_at_ms <= expires_at:
            _mismatch.warning(
                "Kratos did not extend a session %d s before its expiry: is "
                "BRIDGE_SESSION_EXTEND larger than Kratos's session.earliest_possible_extend?",
                (expires_at - renewed.validated_at_ms) // 1000,
            )

    def _end_idle(self, session_id: str) -> None:
        try:
            self._ender.end(session_id, "idle")  # by the bridge
        except BridgeError as error:
            log.warning("idle session not ended in the store: %s", type(error).__name__)
        try:
            self._admin.revoke(session_id)
        except BridgeError as error:
            # Still refused here (the store keeps the mark); Kratos lets it expire.
            log.warning("idle session not revoked in Kratos: %s", type(error).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_s):
            try:
                self._flush()
            except Exception:
                log.exception("session uses not recorded")

    def _flush(self) -> None:
        uses, self._uses = self._uses, {}
        if not uses:
            return
        try:
            self._store.record_uses(uses)
        except BridgeError as error:
            log.warning("session uses not recorded yet: %s", type(error).__name__)
            for session_id, at in uses.items():  # the next flush tries again
                self._uses[session_id] = max(at, self._uses.get(session_id, 0))

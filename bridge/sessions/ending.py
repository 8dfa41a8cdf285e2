"""Ending a session in the bridge, the one way an admin revocation and a sign-out both do
it: the store drops the mirror and its app data, refuses any save of a Kratos answer
asked before the end, and announces the end, so that every bridge process drops its own
copy at once (``SessionStore.end_session``, ``follow_ended``); the analytics count it.

Every end, these and the ones the mirror meets (Kratos answering ``401``), also goes to
the ended stream for apps, once per session (``record_end``; README, "Ended sessions").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from bridge.clock import iso, now_ms
from bridge.store.base import AAL2_MARKER_GRACE_MS, ENDED_REASONS

if TYPE_CHECKING:
    from bridge.sessions.session import MirroredSession
    from bridge.store.base import AdminStore, EndedStream

# Beyond the longest a request can take, so a save asked before the end cannot land after.
_KEEP_BEYOND_BUDGET_MS = 60_000


class EndCounter(Protocol):
    """What counts ended sessions (the analytics' recorder), as the ender uses it; a
    protocol, so that sessions/ needs nothing from observe/, which watches it."""

    def end_now(self, session_id: str, reason: str, at_ms: int) -> None: ...


class SessionEnder:
    def __init__(
        self, store: AdminStore, recorder: EndCounter | None, request_budget: float
    ) -> None:
        self._store = store
        self._recorder = recorder
        self._keep_ms = int(request_budget * 1000) + _KEEP_BEYOND_BUDGET_MS

    def end(self, session_id: str, reason: str, by: str = "bridge") -> None:
        """End it now in every process and tell apps; ``reason`` is one of
        ``ENDED_REASONS`` (``revoked``, ``logged_out``, ``idle``), ``by`` who ended it.
        ``StoreUnavailable`` when the store could not record it (a retry records one
        event all the same)."""
        at = now_ms()
        seen = self._store.load(session_id)  # whose it was, before the mirror goes
        # The event first: a process meeting Kratos's 401 once the mirror is gone would
        # record it too, with a reason less true than this one.
        record_end(self._store, session_id, seen, reason, at, by)
        self._store.end_session(session_id, at, self._keep_ms)
        if self._recorder is not None:
            self._recorder.end_now(session_id, reason, at)


def record_end(
    stream: EndedStream,
    session_id: str,
    seen: MirroredSession | None,
    reason: str,
    at_ms: int,
    by: str,
) -> str | None:
    """Append the session's end to the ended stream unless it is there: the entry id when
    appended now. ``seen``: the session as last mirrored, for its identity and expiry."""
    if reason not in ENDED_REASONS:
        raise ValueError(f"not a reason a session ends for: {reason!r}")
    fields = {
        "session_id": session_id,
        "identity_id": seen.identity_id if seen is not None else "",
        "reason": reason,
        "at": iso(at_ms),
        "by": by,
    }
    # Kratos can revive an expired session (admin extend): its one end stays one event.
    keep_until = max(at_ms, seen.expires_at_ms if seen is not None else 0) + AAL2_MARKER_GRACE_MS
    return stream.record_ended(session_id, fields, keep_until)

"""Ending a session in the bridge, the one way an admin revocation and a sign-out both do
it: the store drops the mirror and its app data, refuses any save of a Kratos answer
asked before the end, and announces the end, so that every bridge process drops its own
copy at once (``SessionStore.end_session``, ``follow_ended``); the analytics count it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.clock import now_ms

if TYPE_CHECKING:
    from bridge.observe.analytics import Recorder
    from bridge.store.base import AdminStore

# Beyond the longest a request can take, so a save asked before the end cannot land after.
_KEEP_BEYOND_BUDGET_MS = 60_000


class SessionEnder:
    def __init__(self, store: AdminStore, recorder: Recorder | None, request_budget: float) -> None:
        self._store = store
        self._recorder = recorder
        self._keep_ms = int(request_budget * 1000) + _KEEP_BEYOND_BUDGET_MS

    def end(self, session_id: str, reason: str) -> None:
        """End it now in every process; ``reason`` is the analytics' (``revoked``,
        ``logged_out``). ``StoreUnavailable`` when the store could not record it."""
        at = now_ms()
        self._store.end_session(session_id, at, self._keep_ms)
        if self._recorder is not None:
            self._recorder.end_now(session_id, reason, at)

"""Where mirrored sessions live: one protocol, a Redis and an in-process implementation.

The store owns atomicity. Saving a session, moving its expiry, updating the
identity index and appending the AAL2 event happen as one step, so callers
never hold a half-written mirror or a doubled event.

Key layout (``p`` = ``BRIDGE_KEY_PREFIX``; the keys of one session share the
Redis Cluster hash tag ``{<session id>}``):

- ``p{sid}:session``  hash: ``kratos`` (JSON view), ``validated_at``, ``expires_at`` (ms);
  expires at Kratos's ``expires_at``.
- ``p{sid}:app``      hash: data apps add to the session; expiry follows the session.
- ``p{sid}:aal2``     the id of the session's AAL2 event; its presence means "already recorded".
- ``p{sid}:revalidating``  short lock so one bridge process asks Kratos for a stale session.
- ``pcredential:<hmac>``   session id for a credential, or empty when Kratos rejected it.
- ``pidentity:{<identity id>}:sessions``  sorted set of session ids scored by expiry (ms).
- ``<aal2_stream>``   the AAL2 event stream (default ``pevents:aal2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from bridge.session import MirroredSession


class _Rejected:
    def __repr__(self) -> str:
        return "REJECTED"


REJECTED: Final = _Rejected()
"""``find_session_id`` answer for a credential Kratos recently rejected."""


@dataclass(frozen=True)
class Keys:
    prefix: str
    aal2_stream: str

    def session(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:session"

    def app(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:app"

    def aal2_marker(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:aal2"

    def revalidating(self, sid: str) -> str:
        return f"{self.prefix}{{{sid}}}:revalidating"

    def credential(self, fingerprint: str) -> str:
        return f"{self.prefix}credential:{fingerprint}"

    def identity_sessions(self, identity_id: str) -> str:
        return f"{self.prefix}identity:{{{identity_id}}}:sessions"


class SessionStore(Protocol):
    """What the session mirror needs from storage. Failures raise ``StoreUnavailable``."""

    keys: Keys

    def find_session_id(self, fingerprint: str) -> str | _Rejected | None:
        """The session id a credential belongs to, ``REJECTED``, or ``None`` if unknown."""

    def load(self, session_id: str, *, with_app: bool = False) -> MirroredSession | None:
        """The mirrored session, or ``None`` when there is none (or it expired)."""

    def save(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
    ) -> str | None:
        """Write the mirror with expiry ``session.expires_at_ms``; map the credential to it;
        index it under its identity; append ``aal2_event`` unless this session already has one.
        Returns the id of the event appended, if any."""

    def reject(self, fingerprint: str, ttl_ms: int) -> None:
        """Remember for ``ttl_ms`` that Kratos rejected this credential."""

    def forget(
        self, fingerprint: str, session_id: str | None, identity_id: str | None, reject_ttl_ms: int
    ) -> None:
        """Kratos rejected a credential: drop its session's mirror and remember the rejection."""

    def set_app_data(self, session_id: str, data: dict[str, str]) -> bool:
        """Merge app-owned fields into a live session (same expiry); ``False`` if none."""

    def claim_revalidation(self, session_id: str, ttl_ms: int) -> bool:
        """Take the short lock that lets one process re-validate a session; ``False`` if taken."""

    def release_revalidation(self, session_id: str) -> None: ...

    def identity_session_ids(self, identity_id: str, now_ms: int) -> list[str]:
        """Unexpired session ids of an identity, soonest expiry first."""

    def aal2_events(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        """The oldest ``count`` AAL2 events as ``(event id, fields)``."""

    def ping(self) -> None: ...

    def close(self) -> None: ...

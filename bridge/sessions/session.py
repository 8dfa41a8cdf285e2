"""The app-owned view of a Kratos session, and the AAL2 event it may give rise to.

``MirroredSession`` is what ``/whoami`` returns and what the store keeps: the
parts of Kratos's session an app needs, in a shape that does not change when
Kratos adds fields, plus when the bridge last validated it.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.clock import iso
from bridge.kratos.whoami import VouchedSession


@dataclass(frozen=True, slots=True)
class MirroredSession:
    """One Kratos session as mirrored by the bridge."""

    kratos: dict[str, Any]  # the unified view, as ``kratos.parse_session`` builds it
    validated_at_ms: int
    expires_at_ms: int
    app: dict[str, str] = field(default_factory=dict)
    # Created by the store with the mirror; a secret, so in no repr, log or encoding.
    csrf_token: str = field(default="", repr=False)

    @classmethod
    def from_kratos(cls, session: VouchedSession, validated_at_ms: int) -> MirroredSession:
        """The mirror of what Kratos has just said of a session, validated at that time."""
        return cls(
            kratos=session.view,
            validated_at_ms=validated_at_ms,
            expires_at_ms=session.expires_at_ms,
        )

    @property
    def id(self) -> str:
        return self.kratos["session_id"]

    @property
    def identity_id(self) -> str:
        return self.kratos["identity"]["id"]

    @property
    def aal(self) -> str:
        return self.kratos["aal"]

    @property
    def email(self) -> str | None:
        email = (self.kratos["identity"].get("traits") or {}).get("email")
        return email if isinstance(email, str) else None

    def is_fresh(self, now_ms: int, revalidate_after_ms: int) -> bool:
        return now_ms < self.expires_at_ms and now_ms - self.validated_at_ms < revalidate_after_ms

    def to_json(self) -> dict[str, Any]:
        """What ``/whoami`` shows, without the CSRF token (added where it is meant to be)."""
        return {**self.kratos, "validated_at": iso(self.validated_at_ms), "app": self.app}

    def encode(self) -> bytes:
        return orjson.dumps(self.kratos, option=orjson.OPT_SORT_KEYS)


def dig(value: Any, parts: Iterable[str], missing: Any = None) -> Any:
    """``value[parts[0]][parts[1]]...`` (a dotted path into traits, say), or ``missing``
    where the path leads nowhere."""
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return missing
        value = value[part]
    return value


def new_csrf_token() -> str:
    """A session's CSRF token: 32 random bytes, base64url. The store keeps the first one
    made for a session and hands it to everyone who reads the session."""
    return secrets.token_urlsafe(32)


def aal2_event(session: MirroredSession, seen_at_ms: int) -> dict[str, str] | None:
    """The fields of the AAL2 event for a session at ``aal2``, else ``None``."""
    if session.aal != "aal2":
        return None
    second = [m for m in session.kratos["authentication_methods"] if m["aal"] == "aal2"]
    device = session.kratos["device"] or {}
    completed_at = str(second[0]["completed_at"] or "") if second else ""
    return {
        "upgrade_id": upgrade_id(session.id, completed_at),
        "session_id": session.id,
        "identity_id": session.identity_id,
        "methods": ",".join(dict.fromkeys(str(m["method"]) for m in second)),
        "completed_at": completed_at,
        "seen_at": iso(seen_at_ms),
        "ip_address": device.get("ip_address") or "",
        "user_agent": device.get("user_agent") or "",
    }


def first_method(event: dict[str, str]) -> str:
    """The method an AAL2 event is counted under: the first second factor it names."""
    return (event.get("methods") or "unknown").split(",")[0]


def upgrade_id(session_id: str, completed_at: str) -> str:
    """The same id for one session upgrade wherever and however often it is seen: made
    from Kratos's data alone (the session and when its first second factor completed), so
    a consumer can drop a second event even after Redis lost the marker of the first."""
    return str(uuid.uuid5(_UPGRADES, f"{session_id}|{completed_at}"))


_UPGRADES = uuid.UUID("6f2a1c1e-9a43-5d0b-8a7e-2f1f4c1b7d3e")

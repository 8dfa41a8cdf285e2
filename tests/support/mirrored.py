"""Mirrored sessions as the store tests write them: made up, never from Kratos."""

from __future__ import annotations

import time

from bridge.sessions.session import MirroredSession


def now_ms() -> int:
    return int(time.time() * 1000)


def session(sid="s1", identity="i1", aal="aal1", expires_in_ms=60_000, validated_at=None):
    methods = [{"method": "password", "aal": "aal1", "completed_at": "2026-11-22T10:00:00Z"}]
    if aal == "aal2":
        methods.append({"method": "totp", "aal": "aal2", "completed_at": "2026-11-22T10:01:00Z"})
    return MirroredSession(
        kratos={
            "session_id": sid,
            "identity": {"id": identity, "traits": {"email": "a@b.test"}},
            "aal": aal,
            "authentication_methods": methods,
            "device": {"ip_address": "10.1.2.3", "user_agent": "UA"},
            "expires_at": "unused",
        },
        validated_at_ms=validated_at or now_ms(),
        expires_at_ms=now_ms() + expires_in_ms,
    )

"""One log line per forward-auth decision (``BRIDGE_LOG_DECISIONS``), for operators.

Each line says which request it was (``X-Request-Id``, when the proxy sends one), the
dialect and method, the answer (``allow``, or the refusal's error code) and its status,
the rule, the identity and session, how long the decision took and which tier knew the
session: this process's copy (``process``), Redis (``redis``) or Kratos (``kratos``).
Never a cookie, token or secret, nor the host or path (a path may hold a reset token).
With ``BRIDGE_LOG_FORMAT=json`` each is one JSON object.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from bridge.sessions.session import MirroredSession
from bridge.web.request import HeaderView, declare_read
from bridge.web.responses import Reply

log = logging.getLogger("bridge.decisions")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
LOGGED_HEADERS = declare_read("x-request-id")


@dataclass(slots=True)
class Trace:
    """What one decision learned on its way, for its log line."""

    started_ns: int
    finished_ns: int = 0
    rule: str | None = None
    session: MirroredSession | None = None
    tier: str | None = None

    @property
    def latency_s(self) -> float:
        return (self.finished_ns - self.started_ns) / 1e9


def record(dialect: str, method: str, headers: HeaderView, reply: Reply, trace: Trace) -> None:
    request_id = headers.get("x-request-id")
    session = trace.session
    fields = {
        "request_id": request_id if request_id and _REQUEST_ID.fullmatch(request_id) else None,
        "dialect": dialect,
        "method": method,
        "decision": outcome(reply),
        "status": reply.status,
        "rule": trace.rule,
        "identity_id": session.identity_id if session is not None else None,
        "session_id": session.id if session is not None else None,
        "tier": trace.tier,
        "latency_ms": round(trace.latency_s * 1000, 3),
    }
    log.info(
        "decision %s %s (%s) rule=%s identity=%s tier=%s %.3f ms",
        fields["decision"],
        fields["status"],
        dialect,
        fields["rule"],
        fields["identity_id"],
        fields["tier"],
        fields["latency_ms"],
        extra={"fields": fields},
    )


def outcome(reply: Reply) -> str:
    """``allow``, or the refusal's error code (``refused`` for an answer without one)."""
    if reply.status == 200:
        return "allow"
    return reply.code or "refused"

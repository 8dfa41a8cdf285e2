"""The decision, once the rule and the session are known: allow, or why not.

Kratos decides whether a session is valid (and, with ``required_aal:
highest_available``, its own AAL rule). The route's rule can ask for more:

- ``aal2`` (or the proxy's ``?aal=aal2``): a session below it gets a step-up;
- ``when``: identity conditions; an identity that does not meet them is refused (403);
- ``max_age``: the last login (``authenticated_at``) must be that recent, else the
  browser is sent to log in again (``refresh=true``).

A step-up or a log-in-again may have just happened at Kratos, so the caller asks Kratos
once more before refusing for either (``worth_asking_again``).
"""

from __future__ import annotations

from bridge.bounded import BoundedMap
from bridge.clock import parse_timestamp_ms
from bridge.errors import (
    BadRequest,
    BridgeError,
    Forbidden,
    ReauthenticationRequired,
    StepUpRequired,
)
from bridge.pipeline.rules import Access, Rule
from bridge.sessions.session import MirroredSession

_RANK = {"aal0": 0, "aal1": 1, "aal2": 2, "aal3": 3}
ROUTE_LEVELS = ("aal1", "aal2")
_authenticated_at_ms: BoundedMap[str, int] = BoundedMap(50_000)


def required_aal(rule: Rule, asked: str | None) -> str | None:
    """``aal2`` when the rule or the proxy's route asks for it, else ``None``."""
    if asked is not None and asked not in ROUTE_LEVELS:
        raise BadRequest(f"aal must be one of {', '.join(ROUTE_LEVELS)}")
    return "aal2" if rule.access is Access.AAL2 or asked == "aal2" else None


def problem(
    rule: Rule, aal: str | None, session: MirroredSession, now_ms: int
) -> BridgeError | None:
    """Why ``session`` may not pass ``rule``, or ``None`` when it may."""
    if not rule.permits(session.kratos):
        return Forbidden(f"the identity does not meet the conditions of {rule.label}")
    if aal is not None and _RANK.get(session.aal, 0) < _RANK[aal]:
        return StepUpRequired(None)
    if rule.max_age_s is not None and not _recent(session, rule.max_age_s, now_ms):
        return ReauthenticationRequired(f"{rule.label} needs a login within {rule.max_age_s:g}s")
    return None


def worth_asking_again(problem: BridgeError | None) -> bool:
    return isinstance(problem, StepUpRequired | ReauthenticationRequired)


def _recent(session: MirroredSession, max_age_s: float, now_ms: int) -> bool:
    text = session.kratos.get("authenticated_at")
    if not isinstance(text, str):
        return False
    at_ms = _authenticated_at_ms.get(text)
    if at_ms is None:
        try:
            at_ms = parse_timestamp_ms(text)
        except ValueError:
            return False
        _authenticated_at_ms.put(text, at_ms)
    return now_ms - at_ms <= max_age_s * 1000

"""The decision after a session is known: does it meet what this route asks for?

Kratos decides validity (and, with ``required_aal: highest_available``, its own
AAL rule). A route can ask for more with ``/auth?aal=aal2``: a session whose
known AAL falls short is checked with Kratos once more (the second factor may
have just been completed), and if it still falls short it gets the same
step-up answer Kratos's 403 gets.
"""

from __future__ import annotations

from bridge.errors import BadRequest, StepUpRequired
from bridge.session import MirroredSession

_RANK = {"aal0": 0, "aal1": 1, "aal2": 2, "aal3": 3}
ROUTE_LEVELS = ("aal1", "aal2")


def required_aal(query_value: str | None) -> str | None:
    """The level a route asked for, validated; ``None`` when it asked for none."""
    if query_value is None:
        return None
    if query_value not in ROUTE_LEVELS:
        raise BadRequest(f"aal must be one of {', '.join(ROUTE_LEVELS)}")
    return query_value


def meets_aal(session: MirroredSession, required: str | None) -> bool:
    return required is None or _RANK.get(session.aal, 0) >= _RANK[required]


def enforce_aal(session: MirroredSession, required: str | None) -> None:
    if not meets_aal(session, required):
        raise StepUpRequired(None)

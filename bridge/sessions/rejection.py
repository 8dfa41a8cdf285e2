"""Whether Kratos's ``401`` for a session the bridge mirrors means that the session ended.

Kratos answers whoami with ``401`` for every error it meets while reading the session,
its own database failing included (v1.3.1 wraps any error of fetching the session into
its "no valid session" answer). Taken at its word, a database blip would be a logout:
the mirror and the app's data dropped, an ended event written. So before the mirror acts
on a ``401`` for a session it holds, Kratos's admin API is asked about that session
(``GET /admin/sessions/{id}``, with the admin key if one is set):

- Kratos knows none, or holds it inactive or expired: it ended, and the mirror ends it
  as it always did (``Verdict.ENDED``).
- Kratos holds it active: for a session token, the ``401`` can only be Kratos's own
  trouble (the token is the session). The request is refused as when Kratos is
  unavailable (``503``), and nothing is dropped or announced, for as long as it lasts.
- The admin API cannot say (unreachable, refusing the bridge, erroring, no time left of
  the one Kratos call's ``kratos_timeout``, or the session's budget of questions spent):
  refused the same way. Fail closed, lose nothing; a later request asks again.

A cookie is different: Kratos refuses one past its max-age, or sealed with a secret it
no longer has, while its session lives on. So is a credential the admin API cannot
vouch for. Such a credential is doubted for ``DOUBT_MS`` (``503``), then refused alone
(``Verdict.CREDENTIAL_REFUSED``: ``401``), still dropping nothing of the session: a
user with a lapsed cookie logs in again instead of meeting ``503`` for good, and a
database outage longer than that costs a login, never the session's data.

What it costs: a question only for a ``401`` on a session whose mirror the store holds
and which is not past its expiry; a credential the bridge never mirrored is refused as
before, without one. Each session has a budget of questions per process
(``CONFIRM_BURST`` at once, one more per ``CONFIRM_EVERY_MS``): a client replaying a
refused credential cannot make the bridge hammer the admin API.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import Enum

from bridge.bounded import BoundedMap, TokenBuckets
from bridge.clock import now_ms
from bridge.errors import KratosUnavailable
from bridge.kratos.admin_session import AdminSession
from bridge.logs import Throttled
from bridge.sessions.session import MirroredSession

log = logging.getLogger(__name__)
_doubted = Throttled(log)

CONFIRM_BURST = 2
CONFIRM_EVERY_MS = 1000
DOUBT_MS = 10_000  # how long a credential Kratos refuses, but cannot be shown ended, gets 503
_LEAST_TIME_S = 0.05  # less left than this of the call's time: not worth asking


class Verdict(Enum):
    ENDED = "ended"  # the session ended: the mirror ends it
    CREDENTIAL_REFUSED = "credential_refused"  # the session lives; this credential is refused


@dataclass(frozen=True, slots=True)
class _Doubt:
    since_ms: int  # when this run of refusals of the credential began
    last_ms: int  # the latest of them
    held_active: bool  # the admin API said the session is active during it


class RejectionCheck:
    """Asks the admin API whether a session Kratos's whoami refused has really ended."""

    def __init__(self, admin: AdminSession, kratos_timeout: float, max_keys: int = 50_000) -> None:
        self._admin = admin
        self._timeout = kratos_timeout
        self._budget = TokenBuckets(CONFIRM_BURST, CONFIRM_EVERY_MS, max_keys)
        self._doubts: BoundedMap[str, _Doubt] = BoundedMap(max_keys)

    def confirm(
        self, session: MirroredSession, fingerprint: str, may_lapse: bool, asked_at: float
    ) -> Verdict:
        """What Kratos's ``401`` for the credential ``fingerprint`` (last seen with
        ``session``) means; ``KratosUnavailable`` while it is taken for Kratos's trouble.
        ``may_lapse``: the credential is one Kratos can refuse while its session lives (a
        cookie). ``asked_at``: when whoami was asked (``time.monotonic()``); the question
        shares that call's ``kratos_timeout``, so a request still waits no longer than one
        Kratos call in all."""
        now = now_ms()
        if session.expires_at_ms <= now:
            return Verdict.ENDED  # past its expiry: Kratos's 401 is what the mirror expects
        doubt = self._doubts.get(fingerprint)
        if doubt is None or now - doubt.last_ms > DOUBT_MS:
            doubt = _Doubt(now, now, held_active=False)
        held_active = doubt.held_active
        try:
            if not self._budget.take(session.id, now):
                raise KratosUnavailable("asked again shortly")
            left = self._timeout - (time.monotonic() - asked_at)
            if left < _LEAST_TIME_S:
                raise KratosUnavailable("no time left to ask")
            if not self._admin.is_active(session.id, left):
                self._doubts.pop(fingerprint)
                return Verdict.ENDED
            held_active = True
            problem = "Kratos refused a session it holds active"
            _doubted.warning(
                "kratos whoami refused session %s, which its admin API holds active: "
                "refused with 503, nothing dropped",
                session.id,
            )
        except KratosUnavailable as error:
            # Its class only: the message may name the admin key's setting, which is not
            # for whoever sent the request.
            kind = type(error).__name__
            problem = f"Kratos refused the session and its admin API could not say ({kind})"
            _doubted.warning(
                "kratos whoami refused a mirrored session and its admin API could not "
                "confirm it (%s): refused with 503, nothing dropped",
                kind,
            )
        self._doubts.put(fingerprint, _Doubt(doubt.since_ms, now, held_active))
        if (held_active and not may_lapse) or now - doubt.since_ms < DOUBT_MS:
            raise KratosUnavailable(problem)
        return Verdict.CREDENTIAL_REFUSED

    def accepted(self, fingerprint: str) -> None:
        """Kratos accepted the credential again: a later refusal is doubted afresh."""
        self._doubts.pop(fingerprint)

    def close(self) -> None:
        self._admin.close()

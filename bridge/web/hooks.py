"""Kratos's ``web_hook`` calls: a login seen as it happens, not at the next request.

Kratos calls ``POST /hooks/kratos/<flow>`` after a login, registration or settings
change, with the body ``config/kratos/bridge-hook.jsonnet`` makes and the shared secret
in ``X-Bridge-Hook-Key``. The body only names a session and what Kratos saw of it; what
the bridge stores is asked of Kratos's admin API by id, so a forged or replayed body can
at worst make the bridge re-read a session Kratos itself vouches for.

What a hook does, and does not:

- It writes the session's mirror as Kratos describes it and records its AAL2 event
  through ``SessionSaver.save``, the same step the forward-auth path takes, with the
  upgrade id made from the same Kratos data: a hook and a forward-auth for one upgrade
  give one event, whichever comes first.
- It makes no credential fresh: no credential comes with a hook (Kratos forwards no
  session token or cookie), and a request is answered only from Kratos's acceptance of
  its own credential. The mirror is written under a pointer no credential can have.
- Kratos runs login hooks before it saves the session: first-factor logins carry the nil
  session id (nothing to mirror, answered 204 at once), and an AAL upgrade may reach the
  bridge before Kratos stored it, so the admin API is asked until it shows what the hook
  saw, for at most ``kratos_timeout`` (and not again while Kratos says its rate limit is
  nearly used).
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from bridge.clock import now_ms
from bridge.errors import KratosUnreachable
from bridge.sessions.mirror import SessionEvents
from bridge.sessions.session import MirroredSession, aal2_event
from bridge.store.base import SessionSaver
from bridge.web import responses
from bridge.web.responses import Reply

if TYPE_CHECKING:
    from bridge.kratos.admin import KratosAdmin  # the Ory SDK: loaded only with hooks on

log = logging.getLogger(__name__)

HOOK_KEY_HEADER = "X-Bridge-Hook-Key"
FLOWS = ("login", "registration", "settings")
NIL_ID = "00000000-0000-0000-0000-000000000000"
# "." is not in base64url: no credential's fingerprint starts like this.
_HOOK_POINTER = "hook."
_POLL_SECONDS = 0.025


class BadHookBody(ValueError):
    """The hook body is not what ``bridge-hook.jsonnet`` makes."""


@dataclass(frozen=True, slots=True)
class Announced:
    """What the hook body says Kratos saw: only used to know when the admin API caught up."""

    session_id: str
    aal: str | None
    methods: int


class KratosHooks:
    """Checks and handles Kratos's web hook calls; one per process."""

    def __init__(
        self,
        secret: str,
        store: SessionSaver,
        kratos_admin: KratosAdmin,
        kratos_timeout: float,
        events: SessionEvents | None = None,
    ) -> None:
        self._secret = secret.encode()
        self._store = store
        self._events = events if events is not None else SessionEvents()
        self._admin = kratos_admin
        self._timeout = kratos_timeout

    def authentic(self, presented: str | None) -> bool:
        """Whether the caller sent the shared secret; constant time in its content."""
        given = (presented or "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, self._secret) and presented is not None

    def handle(self, flow: str, body: bytes) -> Reply:
        try:
            announced = read_body(body)
        except BadHookBody as error:
            log.warning("kratos %s hook: unusable body (%s)", flow, error)
            return responses.http_error(400, "Bad Request")
        if announced is None:  # a first-factor login, a registration, a settings change
            log.info("kratos %s hook: no session to mirror", flow)
            return Reply(204, (), b"")
        session = self._session_as_kratos_has_it(announced)
        if session is None:
            log.info("kratos %s hook: session %s not found", flow, announced.session_id)
            return Reply(204, (), b"")
        seen_at = now_ms()
        event = aal2_event(session, seen_at)
        saved = self._store.save(_HOOK_POINTER + session.id, session, event, seen_at)
        log.info("kratos %s hook: mirrored session %s (%s)", flow, session.id, session.aal)
        if saved.aal2_event_id is not None and event is not None:
            log.info("aal2 event %s for session %s (kratos hook)", saved.aal2_event_id, session.id)
            self._events.aal2_recorded(session, event)
        self._events.session_seen(session)
        body_out = {
            "session_id": session.id,
            "aal": session.aal,
            "mirrored": saved.cached,
            "aal2_event_id": saved.aal2_event_id,
        }
        return responses.json_reply(200, body_out)

    def close(self) -> None:
        self._admin.close()

    def _session_as_kratos_has_it(self, announced: Announced) -> MirroredSession | None:
        """The mirrored session from Kratos's admin API once it shows at least what the
        hook saw; ``None`` if Kratos does not know it (in time)."""
        deadline = time.monotonic() + self._timeout
        answered = False
        while True:
            asked_at = now_ms()
            try:
                found = self._admin.vouched_session(announced.session_id, _left(deadline))
            except KratosUnreachable:
                if answered and time.monotonic() >= deadline:
                    # The last ask ran out of the hook's time: Kratos is there (it has
                    # answered), it just has not shown the session in time.
                    return None
                raise
            answered = True
            if found is not None and _caught_up(found.view, announced):
                return MirroredSession.from_kratos(found, asked_at)
            if time.monotonic() + _POLL_SECONDS >= deadline:
                return None
            if not self._admin.rate_limit.spare():
                # Kratos's rate limit is nearly used (Ory Network): asking again only
                # saves the next request a Kratos call, so the calls left go to requests.
                log.info("kratos hook: %s not asked for again (rate limit)", announced.session_id)
                return None
            time.sleep(_POLL_SECONDS)


def _left(deadline: float) -> float:
    """What is left of the hook's one ``kratos_timeout``, so it waits no longer in all."""
    return max(0.01, deadline - time.monotonic())


def _caught_up(view: dict[str, Any], announced: Announced) -> bool:
    if len(view["authentication_methods"]) < announced.methods:
        return False
    return announced.aal is None or view["aal"] >= announced.aal


def read_body(body: bytes) -> Announced | None:
    """The session a hook body names, or ``None`` when it names none (or the nil id)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadHookBody("not JSON") from None
    if not isinstance(document, dict):
        raise BadHookBody("not an object")
    session = document.get("session")
    if session is None:
        return None
    if not isinstance(session, dict):
        raise BadHookBody("session is not an object")
    session_id = _uuid(session.get("id"))
    if session_id == NIL_ID:
        return None
    aal = session.get("aal")
    if aal is not None and aal not in ("aal0", "aal1", "aal2", "aal3"):
        raise BadHookBody("session.aal is not an AAL")
    methods = session.get("methods", 0)
    if isinstance(methods, float) and methods.is_integer():
        methods = int(methods)  # JSON has one kind of number: 3.0 is the integer 3
    if not isinstance(methods, int) or isinstance(methods, bool) or not 0 <= methods <= 64:
        raise BadHookBody("session.methods is not a small count")
    return Announced(session_id, aal, methods)


def _uuid(value: object) -> str:
    try:
        parsed = uuid.UUID(value) if isinstance(value, str) and len(value) == 36 else None
    except ValueError:
        parsed = None
    if parsed is None or not isinstance(value, str) or str(parsed) != value.lower():
        raise BadHookBody("session.id is not a UUID")
    return str(parsed)

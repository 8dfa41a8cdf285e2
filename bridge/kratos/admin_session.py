"""Kratos's admin API read of one session (``GET /admin/sessions/{id}``), without the Ory
SDK, so that the request path can afford it: the web hooks' read of the session they
name, and the mirror's check of a ``401`` (``bridge.sessions.rejection``).

It goes through the whoami client's transport (``bridge.kratos.http_client``): one
deadline for the whole exchange (urllib3's timeout is per socket read, so a Kratos that
trickles its answer could hold a caller far longer), no retries, no redirects followed,
and an answer capped at 1 MiB. The admin API key (``BRIDGE_KRATOS_ADMIN_TOKEN``) is
added to each request as it is built, never kept as a default. A ``401`` or ``403``
answer names the setting; a ``429`` holds every admin call back until Kratos's
``Retry-After`` (``bridge.kratos.rate_limit``, shared with ``bridge.kratos.admin``).
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import orjson

from bridge.clock import now_ms, parse_timestamp_ms
from bridge.errors import (
    KratosAdminRefused,
    KratosRateLimited,
    KratosUnavailable,
    KratosUnreachable,
)
from bridge.kratos.http_client import Answer, HTTPClient, RequestFailed
from bridge.kratos.rate_limit import RateLimit
from bridge.kratos.whoami import VouchedSession, parse_session
from bridge.logs import Throttled

log = logging.getLogger(__name__)
_refused = Throttled(log, interval=60.0)

KEY_SETTING = "BRIDGE_KRATOS_ADMIN_TOKEN"


class AdminSession:
    """Reads sessions from Kratos's admin API; one per user of it, holding idle sockets,
    the admin URL and the key, and nothing of a request."""

    def __init__(self, admin_url: str, token: str | None = None) -> None:
        self._http = HTTPClient(admin_url)
        self._token = token
        self.rate_limit = RateLimit()  # what Kratos says of the admin API's budget

    def vouched_session(self, session_id: str, timeout: float) -> VouchedSession | None:
        """Kratos's session checked and reduced as a whoami answer is (``parse_session``),
        or ``None`` if Kratos does not know it (404). ``KratosUnreachable`` when no answer
        came within ``timeout`` (all of it: connect, send and read); ``KratosUnavailable``
        for any other answer."""
        answer = self._get(session_id, timeout)
        if answer is None:
            return None
        view, expires_at_ms = parse_session(answer.body)
        if view["session_id"] != session_id:
            raise KratosUnavailable("Kratos answered for another session")
        return VouchedSession(view, expires_at_ms, ())

    def is_active(self, session_id: str, timeout: float) -> bool:
        """Whether Kratos holds the session active now: ``False`` when it knows none (404),
        or says it is not ``active`` (revoked, logged out, its identity disabled) or
        past its ``expires_at``. Failures as ``vouched_session``'s; an answer that does
        not say which is ``KratosUnavailable``, never ``False``."""
        answer = self._get(session_id, timeout)
        if answer is None:
            return False
        try:
            body = orjson.loads(answer.body)
            if not isinstance(body, dict) or body.get("id") != session_id:
                raise ValueError("not this session")
            active = body.get("active")
            if not isinstance(active, bool):
                raise ValueError("active is not a boolean")
            expires_at_ms = parse_timestamp_ms(body.get("expires_at"))
        except (ValueError, TypeError) as error:  # orjson.JSONDecodeError is a ValueError
            raise KratosUnavailable(f"Kratos admin API answered unusably ({error})") from None
        return active and expires_at_ms > now_ms()

    def auth(self) -> dict[str, str]:
        """The header for one request: a new dict each time (the SDK adds to the one it
        is given)."""
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def check_open(self) -> None:
        """``KratosRateLimited`` at once, sending nothing, while a ``429`` holds."""
        wait = self.rate_limit.closed_for()
        if wait:
            raise rate_limited(wait)

    def refusal(self, status: int) -> KratosUnavailable:
        """The error for an answer other than 200 or 404, naming the setting to fix when
        Kratos (or Ory Network) refuses the bridge."""
        if status == 429:
            return rate_limited(self.rate_limit.closed_for())
        if status not in (401, 403):
            return KratosUnavailable(f"Kratos admin API answered {status}")
        if self._token is None:
            problem = f"it needs an API key: set {KEY_SETTING} or {KEY_SETTING}_FILE"
        else:
            problem = f"it does not accept the key in {KEY_SETTING}"
        _refused.warning("kratos admin API answered %d: %s", status, problem)
        return KratosAdminRefused(f"Kratos admin API answered {status}: {problem}")

    def close(self) -> None:
        self._http.close()

    def _get(self, session_id: str, timeout: float) -> Answer | None:
        """The 200 answer for the session, ``None`` for a 404."""
        self.check_open()
        path = f"/admin/sessions/{quote(session_id, safe='')}?expand=identity&expand=devices"
        headers = [("Accept", "application/json"), *self.auth().items()]
        try:
            answer = self._http.get(path, headers, timeout)
        except RequestFailed as error:
            raise KratosUnreachable(f"Kratos admin API unreachable ({error})") from None
        self.rate_limit.saw(answer.status, answer.text_header)
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise self.refusal(answer.status)
        return answer


def rate_limited(wait: int) -> KratosRateLimited:
    return KratosRateLimited(
        str(wait), f"Kratos admin API is rate limiting the bridge: retry in {wait} s"
    )

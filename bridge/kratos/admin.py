"""Kratos's admin API: the session admin's reads and revocations through the Ory SDK
(``ory-kratos-client``), and the web hooks' read of the session they name through the
whoami client's transport (``bridge.kratos.http_client``: one deadline, no retries).

One SDK client per user of it, shared by its requests: it holds a connection pool and
the admin URL, and nothing that belongs to a request (no default header is ever set).
Every failure other than "Kratos does not know it" is ``KratosUnavailable``, so the
caller reports it and never goes on as if the session were gone. Neither an answer's
body nor the SDK's exception (which quotes it) is ever logged or passed on.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote

from ory_kratos_client import ApiClient, Configuration, IdentityApi
from ory_kratos_client.exceptions import NotFoundException, OpenApiException
from urllib3.exceptions import HTTPError

from bridge.errors import KratosUnavailable, KratosUnreachable
from bridge.kratos.http_client import HTTPClient, RequestFailed
from bridge.kratos.whoami import VouchedSession, parse_session

_PAGE_SIZE = 500
_MAX_PAGES = 20
_EXPAND = ["identity", "devices"]


class KratosAdmin:
    def __init__(self, admin_url: str, timeout: float) -> None:
        self._client = ApiClient(Configuration(host=admin_url))
        self._identities = IdentityApi(self._client)
        # The web hooks' read goes through the whoami client's transport, not the SDK's:
        # one deadline for the whole exchange (urllib3's timeout is per socket read, so a
        # Kratos that trickles its answer could hold a hook far longer), no retries, no
        # redirects followed, and an answer capped at 1 MiB.
        self._http = HTTPClient(admin_url)
        self._timeout = timeout

    def session(self, session_id: str) -> dict[str, Any] | None:
        """Kratos's session (with identity and devices), or ``None`` if it knows none."""
        try:
            found = self._identities.get_session(
                session_id, expand=_EXPAND, _request_timeout=self._timeout
            )
        except NotFoundException:
            return None
        except (OpenApiException, HTTPError, ValueError) as error:
            raise _unavailable(error) from None
        return found.to_dict()

    def vouched_session(self, session_id: str, timeout: float) -> VouchedSession | None:
        """Kratos's session checked and reduced as a whoami answer is (``parse_session``),
        or ``None`` if Kratos does not know it (404). ``KratosUnreachable`` when no answer
        came within ``timeout`` (all of it: connect, send and read); ``KratosUnavailable``
        for any other answer."""
        path = f"/admin/sessions/{quote(session_id, safe='')}?expand=identity&expand=devices"
        try:
            answer = self._http.get(path, [("Accept", "application/json")], timeout)
        except RequestFailed as error:
            raise KratosUnreachable(f"Kratos admin API unreachable ({error})") from None
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise KratosUnavailable(f"Kratos admin API answered {answer.status}")
        view, expires_at_ms = parse_session(answer.body)
        if view["session_id"] != session_id:
            raise KratosUnavailable("Kratos answered for another session")
        return VouchedSession(view, expires_at_ms, ())

    def revoke(self, session_id: str) -> bool:
        """Revoke one session; ``False`` when Kratos knows no such session."""
        try:
            self._identities.disable_session(session_id, _request_timeout=self._timeout)
        except NotFoundException:
            return False
        except (OpenApiException, HTTPError, ValueError) as error:
            raise _unavailable(error) from None
        return True

    def active_session_ids(self, identity_id: str) -> list[str] | None:
        """The identity's active sessions, or ``None`` if Kratos knows no such identity."""
        found = self._identity_sessions(identity_id, active=True)
        return None if found is None else [session["id"] for session in found]

    def identity_sessions(self, identity_id: str) -> list[dict[str, Any]] | None:
        """Every session Kratos holds for the identity, active or not (with devices and
        identity), or ``None`` if Kratos knows no such identity."""
        return self._identity_sessions(identity_id, active=None)

    def _identity_sessions(
        self, identity_id: str, active: bool | None
    ) -> list[dict[str, Any]] | None:
        """All pages of the identity's sessions: a partial list is never returned, since
        a caller would take it for the whole (``KratosUnavailable`` instead)."""
        sessions: list[dict[str, Any]] = []
        token: str | None = None
        try:
            for _ in range(_MAX_PAGES):
                answer = self._identities.list_identity_sessions_with_http_info(
                    identity_id,
                    page_size=_PAGE_SIZE,
                    page_token=token,
                    active=active,
                    _request_timeout=self._timeout,
                )
                page = answer.data or []
                sessions += [session.to_dict() for session in page]
                # Kratos (v1.3.1) links a "next" page after every page, the empty one
                # included: a page that is not full is the last.
                token = _next_page_token(answer.headers or {})
                if token is None or len(page) < _PAGE_SIZE:
                    return sessions
        except NotFoundException:
            return None
        except (OpenApiException, HTTPError, ValueError) as error:
            raise _unavailable(error) from None
        raise KratosUnavailable("Kratos listed more sessions for this identity than expected")

    def revoke_identity(self, identity_id: str) -> None:
        try:
            self._identities.delete_identity_sessions(identity_id, _request_timeout=self._timeout)
        except NotFoundException:
            return  # nothing to revoke (Kratos answers 404 for an identity without sessions)
        except (OpenApiException, HTTPError, ValueError) as error:
            raise _unavailable(error) from None

    def close(self) -> None:
        # The SDK's ApiClient (v25) has no close(): its connections are urllib3's.
        self._client.rest_client.pool_manager.clear()
        self._http.close()


def _next_page_token(headers: Any) -> str | None:
    """The ``page_token`` of the ``rel="next"`` link Kratos sends, if any."""
    link = headers.get("Link") or headers.get("link") or ""
    for part in link.split(","):
        if 'rel="next"' not in part:
            continue
        target = part.split(";", 1)[0].strip().strip("<>")
        for pair in target.partition("?")[2].split("&"):
            name, _, value = pair.partition("=")
            if name == "page_token" and value:
                return unquote(value)
    return None


def _unavailable(error: Exception) -> KratosUnavailable:
    status = getattr(error, "status", None)
    detail = f"answered {status}" if status else f"unreachable ({type(error).__name__})"
    return KratosUnavailable(f"Kratos admin API {detail}")

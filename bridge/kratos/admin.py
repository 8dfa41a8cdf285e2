"""Kratos's admin API: the session admin's reads and revocations through the Ory SDK
(``ory-kratos-client``), and the web hooks' read of the session they name without it
(``bridge.kratos.admin_session``: one deadline, no retries).

One SDK client per user of it, shared by its requests: it holds a connection pool and
the admin URL, and nothing that belongs to a request (no default header is ever set).
Every failure other than "Kratos does not know it" is ``KratosUnavailable``, so the
caller reports it and never goes on as if the session were gone. Neither an answer's
body nor the SDK's exception (which quotes it) is ever logged or passed on.

Ory Network (README, "Ory Network") guards its admin API with a project API key:
``BRIDGE_KRATOS_ADMIN_TOKEN``, sent as ``Authorization: Bearer`` with every call made
here, SDK and hook read alike, and added to each request as it is built rather than
kept as a client default, so that nothing else this client might ever send could carry
it. The public client (``bridge.kratos.whoami``) is built without it. A ``401`` or
``403`` answer names the setting; a ``429`` holds every call here back until Kratos's
``Retry-After`` (``bridge.kratos.rate_limit``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ory_kratos_client import ApiClient, Configuration, IdentityApi, MetadataApi
from ory_kratos_client.exceptions import NotFoundException, OpenApiException
from urllib3 import Retry
from urllib3.exceptions import HTTPError

from bridge.errors import KratosUnavailable, KratosUnreachable
from bridge.kratos.admin_session import AdminSession
from bridge.kratos.whoami import VouchedSession

if TYPE_CHECKING:
    from bridge.config import Settings

_PAGE_SIZE = 500
_MAX_PAGES = 20
_EXPAND = ["identity", "devices"]


class KratosAdmin:
    def __init__(
        self,
        admin_url: str,
        timeout: float,
        token: str | None = None,
        reads: AdminSession | None = None,
    ) -> None:
        """``reads``: the process's SDK-free admin reader, whose rate-limit state every
        admin client of the process then shares (a ``429`` one of them sees holds back the
        others); its owner closes it. Without it, this client has one of its own."""
        self._admin_url = admin_url
        # urllib3's default retries, but never its sleep on a 429's Retry-After (which
        # could hold an operator's call for as long as Kratos says): a 429 is answered at
        # once, and the calls after it wait here (``_open``).
        retries = Retry(3, respect_retry_after_header=False)
        # The SDK hints retries as an int; urllib3, which gets it, also takes a Retry.
        self._client = ApiClient(Configuration(host=admin_url, retries=retries))  # type: ignore[arg-type]
        self._identities = IdentityApi(self._client)
        # The web hooks' read goes without the SDK (bridge.kratos.admin_session), which
        # also keeps the key and what Kratos says of the admin API's rate limit.
        self._owns_reads = reads is None
        self._reads = reads if reads is not None else AdminSession(admin_url, token)
        self._timeout = timeout
        self.rate_limit = self._reads.rate_limit

    @classmethod
    def of(cls, settings: Settings, reads: AdminSession | None = None) -> KratosAdmin:
        """The admin client the settings describe, with their API key if any."""
        return cls(
            settings.kratos_admin_url, settings.kratos_timeout, settings.kratos_admin_token, reads
        )

    def session(self, session_id: str) -> dict[str, Any] | None:
        """Kratos's session (with identity and devices), or ``None`` if it knows none."""
        self._open()
        try:
            answer = self._identities.get_session_with_http_info(
                session_id, expand=_EXPAND, _request_timeout=self._timeout, _headers=self._auth()
            )
        except NotFoundException:
            return None
        except (OpenApiException, HTTPError, ValueError) as error:
            raise self._unavailable(error) from None
        self._saw(answer.status_code, answer.headers)
        return answer.data.to_dict()

    def vouched_session(self, session_id: str, timeout: float) -> VouchedSession | None:
        """``AdminSession.vouched_session``: the session as a whoami answer is read."""
        return self._reads.vouched_session(session_id, timeout)

    def revoke(self, session_id: str) -> bool:
        """Revoke one session; ``False`` when Kratos knows no such session."""
        self._open()
        try:
            answer = self._identities.disable_session_with_http_info(
                session_id, _request_timeout=self._timeout, _headers=self._auth()
            )
        except NotFoundException:
            return False
        except (OpenApiException, HTTPError, ValueError) as error:
            raise self._unavailable(error) from None
        self._saw(answer.status_code, answer.headers)
        return True

    def version(self) -> str:
        """The Kratos version, asked once (no urllib3 retries) of a client that lives for
        this one call. At ``/admin/version`` directly: Kratos answers ``/version`` with a
        redirect to its own base URL, which would leave a proxy (and its key check)
        behind. ``KratosUnreachable`` when it gave no answer, ``KratosAdminRefused`` when
        it refused the bridge, ``KratosUnavailable`` for any other answer."""
        once = Retry(total=None, connect=0, read=0, status=0, other=0, redirect=0)
        try:
            # The SDK hints retries as an int; urllib3, which gets it, also takes a Retry.
            configuration = Configuration(host=self._admin_url + "/admin", retries=once)  # type: ignore[arg-type]
            with ApiClient(configuration) as client:
                found = MetadataApi(client).get_version(
                    _request_timeout=self._timeout, _headers=self._auth()
                )
        except (OpenApiException, HTTPError, ValueError) as error:
            raise self._unavailable(error) from None
        return found.version

    def extend(self, session_id: str) -> bool:
        """Ask Kratos to extend one session (``PATCH /admin/sessions/{id}/extend``), which
        it does only within ``session.earliest_possible_extend`` of the expiry (else it
        answers the same, having done nothing); ``False`` when Kratos knows no such
        session. The answer (200 with the session, or 204 under Kratos's
        ``feature_flags.faster_session_extend``) is not read: the caller asks whoami."""
        self._open()
        try:
            answer = self._identities.extend_session_without_preload_content(
                session_id, _request_timeout=self._timeout, _headers=self._auth()
            )
            status, headers = answer.status, answer.headers
            answer.release_conn()
        except (OpenApiException, HTTPError, ValueError) as error:
            raise self._unavailable(error) from None
        self._saw(status, headers)
        if status == 404:
            return False
        if status not in (200, 204):
            raise self._refusal(status)
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
                self._open()
                answer = self._identities.list_identity_sessions_with_http_info(
                    identity_id,
                    page_size=_PAGE_SIZE,
                    page_token=token,
                    active=active,
                    _request_timeout=self._timeout,
                    _headers=self._auth(),
                )
                self._saw(answer.status_code, answer.headers)
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
            raise self._unavailable(error) from None
        raise KratosUnavailable("Kratos listed more sessions for this identity than expected")

    def revoke_identity(self, identity_id: str) -> None:
        self._open()
        try:
            answer = self._identities.delete_identity_sessions_with_http_info(
                identity_id, _request_timeout=self._timeout, _headers=self._auth()
            )
        except NotFoundException:
            return  # nothing to revoke (Kratos answers 404 for an identity without sessions)
        except (OpenApiException, HTTPError, ValueError) as error:
            raise self._unavailable(error) from None
        self._saw(answer.status_code, answer.headers)

    def close(self) -> None:
        # The SDK's ApiClient (v25) has no close(): its connections are urllib3's.
        self._client.rest_client.pool_manager.clear()
        if self._owns_reads:
            self._reads.close()

    def _auth(self) -> dict[str, str]:
        return self._reads.auth()

    def _open(self) -> None:
        self._reads.check_open()

    def _saw(self, status: int, headers: Any) -> None:
        self.rate_limit.saw(status, lambda name: (headers or {}).get(name))

    def _unavailable(self, error: Exception) -> KratosUnavailable:
        status = getattr(error, "status", None)
        if isinstance(error, OpenApiException) and isinstance(status, int):
            self._saw(status, getattr(error, "headers", None))
            return self._refusal(status)
        if isinstance(error, HTTPError):
            return KratosUnreachable(f"Kratos admin API unreachable ({type(error).__name__})")
        return KratosUnavailable(f"Kratos admin API answered unusably ({type(error).__name__})")

    def _refusal(self, status: int) -> KratosUnavailable:
        return self._reads.refusal(status)


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

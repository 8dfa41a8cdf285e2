"""Sign-out through the bridge: ``GET|POST BRIDGE_LOGOUT_PATH?return_to=``, a route the
proxy sends to the bridge itself.

- A session cookie: Kratos's browser logout flow, done with the user's cookie
  (``bridge.kratos.logout``); the browser gets Kratos's ``Set-Cookie`` that clears its
  cookie and is sent (303) to ``return_to`` when it is allow-listed, else where Kratos
  would send it; a script (not a navigation) gets that URL as JSON.
- A token (``X-Session-Token`` or ``Authorization: Bearer``): Kratos's API logout, 204.

Either way the session is ended in Kratos first, then in the bridge
(``bridge.sessions.ending``), so every bridge process refuses the credential at once, and
no re-validation finds it alive again.

Against cross-site requests (a page of another site must not log a user out): a request
whose ``Sec-Fetch-Site`` is anything but ``same-origin`` or ``none``, or whose ``Origin``
is not this host, is refused (403) before anything else; and a cookie, which a browser
attaches by itself, is taken only with a ``Sec-Fetch-Site`` or, from a browser too old
to send it, by a ``POST`` with a matching ``Origin``. A token is sent by a script, never
attached by the browser, so a client without either header may use it.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import parse_qs

from bridge.errors import CredentialMissing, SessionInvalid, StepUpRequired
from bridge.kratos.logout import KratosLogout
from bridge.pipeline.credentials import Credential, Kind, extract
from bridge.pipeline.dialects import is_navigation
from bridge.pipeline.redirects import BrowserRedirects, host_of
from bridge.sessions.ending import SessionEnder
from bridge.sessions.mirror import Resolved
from bridge.web import responses
from bridge.web.request import HeaderView, declare_read
from bridge.web.responses import Reply

SITE_HEADERS = declare_read("sec-fetch-site", "origin", "host", "x-forwarded-host")
METHODS = ("GET", "POST")
_SAME_SITE = ("same-origin", "none")
_NO_STORE = ("Cache-Control", "no-store")


class SessionSource(Protocol):
    def resolve(self, credential: Credential) -> Resolved: ...


class SignOut:
    def __init__(
        self,
        sessions: SessionSource,
        kratos: KratosLogout,
        ender: SessionEnder,
        redirects: BrowserRedirects,
        cookie_name: str,
    ) -> None:
        self._sessions = sessions
        self._kratos = kratos
        self._ender = ender
        self._redirects = redirects
        self._cookie_name = cookie_name

    def __call__(self, headers: HeaderView, method: str, query: str) -> Reply:
        if method not in METHODS:
            return responses.http_error(405, "Method Not Allowed", list(METHODS))
        asked = parse_qs(query, keep_blank_values=True).get("return_to", [None])[0]
        return_to = self._redirects.allowed_return_to(asked)
        try:
            credential: Credential | None = extract(headers, self._cookie_name)
        except (CredentialMissing, SessionInvalid):
            credential = None
        # Before anything else, with or without a credential: a browser keeps Kratos's
        # SameSite=Lax cookie from another site's form POST or image, and such a request
        # is refused all the same rather than sent on to the login.
        problem = cross_site(headers, method, credential)
        if problem is not None:
            return responses.json_reply(403, {"error": "forbidden", "message": problem})
        if credential is None:
            return self._no_session(headers, return_to)
        session_id = self._session_id(credential)
        if credential.kind is Kind.COOKIE:
            return self._browser(headers, credential, session_id, return_to)
        if session_id is None:
            return self._no_session(headers, return_to)
        self._kratos.log_out_token(credential)  # False: ended in Kratos meanwhile; all the same
        self._ender.end(session_id, "logged_out", by="user")
        return Reply(204, (_NO_STORE,), b"")

    def _browser(
        self,
        headers: HeaderView,
        credential: Credential,
        session_id: str | None,
        return_to: str | None,
    ) -> Reply:
        done = self._kratos.log_out_browser(credential)
        if done is None:
            return self._no_session(headers, return_to)
        if session_id is not None:
            self._ender.end(session_id, "logged_out", by="user")
        target = return_to or done.location or self._redirects.login(None)
        cookies = tuple(("Set-Cookie", cookie) for cookie in done.set_cookies)
        if is_navigation(headers):
            return Reply(303, (("Location", target), _NO_STORE, *cookies), b"")
        reply = responses.json_reply(200, {"redirect_to": target})
        return Reply(reply.status, (*reply.headers, *cookies), reply.body)

    def _session_id(self, credential: Credential) -> str | None:
        """The credential's session, or ``None`` when Kratos accepts none (a session
        waiting for its second factor is logged out in Kratos all the same)."""
        try:
            return self._sessions.resolve(credential).session.id
        except (SessionInvalid, StepUpRequired):
            return None

    def _no_session(self, headers: HeaderView, return_to: str | None) -> Reply:
        """Nothing to end: a browser goes on to ``return_to`` (else the login), a script
        gets 401."""
        if is_navigation(headers):
            target = return_to or self._redirects.login(None)
            return Reply(303, (("Location", target), _NO_STORE), b"")
        body = {"error": "session_missing", "message": "no session to sign out of"}
        return responses.json_reply(401, body)


def cross_site(headers: HeaderView, method: str, credential: Credential | None) -> str | None:
    """Why the sign-out may have been sent by a page of another site, or ``None``
    (``credential``: none when the request carries none)."""
    site = (headers.get("sec-fetch-site") or "").lower()
    origin = headers.get("origin")
    if site and site not in _SAME_SITE:
        return "sent from another site (Sec-Fetch-Site)"
    own = _own_host(headers)
    if origin is not None and (not own or host_of(origin) != own):
        return "sent from another origin (Origin)"
    cookie = credential is not None and credential.kind is Kind.COOKIE
    if cookie and not site and (method != "POST" or origin is None):
        return "a sign-out by cookie needs Sec-Fetch-Site, or a POST with a matching Origin"
    return None


def _own_host(headers: HeaderView) -> str:
    """The host the browser asked for: the proxy's ``X-Forwarded-Host``, else ``Host``."""
    forwarded = (headers.get("x-forwarded-host") or "").split(",")[0].strip()
    return (forwarded or headers.get("host") or "").lower()

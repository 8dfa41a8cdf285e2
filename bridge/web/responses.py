"""The one place that turns outcomes into HTTP answers: identity headers and error JSON.

An answer is a plain ``Reply`` (status, header list, body), so the lean forward-auth
path sends it as it is and the Flask routes wrap it. Identity headers are only ever
set on an allow. Every error is a small JSON object ``{"error": <code>, "message":
<text>}``, plus ``redirect_browser_to`` where the browser has somewhere to go.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from bridge.errors import (
    BridgeError,
    CredentialMissing,
    KratosRateLimited,
    KratosUnavailable,
    ReauthenticationRequired,
    SessionEnded,
    SessionInvalid,
    StepUpRequired,
    StoreUnavailable,
)
from bridge.pipeline.redirects import BrowserRedirects
from bridge.sessions import app_data
from bridge.sessions.session import MirroredSession
from bridge.web.request import OriginalRequest

log = logging.getLogger(__name__)

REDIRECT_HEADER = "X-Bridge-Redirect"
_NO_STORE = ("Cache-Control", "no-store")
_JSON = ("Content-Type", "application/json")
_JSON_HEADERS = (_JSON, _NO_STORE)


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer, immutable so that one can serve many requests; ``raw_headers`` is the
    header list as the server sends it (bytes, with ``Content-Length``), built once.

    An error answer also says what it is, for the watchers (log, metrics), which never
    read the body: ``code`` is its error code, ``cause`` the class of the ``BridgeError``
    it refuses. Kinds, never an instance: a reply holds nothing of one user."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    code: str | None = None
    cause: type[BridgeError] | None = None
    raw_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        if not any(name == b"content-length" for name, _ in raw):
            raw.append((b"content-length", str(len(self.body)).encode()))
        object.__setattr__(self, "raw_headers", tuple(raw))

    def with_header(self, name: str, value: str) -> Reply:
        headers = (*self.headers, (name, value))
        return Reply(self.status, headers, self.body, self.code, self.cause)


def allow(headers: tuple[tuple[str, str], ...], set_cookies: tuple[str, ...]) -> Reply:
    """200 with the upstream headers (``bridge.pipeline.upstream_headers``) and re-issued
    cookies."""
    cookies = tuple(("Set-Cookie", cookie) for cookie in set_cookies)
    return Reply(200, (_NO_STORE, *headers, *cookies))


def session_json(session: MirroredSession, set_cookies: tuple[str, ...]) -> Reply:
    """``/whoami``: the unified session, its app section decoded, and its CSRF token."""
    headers = (_JSON, _NO_STORE, *(("Set-Cookie", cookie) for cookie in set_cookies))
    body = {
        **session.to_json(),
        "app": app_data.decoded(session.app),
        "csrf_token": session.csrf_token or None,
    }
    return Reply(200, headers, _encode(body))


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused request, before a dialect shapes it: ``redirect`` is where a browser
    should go (Kratos's login), when it can do something about it; ``cause`` is the class
    of the error refused, passed on to the reply."""

    status: int
    code: str
    message: str
    redirect: str | None = None
    retry_after: str | None = None
    cause: type[BridgeError] | None = None

    def reply(
        self, status: int | None = None, location: bool = False, redirect_header: bool = True
    ) -> Reply:
        """The JSON answer; ``status`` overrides (a browser redirect, a 429 as 503). The
        redirect goes in ``X-Bridge-Redirect`` unless ``redirect_header`` is unset (a 302
        says it in ``Location``), and in ``Location`` when ``location`` is set. Both fit a
        proxy's buffer for the auth answer's headers (``MAX_REDIRECT``)."""
        reply = _error(
            status or self.status, self.code, self.message, self.redirect, cause=self.cause
        )
        if self.redirect:
            if location:
                reply = reply.with_header("Location", self.redirect)
            if redirect_header:
                reply = reply.with_header(REDIRECT_HEADER, self.redirect)
        return reply.with_header("Retry-After", self.retry_after) if self.retry_after else reply


def refusal(
    error: BridgeError, redirects: BrowserRedirects, original: OriginalRequest | None
) -> Refusal:
    """The answer for every ``BridgeError`` the request path raises or decides: the class's
    code and status, and the class itself for the watchers; what some refusals add (where
    a browser should go, when to come back) is said here, case by case."""
    if error.code == BridgeError.code:
        # No code of its own: its message is for the log, not the client.
        return replace(_INTERNAL, cause=type(error))
    redirect = retry_after = None
    if isinstance(error, (CredentialMissing, SessionInvalid, SessionEnded)):
        redirect = redirects.login(original)
    elif isinstance(error, StepUpRequired):
        redirect = redirects.step_up(original, error.redirect_browser_to)
    elif isinstance(error, ReauthenticationRequired):
        redirect = redirects.reauthenticate(original)
    elif isinstance(error, KratosRateLimited):
        # Come back later (429, not 401): a 401 would send the browser to log in again.
        retry_after = error.retry_after
    elif isinstance(error, (KratosUnavailable, StoreUnavailable)):
        retry_after = "1"
    return Refusal(error.status, error.code, str(error), redirect, retry_after, type(error))


def timed_out() -> Reply:
    return _error(
        503,
        "timeout",
        "Kratos or Redis did not answer in time; nothing was allowed",
        retry_after="1",
    )


_INTERNAL = Refusal(500, "internal_error", "the bridge failed; the request was not allowed")


def internal_error() -> Reply:
    return _INTERNAL.reply()


def http_error(status: int, name: str, allowed_methods: list[str] | None = None) -> Reply:
    """Routing errors (404, 405, ...) in the same JSON shape."""
    reply = _error(status, name.lower().replace(" ", "_"), name)
    return reply.with_header("Allow", ", ".join(allowed_methods)) if allowed_methods else reply


def json_reply(status: int, body: dict[str, Any]) -> Reply:
    return Reply(status, _JSON_HEADERS, _encode(body))


def _error(
    status: int,
    code: str,
    message: str,
    redirect_browser_to: str | None = None,
    *,
    retry_after: str | None = None,
    cause: type[BridgeError] | None = None,
) -> Reply:
    body: dict[str, str] = {"error": code, "message": message}
    if redirect_browser_to:
        body["redirect_browser_to"] = redirect_browser_to
    reply = Reply(status, _JSON_HEADERS, _encode(body), code, cause)
    return reply.with_header("Retry-After", retry_after) if retry_after else reply


def _encode(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)

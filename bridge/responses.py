"""The one place that turns outcomes into HTTP answers: identity headers and error JSON.

An answer is a plain ``Reply`` (status, header list, body), so the lean forward-auth
path sends it as it is and the Flask routes wrap it. Identity headers are only ever
set on an allow. Every error is a small JSON object ``{"error": <code>, "message":
<text>}``, plus ``redirect_browser_to`` where the browser has somewhere to go.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson

from bridge.errors import (
    BadRequest,
    BridgeError,
    CredentialMissing,
    KratosRateLimited,
    KratosUnavailable,
    SessionInvalid,
    StepUpRequired,
    StoreUnavailable,
)
from bridge.session import MirroredSession

log = logging.getLogger(__name__)

IDENTITY_HEADERS = ("X-User-Id", "X-Session-Id", "X-User-Aal", "X-User-Email")
_REQUIRED_IDENTITY = IDENTITY_HEADERS[:3]
REDIRECT_HEADER = "X-Bridge-Redirect"
_NO_STORE = ("Cache-Control", "no-store")
_JSON = ("Content-Type", "application/json")
# Header values come from identity traits, which users edit: only plain visible ASCII passes.
_SAFE_HEADER_VALUE = re.compile(r"[\x21-\x7e]{1,512}")


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer, immutable so that one can serve many requests; ``raw_headers`` is the
    header list as the server sends it (bytes, with ``Content-Length``), built once."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    raw_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        if not any(name == b"content-length" for name, _ in raw):
            raw.append((b"content-length", str(len(self.body)).encode()))
        object.__setattr__(self, "raw_headers", tuple(raw))

    def with_header(self, name: str, value: str) -> Reply:
        return Reply(self.status, (*self.headers, (name, value)), self.body)


def allow(session: MirroredSession, set_cookies: tuple[str, ...]) -> Reply:
    """200 with the identity headers; a session that cannot name its identity, session
    and AAL (a corrupted mirror) is never allowed."""
    identity = identity_headers(session)
    if not all(name in identity for name in _REQUIRED_IDENTITY):
        log.error("session %r cannot be answered: identity headers missing", session.id)
        return internal_error()
    headers = (_NO_STORE, *identity.items())
    return Reply(200, headers + tuple(("Set-Cookie", cookie) for cookie in set_cookies))


def identity_headers(session: MirroredSession) -> dict[str, str]:
    headers = {
        "X-User-Id": session.identity_id,
        "X-Session-Id": session.id,
        "X-User-Aal": session.aal,
        "X-User-Email": session.email,
    }
    return {k: v for k, v in headers.items() if v and _SAFE_HEADER_VALUE.fullmatch(v)}


def session_json(session: MirroredSession, set_cookies: tuple[str, ...]) -> Reply:
    headers = (_JSON, _NO_STORE, *(("Set-Cookie", cookie) for cookie in set_cookies))
    return Reply(200, headers, _encode(session.to_json()))


def failure(
    error: BridgeError, login_url: str, return_to: str | None, *, forward_auth: bool
) -> Reply:
    """The answer for every ``BridgeError`` the request path raises. ``forward_auth``:
    the asker is a proxy deciding on a request (``/auth``), not an app."""
    if isinstance(error, StepUpRequired):
        target = _with_query(error.redirect_browser_to or login_url, aal="aal2")
        return _unauthorized("aal2_required", str(error), _with_query(target, return_to=return_to))
    if isinstance(error, CredentialMissing | SessionInvalid):
        code = "session_missing" if isinstance(error, CredentialMissing) else "session_invalid"
        return _unauthorized(code, str(error), _with_query(login_url, return_to=return_to))
    if isinstance(error, BadRequest):
        return _error(400, "bad_request", str(error))
    if isinstance(error, KratosRateLimited):
        # An app is told to come back; a proxy gets the same 503 as for any Kratos
        # trouble (a 401 would send the browser to log in again, and again).
        status = 503 if forward_auth else 429
        return _error(status, "kratos_rate_limited", str(error), retry_after=error.retry_after)
    if isinstance(error, KratosUnavailable):
        return _error(503, "kratos_unavailable", str(error), retry_after="1")
    if isinstance(error, StoreUnavailable):
        return _error(503, "store_unavailable", str(error), retry_after="1")
    return internal_error()


def timed_out() -> Reply:
    return _error(
        503,
        "timeout",
        "Kratos or Redis did not answer in time; nothing was allowed",
        retry_after="1",
    )


def internal_error() -> Reply:
    return _error(500, "internal_error", "the bridge failed; the request was not allowed")


def http_error(status: int, name: str, allowed_methods: list[str] | None = None) -> Reply:
    """Routing errors (404, 405, ...) in the same JSON shape."""
    reply = _error(status, name.lower().replace(" ", "_"), name)
    return reply.with_header("Allow", ", ".join(allowed_methods)) if allowed_methods else reply


def json_reply(status: int, body: dict[str, Any]) -> Reply:
    return Reply(status, (_JSON, _NO_STORE), _encode(body))


def _unauthorized(code: str, message: str, redirect_browser_to: str) -> Reply:
    """401, with where to send a browser both in the body and in a header proxies can read."""
    return _error(401, code, message, redirect_browser_to).with_header(
        REDIRECT_HEADER, redirect_browser_to
    )


def _error(
    status: int,
    code: str,
    message: str,
    redirect_browser_to: str | None = None,
    *,
    retry_after: str | None = None,
) -> Reply:
    body: dict[str, str] = {"error": code, "message": message}
    if redirect_browser_to:
        body["redirect_browser_to"] = redirect_browser_to
    reply = json_reply(status, body)
    return reply.with_header("Retry-After", retry_after) if retry_after else reply


def _encode(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)


def _with_query(url: str, **params: str | None) -> str:
    """``url`` with ``params`` added, skipping empty ones and ones the URL already has."""
    present = parse_qs(urlsplit(url).query)
    query = urlencode({k: v for k, v in params.items() if v and k not in present})
    if not query:
        return url
    return f"{url}{'&' if urlsplit(url).query else '?'}{query}"

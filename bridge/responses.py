"""The one place that turns outcomes into HTTP answers: identity headers and error JSON.

Identity headers are only ever set on an allow. Every error is a small JSON
object ``{"error": <code>, "message": <text>}``, plus ``redirect_browser_to``
where the browser has somewhere to go.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlencode, urlsplit

from flask import Response, jsonify

from bridge.errors import (
    BadRequest,
    BridgeError,
    CredentialMissing,
    KratosUnavailable,
    SessionInvalid,
    StepUpRequired,
    StoreUnavailable,
)
from bridge.session import MirroredSession

IDENTITY_HEADERS = ("X-User-Id", "X-Session-Id", "X-User-Aal", "X-User-Email")
REDIRECT_HEADER = "X-Bridge-Redirect"
_NO_STORE = {"Cache-Control": "no-store"}
# Header values come from identity traits, which users edit: only plain visible ASCII passes.
_SAFE_HEADER_VALUE = re.compile(r"[\x21-\x7e]{1,512}")


def allow(session: MirroredSession, set_cookies: tuple[str, ...]) -> Response:
    headers = [*_NO_STORE.items(), *identity_headers(session).items()]
    headers += [("Set-Cookie", cookie) for cookie in set_cookies]
    return Response(status=200, headers=headers)


def identity_headers(session: MirroredSession) -> dict[str, str]:
    headers = {
        "X-User-Id": session.identity_id,
        "X-Session-Id": session.id,
        "X-User-Aal": session.aal,
        "X-User-Email": session.email,
    }
    return {k: v for k, v in headers.items() if v and _SAFE_HEADER_VALUE.fullmatch(v)}


def session_json(session: MirroredSession, set_cookies: tuple[str, ...]) -> Response:
    response = jsonify(session.to_json())
    response.headers.update(_NO_STORE)
    for cookie in set_cookies:
        response.headers.add("Set-Cookie", cookie)
    return response


def failure(error: BridgeError, login_url: str, return_to: str | None) -> Response:
    """The answer for every ``BridgeError`` the request path raises."""
    if isinstance(error, StepUpRequired):
        target = _with_query(error.redirect_browser_to or login_url, aal="aal2")
        return _unauthorized("aal2_required", str(error), _with_query(target, return_to=return_to))
    if isinstance(error, CredentialMissing | SessionInvalid):
        code = "session_missing" if isinstance(error, CredentialMissing) else "session_invalid"
        return _unauthorized(code, str(error), _with_query(login_url, return_to=return_to))
    if isinstance(error, BadRequest):
        return _error(400, "bad_request", str(error))
    if isinstance(error, KratosUnavailable):
        return _error(503, "kratos_unavailable", str(error), retry_after=True)
    if isinstance(error, StoreUnavailable):
        return _error(503, "store_unavailable", str(error), retry_after=True)
    return internal_error()


def internal_error() -> Response:
    return _error(500, "internal_error", "the bridge failed; the request was not allowed")


def http_error(status: int, name: str) -> Response:
    """Werkzeug's own errors (404, 405, 431, ...) in the same JSON shape."""
    return _error(status, name.lower().replace(" ", "_"), name)


def _unauthorized(code: str, message: str, redirect_browser_to: str) -> Response:
    """401, with where to send a browser both in the body and in a header proxies can read."""
    response = _error(401, code, message, redirect_browser_to)
    response.headers[REDIRECT_HEADER] = redirect_browser_to
    return response


def _error(
    status: int,
    code: str,
    message: str,
    redirect_browser_to: str | None = None,
    *,
    retry_after: bool = False,
) -> Response:
    body: dict[str, str] = {"error": code, "message": message}
    if redirect_browser_to:
        body["redirect_browser_to"] = redirect_browser_to
    response = jsonify(body)
    response.status_code = status
    response.headers.update(_NO_STORE)
    if retry_after:
        response.headers["Retry-After"] = "1"
    return response


def _with_query(url: str, **params: str | None) -> str:
    """``url`` with ``params`` added, skipping empty ones and ones the URL already has."""
    present = parse_qs(urlsplit(url).query)
    query = urlencode({k: v for k, v in params.items() if v and k not in present})
    if not query:
        return url
    return f"{url}{'&' if urlsplit(url).query else '?'}{query}"

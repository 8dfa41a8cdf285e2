"""Who may use the admin listener: one place for the API's and the dashboard's rules.

- With ``BRIDGE_ADMIN_TOKEN``: the API wants ``Authorization: Bearer <token>``; the
  dashboard takes the token once in a login form and then a cookie that is not the
  token but a timestamp and its HMAC under the token, valid ``SIGNED_IN_FOR`` (the
  bearer header works there too). Changing the token signs everyone out; signing out
  drops the browser's cookie, and a copy of it stays valid until it expires.
- Without a token (loopback only, enforced by the settings): only requests that name a
  loopback host and that no page of another site sent, so a web page cannot reach the
  listener through the browser (DNS rebinding, cross-site forms).
- Every state-changing dashboard request carries a CSRF token (an HMAC of the cookie) and
  comes from the same origin.

All comparisons of secrets are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
import uuid

from flask import request

from bridge.pipeline.redirects import host_of

COOKIE = "bridge_admin_ui"
SIGNED_IN_FOR = 12 * 3600
_LOOPBACK_NAMES = frozenset(("localhost",))


class Gate:
    def __init__(self, token: str | None, fallback_key: bytes) -> None:
        self.token_required = token is not None
        self._token = token.encode() if token is not None else None
        # Signs the dashboard's CSRF tokens when there is no admin token to sign with.
        self._key = self._token if self._token is not None else fallback_key

    def is_token(self, presented: str) -> bool:
        given = presented.encode("utf-8", "surrogateescape")
        return self._token is not None and hmac.compare_digest(given, self._token)

    def bearer_ok(self) -> bool:
        scheme, _, presented = (request.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and self.is_token(presented.strip())

    def new_cookie(self) -> str:
        issued = str(int(time.time()))
        return f"{issued}.{self._mac('signed-in|' + issued)}"

    def signed_in(self) -> bool:
        """May this request see the dashboard?"""
        if not self.token_required:
            return True
        if self.bearer_ok():
            return True
        issued, _, mac = (request.cookies.get(COOKIE) or "").partition(".")
        # isdigit() alone admits "²" (a Latin-1 byte of a header), which int() refuses.
        if not (issued.isascii() and issued.isdigit()):
            return False
        if not 0 <= time.time() - int(issued) <= SIGNED_IN_FOR:
            return False
        return hmac.compare_digest(mac.encode(), self._mac("signed-in|" + issued).encode())

    def csrf_token(self) -> str:
        return self._mac("csrf|" + (request.cookies.get(COOKIE) or ""))

    def csrf_problem(self) -> str | None:
        """Why a state-changing dashboard request may not go ahead, or ``None``."""
        if not same_site():
            return "sent from another site"
        given = (request.form.get("csrf_token") or "").encode()
        if not hmac.compare_digest(given, self.csrf_token().encode()):
            return "CSRF token missing or wrong"
        return None

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()


def same_site() -> bool:
    """Not sent by a page of another site: ``Sec-Fetch-Site`` (browsers send it) says
    same-origin or none, and an ``Origin`` names this host. The scheme is not compared:
    behind a proxy that ends TLS the browser's ``https`` origin reaches a plain listener."""
    if request.headers.get("Sec-Fetch-Site", "none") not in ("none", "same-origin"):
        return False
    origin = request.headers.get("Origin")
    return origin is None or host_of(origin) == request.host.lower()


def local_and_same_site() -> bool:
    """A request naming a loopback host, not sent by a page of another site."""
    if not same_site():
        return False
    host = request.host.lower()
    host = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def canonical_uuid(value: str) -> str | None:
    """``value`` as a lower-case hyphenated UUID, or ``None`` if it is not one written so."""
    try:
        parsed = uuid.UUID(value) if len(value) == 36 else None
    except ValueError:
        return None
    return str(parsed) if parsed is not None and str(parsed) == value.lower() else None

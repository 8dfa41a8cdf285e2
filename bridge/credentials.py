"""Find the Kratos credential in a request, the way Kratos itself does.

Kratos (``session/manager_http.go``) takes the ``X-Session-Token`` header first,
then the session cookie, then ``Authorization: Bearer``; a cookie it cannot
decode is passed over for the bearer token. We follow that order, forward the
one credential we pick byte-exact, and reject values whose shape rules out a
real Kratos credential before Kratos is asked, so that a flood of garbage
does not become a flood of Kratos calls.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from bridge.errors import CredentialMissing, SessionInvalid

# Session tokens are "ory_st_" + 32 alphanumerics (x/token_prefixes.go); tokens
# from before v1.0 have no prefix. The length range leaves room for change.
_TOKEN = re.compile(r"(?:ory_st_)?[A-Za-z0-9]{16,128}")
# The cookie is gorilla/securecookie: base64url("<unix time>|<base64url payload>|<HMAC>").
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_COOKIE_PAYLOAD = re.compile(rb"[0-9]{1,20}\|[A-Za-z0-9_-]+={0,2}\|.{16,64}", re.DOTALL)
_MAX_COOKIE_VALUE = 4096
# What Go's net/http accepts inside a cookie value; anything else makes it skip the cookie.
_GO_COOKIE_VALUE = re.compile(r"[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")


class HeaderSource(Protocol):
    def get(self, key: str) -> str | None: ...


class Kind(Enum):
    TOKEN = "token"  # noqa: S105 - a kind of credential, not a password
    COOKIE = "cookie"
    BEARER = "bearer"


@dataclass(frozen=True, slots=True)
class Credential:
    """One credential as it will be sent to Kratos. Never logged, never stored."""

    kind: Kind
    value: str

    def __repr__(self) -> str:
        return f"Credential({self.kind.value}, <redacted>)"

    def headers(self, cookie_name: str) -> dict[str, str]:
        """The request headers that present this credential to ``/sessions/whoami``."""
        if self.kind is Kind.COOKIE:
            return {"Cookie": f"{cookie_name}={self.value}"}
        if self.kind is Kind.BEARER:
            return {"Authorization": f"Bearer {self.value}"}
        return {"X-Session-Token": self.value}

    def fingerprint(self, secret: bytes) -> str:
        """A short stable key for this credential: HMAC-SHA256 under the bridge secret."""
        message = self.kind.value.encode() + b"\x00" + self.value.encode("utf-8", "surrogateescape")
        digest = hmac.digest(secret, message, "sha256")
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def extract(headers: HeaderSource, cookie_name: str) -> Credential:
    """Pick the credential Kratos would use, or raise ``CredentialMissing``/``SessionInvalid``."""
    malformed = False

    token = headers.get("X-Session-Token")
    if token:
        if _TOKEN.fullmatch(token):
            return Credential(Kind.TOKEN, token)
        raise SessionInvalid("the session token is malformed")

    cookie = _first_cookie(headers.get("Cookie") or "", cookie_name)
    if cookie is not None:
        if _plausible_cookie(cookie):
            return Credential(Kind.COOKIE, cookie)
        malformed = True

    authorization = headers.get("Authorization") or ""
    scheme, _, bearer = authorization.partition(" ")
    if scheme.lower() == "bearer" and bearer:
        if _TOKEN.fullmatch(bearer):
            return Credential(Kind.BEARER, bearer)
        malformed = True

    if malformed:
        raise SessionInvalid("the session credential is malformed")
    raise CredentialMissing("no session cookie or token")


def _first_cookie(header: str, name: str) -> str | None:
    """The first cookie called ``name`` that Go's cookie parser would keep, unquoted."""
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if not sep or key != name:
            continue
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if _GO_COOKIE_VALUE.fullmatch(value):
            return value
    return None


def _plausible_cookie(value: str) -> bool:
    if not value or len(value) > _MAX_COOKIE_VALUE or not _COOKIE_VALUE.fullmatch(value):
        return False
    try:
        payload = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return False
    return _COOKIE_PAYLOAD.fullmatch(payload) is not None

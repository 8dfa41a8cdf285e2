"""Find the Kratos credential in a request, the way Kratos itself does.

Kratos (``session/manager_http.go``) takes the ``X-Session-Token`` header first,
then the session cookie, then ``Authorization: Bearer``. Of several cookies
with the session cookie's name it uses the first one it can decode, so we send
Kratos all of them that could be Kratos cookies, in order and byte-exact. A
request whose session cookies are all undecodable is not rescued by a bearer
token: Kratos answers that with an error, and so do we (401).

Values whose shape rules out a Kratos credential are refused before Kratos is
asked, so that random garbage does not become Kratos calls. Where the bridge is
stricter than Kratos: an ``X-Session-Token`` or ``Authorization`` header sent twice
is refused (Kratos takes the first). Where it is kinder: a valid ``X-Session-Token``
beside a malformed session cookie is answered from the token, which Kratos ranks
first (Kratos v1.3.1 answers that pair with a 500 of its own).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from bridge.errors import CredentialMissing, SessionInvalid
from bridge.web.request import declare_read

# Session tokens are "ory_st_" + 32 alphanumerics (x/token_prefixes.go); tokens
# from before v1.0 have no prefix. The length range leaves room for change.
_TOKEN = re.compile(r"(?:ory_st_)?[A-Za-z0-9]{16,128}")
# The cookie is gorilla/securecookie: base64url("<unix time>|<base64url payload>|<HMAC>").
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_COOKIE_PAYLOAD = re.compile(rb"[0-9]{1,20}\|[A-Za-z0-9_-]+={0,2}\|.{16,64}", re.DOTALL)
_MAX_COOKIE_VALUE = 4096
# What Go's net/http accepts inside a cookie value; it skips cookies with anything else.
_GO_COOKIE_VALUE = re.compile(r"[\x20\x21\x23-\x3a\x3c-\x5b\x5d-\x7e]*")
CREDENTIAL_HEADERS = declare_read("x-session-token", "cookie", "authorization")


class HeaderSource(Protocol):
    """Request headers by lower-case name (``bridge.web.request.HeaderView``)."""

    def get(self, name: str) -> str | None: ...

    def get_all(self, name: str) -> list[str]: ...


class Kind(Enum):
    TOKEN = "token"  # noqa: S105 - a kind of credential, not a password
    COOKIE = "cookie"
    BEARER = "bearer"


@dataclass(frozen=True, slots=True)
class Credential:
    """What will be sent to Kratos: a token, or the session cookies. Never logged or stored."""

    kind: Kind
    values: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Credential({self.kind.value}, <redacted>)"

    def headers(self, cookie_name: str) -> dict[str, str]:
        """The request headers that present this credential to ``/sessions/whoami``."""
        if self.kind is Kind.COOKIE:
            return {"Cookie": "; ".join(f"{cookie_name}={value}" for value in self.values)}
        if self.kind is Kind.BEARER:
            return {"Authorization": f"Bearer {self.values[0]}"}
        return {"X-Session-Token": self.values[0]}


class Fingerprints:
    """Short stable keys for credentials: HMAC-SHA256 under the bridge secret.

    The keyed state is built once and copied per credential. The one-shot
    ``hmac.digest`` releases the GIL around a microsecond of work, and under a
    threaded server getting it back measured as the single largest cost of a warm
    request (py-spy: 35% of samples).
    """

    def __init__(self, secret: bytes) -> None:
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)

    def of(self, credential: Credential) -> str:
        parts = (credential.kind.value, *credential.values)
        mac = self._keyed.copy()
        mac.update("\x00".join(parts).encode("utf-8", "surrogateescape"))
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")


def extract(headers: HeaderSource, cookie_name: str) -> Credential:
    """Pick the credential Kratos would use, or raise ``CredentialMissing``/``SessionInvalid``."""
    token = _only(headers, "x-session-token")
    if token:
        if _TOKEN.fullmatch(token):
            return Credential(Kind.TOKEN, (token,))
        raise SessionInvalid("the session token is malformed")

    # Go reads every Cookie line (HTTP/2 sends one per cookie) as one list.
    cookies = _session_cookies("; ".join(headers.get_all("cookie")), cookie_name)
    if cookies:
        plausible = tuple(v for v in cookies if _plausible_cookie(v))
        if plausible:
            return Credential(Kind.COOKIE, plausible)
        raise SessionInvalid("the session cookie is malformed")

    scheme, _, bearer = (_only(headers, "authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and bearer:
        if _TOKEN.fullmatch(bearer):
            return Credential(Kind.BEARER, (bearer,))
        raise SessionInvalid("the bearer token is malformed")
    raise CredentialMissing("no session cookie or token")


def _only(headers: HeaderSource, name: str) -> str | None:
    """A credential header sent more than once is refused. Kratos takes the first; a
    proxy or client that repeats it is confused, and guessing which one is meant is
    how one user's request gets answered as another's."""
    values = headers.get_all(name)
    if len(values) > 1:
        raise SessionInvalid(f"the {name} header is repeated")
    return values[0] if values else None


def _session_cookies(header: str, name: str) -> list[str]:
    """Values of the cookies called ``name`` that Go's cookie parser keeps, unquoted, in order
    (Go trims each ``;``-separated part and the name, and reads ``name`` alone as empty)."""
    values = []
    for part in header.split(";"):
        key, _, value = part.strip(" \t").partition("=")
        if key.strip(" \t") != name:
            continue
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if _GO_COOKIE_VALUE.fullmatch(value):
            values.append(value)
    return values


def _plausible_cookie(value: str) -> bool:
    if not value or len(value) > _MAX_COOKIE_VALUE or not _COOKIE_VALUE.fullmatch(value):
        return False
    try:
        payload = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return False
    return _COOKIE_PAYLOAD.fullmatch(payload) is not None

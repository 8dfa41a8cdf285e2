"""``flask.session`` backed by the Kratos session the proxy vouched for.

A Flask extension for apps behind the bridge::

    from bridge.flask import KratosSession, current_identity, csrf_protect, require_aal2

    app = Flask(__name__)
    app.config.update(
        KRATOS_SESSION_REDIS_URL="redis://redis:6379/0",
        KRATOS_SESSION_TRUST="jwt",
        KRATOS_SESSION_JWKS_URL="http://bridge:4480/.well-known/jwks.json",
        KRATOS_SESSION_LOGIN_URL="https://auth.example.com/self-service/login/browser",
    )
    KratosSession(app)

    @app.post("/cart")
    @csrf_protect
    def add_to_cart():
        session["cart"] = [*session.get("cart", []), request.form["sku"]]
        return {"user": current_identity.id, "cart": session["cart"]}

``flask.session`` is the app-owned section of the current Kratos session (the
``p{sid}:app`` hash the bridge mirrors, through ``bridge.client.SessionClient``): what a
view stores there is seen by every process of every app sharing the bridge's Redis,
expires with the Kratos session, and is gone when Kratos revokes it. The extension sets
no cookie of its own: the session id comes from the proxy's hand-off, never from the
browser.

**Trust.** The session id is believed only when the proxy vouched for it
(``KRATOS_SESSION_TRUST``):

- ``jwt``: the bridge's signed JWT (``BRIDGE_JWT_HEADER``), verified against the bridge's
  JWKS: ES256 only, ``exp``, ``iss``, and ``aud``, which must be this app's own
  (``KRATOS_SESSION_JWT_AUDIENCE``, required: without it a token the bridge handed to
  any other app behind it would do here too); the session is its ``sid`` claim, and the
  mirrored session must belong to its ``sub``. The JWKS is cached for 60 s (the bridge
  serves it with ``max-age=60`` and publishes a new key 90 s before it signs with it) and
  fetched again for an unknown ``kid``, at most once per 10 s.
- ``header``: the proxy adds a shared secret header (``X-Bridge-Secret``), compared in
  constant time; then the session id is ``X-Session-Id``. The proxy must also overwrite
  a client's ``X-Session-Id`` (the shipped configs do).
- ``none``: ``X-Session-Id`` is believed from anyone. Only with ``app.testing`` or
  ``app.debug``, and logged as a warning at start-up.

``init_app`` raises ``RuntimeError`` naming the setting when the mode, or what it needs,
is missing.

**What a request gets.**

- With a valid hand-off to a live session: ``flask.session`` is a dict of the app fields.
  Only what the request changed is written back, field by field, after the view: keys it
  set (``session[k] = v``, ``update``, ``setdefault``), keys it removed (``del``, ``pop``,
  ``clear``), and values read from the store and changed in place
  (``session["cart"].append(x)``: no ``session.modified = True`` needed). Fields other
  requests changed meanwhile are left alone; two writers of one field: the last one wins
  (there is no atomic increment). ``session.clear()`` removes the fields this request
  saw. Names are 1-128 of ``A-Z a-z 0-9 _ . : -``, values plain JSON (str, int, float,
  bool, None, list, dict; a tuple is stored as a list, so ``flask.flash`` works); anything
  else fails the save (below).
- Without a hand-off, with one that is not valid, or for a session that has ended:
  ``flask.session`` is empty and storing anything in it raises ``SessionMissing`` at once
  (so ``flask.flash`` needs a session too); ``current_identity`` is None.
- When the hand-off cannot be checked (the JWKS cannot be fetched) or the store cannot
  be read: ``503`` JSON ``{"error": "session_unavailable"}`` before any view runs. A
  request without a hand-off needs neither and is served.

**Saving** happens after the view, when the response is already made:

- The session ended meanwhile (revoked, logged out, expired): nothing is written, and
  one error line names the fields that were dropped. The response goes out as the view
  made it: the write is as lost as if it had landed a moment before the end, when the
  bridge deletes the session's data. The next request is refused by the proxy.
- A write past ``KRATOS_SESSION_MAX_BYTES``, a value that is not plain JSON, or Redis
  unavailable: the save raises, so the client gets Flask's ``500`` (the traceback is only
  in the server's log) rather than a page saying that something was kept.

**Helpers.** ``current_identity`` (``id``, ``traits``, ``schema_id``, ``aal``,
``authentication_methods``, ``authenticated_at``, ``session_id``; test it with
``if current_identity:``, as it is a proxy), ``require_aal2``,
``require_recent_login(max_age)``, ``csrf_token()`` (also a Jinja global) and
``csrf_protect``. A refused browser navigation is sent to ``KRATOS_SESSION_LOGIN_URL``
(``aal=aal2`` or ``refresh=true``, ``return_to`` the request URL: behind a proxy, use
``werkzeug.middleware.proxy_fix.ProxyFix`` so that it is the URL the browser asked for);
an API call gets ``401`` JSON as the bridge gives it. Pair them with the bridge's rules
(``aal2``, ``max_age``) on the same paths: the bridge asks Kratos again when a session
falls short, so the mirror these read is current right after a step-up or a new login.

**Ended sessions.** ``session_ended`` (a blinker signal, as Flask's own) is sent for
each session that ends (revoked, logged out, expired, idle, refused by Kratos) with the
app as sender and ``ended``, a ``bridge.client.EndedSession``, e.g. to close a stream::

    @session_ended.connect_via(app)
    def close_streams(app, ended):
        streams.close_all_of(ended.session_id)

A thread of the extension's follows the bridge's ended stream (``SessionClient.
follow_ended``, every event to every app process), started at the first request after a
receiver was connected; receivers run on it, without an app or request context, so they
must be quick. A receiver that raises is logged and the others still run; Redis
unavailable pauses the thread, which then resumes where it stopped.

**Settings** (Flask config; numbers may be given as strings, as from the environment):

- ``KRATOS_SESSION_REDIS_URL`` (required): the bridge's Redis, in any ``BRIDGE_REDIS_URL``
  form.
- ``KRATOS_SESSION_KEY_PREFIX`` (``bridge:``): the bridge's ``BRIDGE_KEY_PREFIX``.
- ``KRATOS_SESSION_MAX_BYTES`` (``65536``): cap on a session's app data; the bridge's
  ``BRIDGE_APP_DATA_MAX_BYTES``, the same for every writer.
- ``KRATOS_SESSION_REDIS_TIMEOUT`` (``0.5``): seconds to wait for one Redis command.
- ``KRATOS_SESSION_REDIS_SENTINEL_PASSWORD`` (unset): as ``BRIDGE_REDIS_SENTINEL_PASSWORD``.
- ``KRATOS_SESSION_TRUST`` (required): ``jwt``, ``header``, or ``none`` (testing/debug only).
- ``KRATOS_SESSION_JWKS_URL`` (required for ``jwt``): the bridge's
  ``/.well-known/jwks.json``, e.g. ``http://bridge:4480/.well-known/jwks.json``.
- ``KRATOS_SESSION_JWT_HEADER`` (``X-Bridge-Jwt``): ``BRIDGE_JWT_HEADER``; with
  ``Authorization``, the value is ``Bearer <jwt>``.
- ``KRATOS_SESSION_JWT_ISSUER`` (``kratos-session-bridge``): ``BRIDGE_JWT_ISSUER``.
- ``KRATOS_SESSION_JWT_AUDIENCE`` (required for ``jwt``): this app's audience, the
  ``jwt_audience`` of the bridge's rules for its routes (or ``BRIDGE_JWT_AUDIENCE``); a
  token without it in ``aud`` is refused.
- ``KRATOS_SESSION_SHARED_SECRET`` (required for ``header``): the secret the proxy sends,
  16 characters or more.
- ``KRATOS_SESSION_SHARED_SECRET_FILE`` (unset): a file holding it (trailing newline
  ignored); wins over ``KRATOS_SESSION_SHARED_SECRET``.
- ``KRATOS_SESSION_SECRET_HEADER`` (``X-Bridge-Secret``): the header carrying the secret.
- ``KRATOS_SESSION_ID_HEADER`` (``X-Session-Id``): the header carrying the session id
  (``header`` and ``none``).
- ``KRATOS_SESSION_LOGIN_URL`` (unset): Kratos's browser login
  (``.../self-service/login/browser``); unset, refused browsers get ``401`` JSON too.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

import flask
import jwt
import orjson
from blinker import Namespace
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.local import LocalProxy
from werkzeug.wrappers import Response as BaseResponse

from bridge.client import (
    DEFAULT_MAX_BYTES,
    EndedSession,
    SessionClient,
    UnifiedSession,
    csrf_valid,
)
from bridge.errors import SessionEnded, StoreUnavailable
from bridge.logs import Throttled
from bridge.pipeline.dialects import is_navigation, redirect_status
from bridge.pipeline.redirects import MAX_REDIRECT, with_query
from bridge.store.redis.url import parse_redis_url
from bridge.web.request import HeaderView

log = logging.getLogger(__name__)
_refusals = Throttled(log)

EXTENSION = "kratos_session"
_UNAVAILABLE = "bridge.flask.session_unavailable"  # request.environ key: open_session saw it
PREFIX = "KRATOS_SESSION_"
TRUST_MODES = ("jwt", "header", "none")
JWT_ALGORITHM = "ES256"
JWKS_LIFESPAN_S = 60.0
"""The bridge serves its JWKS with ``max-age=60``."""
JWKS_TIMEOUT_S = 2.0
JWKS_REFETCH_COOLDOWN_S = 10.0
"""At most one fetch per this many seconds for a ``kid`` the cached JWKS lacks, so that
tokens with made-up ``kid`` values cannot turn into a stream of JWKS fetches."""
JWKS_STALE_S = 600.0  # how long a fetched key is trusted while the bridge cannot be asked
JWKS_RETRY_S = 5.0  # between attempts to fetch the JWKS once it failed
JWT_LEEWAY_S = 5.0
"""Clock difference allowed between the bridge's host and the app's (``exp``, ``iat``)."""
MIN_SECRET_LENGTH = 16
SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE"))
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_SESSION_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
_RANK = {"aal0": 0, "aal1": 1, "aal2": 2, "aal3": 3}


session_ended = Namespace().signal("kratos-session-ended")
"""Sent with the app and ``ended`` (an ``EndedSession``) for each session that ends."""
_FOLLOW_RETRY_S = 1.0


class SessionMissing(RuntimeError):
    """A view stored something in ``flask.session`` on a request without a Kratos session."""

    def __init__(self) -> None:
        super().__init__(
            "flask.session cannot store anything: this request has no Kratos session (no "
            "valid hand-off from the proxy, or the session has ended); check "
            "current_identity before writing, or protect the view"
        )


class HandOffUnverifiable(Exception):
    """The proxy's hand-off could not be checked (the JWKS could not be fetched)."""


@dataclass(frozen=True, slots=True)
class ExtensionSettings:
    """The extension's settings, read and checked once by ``init_app``."""

    trust: str
    redis_url: str | None
    key_prefix: str
    max_bytes: int
    redis_timeout: float
    sentinel_password: str | None
    jwks_url: str | None
    jwt_header: str
    jwt_issuer: str
    jwt_audience: str | None
    shared_secret: bytes | None
    secret_header: str
    session_id_header: str
    login_url: str | None


def read_settings(
    config: Mapping[str, Any], *, needs_redis: bool, trusted_env: bool
) -> ExtensionSettings:
    """The ``KRATOS_SESSION_*`` keys of ``config``; ``RuntimeError`` naming the key that is
    missing or wrong. ``trusted_env``: the app runs under ``testing`` or ``debug``."""

    def text(name: str, default: str | None = None) -> str | None:
        value = config.get(PREFIX + name)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            raise RuntimeError(f"{PREFIX}{name}: {value!r} is not a string")
        return value

    def number(name: str, default: float, kind: type) -> Any:
        value = config.get(PREFIX + name, default)
        try:
            parsed = kind(value)
        except (TypeError, ValueError):
            parsed = None
        if parsed is None or isinstance(value, bool) or not parsed > 0:
            raise RuntimeError(f"{PREFIX}{name}: {value!r} is not a positive number")
        return parsed

    def header(name: str, default: str) -> str:
        value = text(name, default)
        assert value is not None
        if not _HEADER_NAME.fullmatch(value):
            raise RuntimeError(f"{PREFIX}{name}: {value!r} is not a header name")
        return value

    trust = text("TRUST")
    if trust is None:
        raise RuntimeError(
            f"{PREFIX}TRUST is not set: the extension must know how the proxy vouches for a "
            f"session id. Set it to 'jwt' (with {PREFIX}JWKS_URL) or 'header' (with "
            f"{PREFIX}SHARED_SECRET or {PREFIX}SHARED_SECRET_FILE)"
        )
    trust = trust.lower()
    if trust not in TRUST_MODES:
        raise RuntimeError(f"{PREFIX}TRUST: {trust!r} is not one of {', '.join(TRUST_MODES)}")
    if trust == "none" and not trusted_env:
        raise RuntimeError(
            f"{PREFIX}TRUST: 'none' believes any client's session id; it is only allowed "
            "with app.testing or app.debug. Use 'jwt' or 'header'"
        )

    jwks_url = text("JWKS_URL")
    if trust == "jwt":
        if jwks_url is None:
            raise RuntimeError(
                f"{PREFIX}JWKS_URL is not set: trust 'jwt' verifies the bridge's JWT against "
                "its JWKS, e.g. http://bridge:4480/.well-known/jwks.json"
            )
        parts = urlsplit(jwks_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RuntimeError(f"{PREFIX}JWKS_URL: {jwks_url!r} is not an http(s) URL")
        if text("JWT_AUDIENCE") is None:
            raise RuntimeError(
                f"{PREFIX}JWT_AUDIENCE is not set: trust 'jwt' needs this app's own audience, "
                "or a token the bridge handed to another app would do here too. Give this "
                "app's routes `jwt_audience: <name>` in the bridge's rules file (or set "
                "BRIDGE_JWT_AUDIENCE) and the same name here"
            )

    secret = None
    if trust == "header":
        secret = _shared_secret(text("SHARED_SECRET"), text("SHARED_SECRET_FILE"))
        if secret is None:
            raise RuntimeError(
                f"{PREFIX}SHARED_SECRET (or {PREFIX}SHARED_SECRET_FILE) is not set: trust "
                "'header' believes a session id only next to the secret the proxy adds"
            )

    redis_url = text("REDIS_URL")
    if needs_redis and redis_url is None:
        raise RuntimeError(
            f"{PREFIX}REDIS_URL is not set: the sessions are in the bridge's Redis "
            "(the same URL as BRIDGE_REDIS_URL)"
        )
    if redis_url is not None:
        try:
            parse_redis_url(redis_url)
        except ValueError as error:  # its messages never quote a password
            raise RuntimeError(f"{PREFIX}REDIS_URL: {error}") from None
    login_url = text("LOGIN_URL")
    if login_url is not None and urlsplit(login_url).scheme not in ("http", "https"):
        raise RuntimeError(f"{PREFIX}LOGIN_URL: {login_url!r} is not an http(s) URL")

    return ExtensionSettings(
        trust=trust,
        redis_url=redis_url,
        key_prefix=text("KEY_PREFIX", "bridge:") or "bridge:",
        max_bytes=number("MAX_BYTES", DEFAULT_MAX_BYTES, int),
        redis_timeout=number("REDIS_TIMEOUT", 0.5, float),
        sentinel_password=text("REDIS_SENTINEL_PASSWORD"),
        jwks_url=jwks_url,
        jwt_header=header("JWT_HEADER", "X-Bridge-Jwt"),
        jwt_issuer=text("JWT_ISSUER", "kratos-session-bridge") or "kratos-session-bridge",
        jwt_audience=text("JWT_AUDIENCE"),
        shared_secret=secret,
        secret_header=header("SECRET_HEADER", "X-Bridge-Secret"),
        session_id_header=header("ID_HEADER", "X-Session-Id"),
        login_url=login_url,
    )


def _shared_secret(value: str | None, file: str | None) -> bytes | None:
    if file is not None:
        try:
            value = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as error:
            problem = getattr(error, "strerror", None) or "not UTF-8 text"
            raise RuntimeError(
                f"{PREFIX}SHARED_SECRET_FILE: cannot read {file} ({problem})"
            ) from None
    if value is None:
        return None
    if len(value) < MIN_SECRET_LENGTH:
        raise RuntimeError(
            f"{PREFIX}SHARED_SECRET: shorter than {MIN_SECRET_LENGTH} characters; use a "
            "random value (e.g. openssl rand -hex 32)"
        )
    return value.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Claim:
    """What the hand-off says: the session, and whose it must be when the hand-off names it."""

    session_id: str
    identity_id: str | None = None


class HeaderSource(Protocol):
    """The request headers a hand-off reads: werkzeug's ``Headers`` or a plain mapping."""

    def get(self, key: str, /) -> str | None: ...


class HandOff(Protocol):
    """One way the proxy vouches for a session: ``claim`` gives the session the request
    may use, ``None`` when it has none (or a hand-off that is not valid), and raises
    ``HandOffUnverifiable`` when it cannot tell."""

    def claim(self, headers: HeaderSource) -> Claim | None: ...


class JwtHandOff:
    """The bridge's JWT, verified against its JWKS."""

    def __init__(self, settings: ExtensionSettings) -> None:
        assert settings.jwks_url is not None and settings.jwt_audience is not None
        self._header = settings.jwt_header
        self._bearer = settings.jwt_header.lower() == "authorization"
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._keys = jwt.PyJWKClient(
            settings.jwks_url,
            cache_jwk_set=True,
            lifespan=JWKS_LIFESPAN_S,
            timeout=JWKS_TIMEOUT_S,
            cooldown_duration=JWKS_REFETCH_COOLDOWN_S,
        )
        # Keys fetched before, by kid, with when: used while the bridge cannot be asked.
        self._known: dict[str, tuple[Any, float]] = {}
        self._retry_fetch_at = 0.0

    def claim(self, headers: HeaderSource) -> Claim | None:
        token = headers.get(self._header) or ""
        if self._bearer:
            scheme, _, token = token.partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
        if not token:
            return None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            _refused("a JWT that cannot be read")
            return None
        kid = header.get("kid")
        if header.get("alg") != JWT_ALGORITHM or not isinstance(kid, str):
            _refused(f"a JWT that is not {JWT_ALGORITHM} with a kid")
            return None
        try:
            key = self._signing_key(kid)
        except (jwt.PyJWKClientError, jwt.PyJWKSetError):
            _refused("a JWT signed by a key the bridge does not publish")
            return None
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[JWT_ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                leeway=JWT_LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub", "sid"]},
            )
        except jwt.PyJWTError as error:
            _refused(f"a JWT that is not valid ({type(error).__name__})")
            return None
        session_id, subject = claims["sid"], claims["sub"]
        if not (isinstance(session_id, str) and _SESSION_ID.fullmatch(session_id)):
            _refused("a JWT whose sid is not a session id")
            return None
        if not isinstance(subject, str):
            _refused("a JWT whose sub is not an identity id")
            return None
        return Claim(session_id, subject)

    def _signing_key(self, kid: str) -> Any:
        """The key from the bridge's JWKS; while the JWKS cannot be fetched, a key fetched
        in the last ``JWKS_STALE_S`` (and no new attempt for ``JWKS_RETRY_S``, so that
        requests do not each wait for a bridge that is down)."""
        now = time.monotonic()
        known = self._known.get(kid)
        usable = known[0] if known is not None and now - known[1] < JWKS_STALE_S else None
        if usable is not None and now < self._retry_fetch_at:
            return usable
        try:
            key = self._keys.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as error:
            self._retry_fetch_at = now + JWKS_RETRY_S
            if usable is not None:
                return usable
            _refusals.warning("the bridge's JWKS could not be fetched (%s)", type(error).__name__)
            raise HandOffUnverifiable("the bridge's JWKS could not be fetched") from None
        self._known[kid] = (key, now)
        return key


class HeaderHandOff:
    """A secret the proxy adds, then the session id header it sets."""

    def __init__(self, settings: ExtensionSettings) -> None:
        assert settings.shared_secret is not None
        self._secret = settings.shared_secret
        self._secret_header = settings.secret_header
        self._id_header = settings.session_id_header

    def claim(self, headers: HeaderSource) -> Claim | None:
        session_id = headers.get(self._id_header) or ""
        presented = headers.get(self._secret_header)
        # WSGI header values are Latin-1 decoded bytes; encoded back, they are the bytes sent.
        vouched = presented is not None and hmac.compare_digest(
            presented.encode("latin-1", "replace"), self._secret
        )
        if vouched:
            return _session_id_claim(session_id, self._id_header)
        if not session_id:
            return None  # no session claimed (a health check, say): nothing to refuse
        _refused(f"a session id without a valid {self._secret_header}")
        return None


class UnverifiedHandOff:
    """``KRATOS_SESSION_TRUST = "none"``: the session id header, from whoever sent it."""

    def __init__(self, settings: ExtensionSettings) -> None:
        self._id_header = settings.session_id_header

    def claim(self, headers: HeaderSource) -> Claim | None:
        return _session_id_claim(headers.get(self._id_header) or "", self._id_header)


def _session_id_claim(session_id: str, header: str) -> Claim | None:
    if not session_id:
        return None  # the proxy vouched for a request without a session (a public route)
    if not _SESSION_ID.fullmatch(session_id):
        _refused(f"a {header} that is not a session id")
        return None
    return Claim(session_id)


def _refused(why: str) -> None:
    # Why only: never the token or the session id, which a log must not hand to its readers.
    _refusals.warning("no session for a request with %s", why)


def _build_hand_off(settings: ExtensionSettings) -> HandOff:
    if settings.trust == "jwt":
        return JwtHandOff(settings)
    if settings.trust == "header":
        return HeaderHandOff(settings)
    log.warning(
        "%sTRUST is 'none': the session id in %s is believed from ANY client. For tests and "
        "local development only; never expose this app",
        PREFIX,
        settings.session_id_header,
    )
    return UnverifiedHandOff(settings)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the request's session belongs to, as ``current_identity`` gives it."""

    id: str
    traits: dict[str, Any]  # a copy: changing it changes nothing
    schema_id: str | None
    aal: str
    authentication_methods: tuple[str, ...]  # method names, first use first
    authenticated_at: datetime | None
    session_id: str

    @classmethod
    def of(cls, session: UnifiedSession) -> Identity:
        methods = (method.get("method") for method in session.authentication_methods)
        return cls(
            id=session.identity["id"],
            traits=_plain(session.identity.get("traits") or {}),
            schema_id=session.identity.get("schema_id"),
            aal=session.aal,
            authentication_methods=tuple(dict.fromkeys(m for m in methods if isinstance(m, str))),
            authenticated_at=_moment(session.authenticated_at),
            session_id=session.session_id,
        )


def _plain(value: Any) -> Any:
    """A read-only JSON value (the client's mappings and tuples) as dicts and lists again,
    so that a view can hand it to ``jsonify`` or ``tojson``; a copy, changing it changes
    nothing."""
    if isinstance(value, Mapping):
        return {name: _plain(item) for name, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


class AppSession(dict, SessionMixin):
    """The app fields of a live Kratos session, tracking what the request changes."""

    new = False

    def __init__(self, kratos: UnifiedSession) -> None:
        super().__init__(kratos.app)
        self.kratos = kratos
        self.identity = Identity.of(kratos)
        self.modified = False
        self._set: set[str] = set()
        self._removed: set[str] = set()
        # Containers as stored, to find the ones a view changed in place.
        self._loaded = {
            name: _snapshot(value) for name, value in self.items() if isinstance(value, dict | list)
        }

    @property
    def permanent(self) -> bool:
        """Always: the session lives as long as Kratos says (setting this changes nothing)."""
        return True

    @permanent.setter
    def permanent(self, value: bool) -> None:
        pass

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        self._set.add(name)
        self._removed.discard(name)
        self.modified = True

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._forget(name)

    # |= takes what update() takes, | only a dict: typeshed's dict.__ior__ needs the same ignore.
    def __ior__(self, other: Any) -> AppSession:  # type: ignore[misc]
        self.update(other)
        return self

    def update(self, other: Any = (), /, **more: Any) -> None:
        for name, value in dict(other, **more).items():
            self[name] = value

    def setdefault(self, name: str, default: Any = None) -> Any:
        if name not in self:
            self[name] = default
        return self[name]

    def pop(self, name: str, *default: Any) -> Any:
        if name not in self:
            return super().pop(name, *default)
        value = super().pop(name)
        self._forget(name)
        return value

    def popitem(self) -> tuple[str, Any]:
        name, value = super().popitem()
        self._forget(name)
        return name, value

    def clear(self) -> None:
        for name in self:
            self._forget(name)
        super().clear()

    def _forget(self, name: str) -> None:
        self._set.discard(name)
        self._removed.add(name)
        self.modified = True

    def take_changes(self) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The fields to set and the names to delete, once: a second call gives none."""
        names = set(self._set)
        for name, stored in self._loaded.items():
            if name in self and name not in names and _snapshot(self[name]) != stored:
                names.add(name)
        values = {name: _json_lists(self[name]) for name in self if name in names}
        removed = tuple(sorted(self._removed))
        self._set, self._removed, self._loaded = set(), set(), {}
        return values, removed


def _json_lists(value: Any) -> Any:
    """Tuples as the lists JSON stores them as (``flask.flash`` keeps tuples)."""
    if isinstance(value, tuple | list):
        return [_json_lists(item) for item in value]
    if isinstance(value, dict):
        return {name: _json_lists(item) for name, item in value.items()}
    return value


def _snapshot(value: Any) -> bytes | None:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError: then it is a change the save must refuse
        return None


class NoSession(dict, SessionMixin):
    """``flask.session`` of a request without a Kratos session: always empty; anything
    that would store a value raises ``SessionMissing``, the rest acts as on ``{}``."""

    kratos = None
    identity = None
    modified = False
    new = False

    @property
    def permanent(self) -> bool:
        return False

    @permanent.setter
    def permanent(self, value: bool) -> None:
        pass

    def __setitem__(self, name: str, value: Any) -> None:
        raise SessionMissing()

    # |= takes what update() takes, | only a dict: typeshed's dict.__ior__ needs the same ignore.
    def __ior__(self, other: Any) -> NoSession:  # type: ignore[misc]
        self.update(other)
        return self

    def update(self, other: Any = (), /, **more: Any) -> None:
        if dict(other, **more):
            raise SessionMissing()

    def setdefault(self, name: str, default: Any = None) -> Any:
        raise SessionMissing()


class KratosSessionInterface(SessionInterface):
    """Opens ``flask.session`` from the proxy's hand-off; saves what the view changed."""

    # Flask types this by its default, NullSession; any SessionMixin serves (it is only made).
    null_session_class = NoSession  # type: ignore[assignment]
    pickle_based = False

    def __init__(self, client: SessionClient, hand_off: HandOff) -> None:
        self.client = client
        self.hand_off = hand_off

    def open_session(self, app: flask.Flask, request: flask.Request) -> AppSession | NoSession:
        try:
            claim = self.hand_off.claim(request.headers)
            if claim is None:
                return NoSession()
            kratos = self.client.session(claim.session_id)
        except (HandOffUnverifiable, StoreUnavailable) as error:
            _refusals.warning("session unavailable for a request (%s)", type(error).__name__)
            request.environ[_UNAVAILABLE] = True
            return NoSession()
        if kratos is None:
            return NoSession()  # ended (expired, revoked, logged out) or never mirrored
        if claim.identity_id is not None and kratos.identity.get("id") != claim.identity_id:
            _refused("a JWT whose sub is not the session's identity")
            return NoSession()
        return AppSession(kratos)

    def save_session(
        self, app: flask.Flask, session: SessionMixin, response: flask.Response
    ) -> None:
        if not isinstance(session, AppSession):
            return
        if session.accessed:
            # The session follows the browser's Kratos cookie: shared caches must not mix users.
            response.vary.add("Cookie")
        values, removed = session.take_changes()
        try:
            if values or removed:
                self.client.update(session.kratos.session_id, values, removed)
        except SessionEnded:
            log.error(
                "flask.session: the Kratos session ended before this request's changes were "
                "saved; dropped field(s): %s",
                ", ".join(sorted({*values, *removed})),
            )


class KratosSession:
    """The extension: ``KratosSession(app)``, or ``KratosSession()`` then ``init_app(app)``.

    ``client``: a ``SessionClient`` to use instead of one made from
    ``KRATOS_SESSION_REDIS_URL`` (shared by every app this object initialises)."""

    def __init__(self, app: flask.Flask | None = None, *, client: SessionClient | None = None):
        self._client = client
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        settings = read_settings(
            app.config, needs_redis=self._client is None, trusted_env=app.testing or app.debug
        )
        hand_off = _build_hand_off(settings)
        client = self._client
        if client is None:
            try:
                client = SessionClient(
                    settings.redis_url,
                    settings.key_prefix,
                    max_bytes=settings.max_bytes,
                    timeout=settings.redis_timeout,
                    sentinel_password=settings.sentinel_password,
                )
            except ValueError as error:  # the URL was checked: what is left is the prefix
                raise RuntimeError(f"{PREFIX}KEY_PREFIX: {error}") from None
        if settings.login_url is None:
            log.warning(
                "%sLOGIN_URL is not set: refused browsers get 401 JSON, not a login page",
                PREFIX,
            )
        app.session_interface = KratosSessionInterface(client, hand_off)
        app.extensions[EXTENSION] = _State(settings, client, EndedFollower(app, client))
        app.before_request(_follow_ended)
        app.before_request(_refuse_when_unavailable)
        app.jinja_env.globals.setdefault("csrf_token", csrf_token)


class EndedFollower:
    """The thread that sends ``session_ended`` for one app, started once."""

    def __init__(self, app: flask.Flask, client: SessionClient) -> None:
        self._app = app
        self._client = client
        self._started = False
        self._starting = threading.Lock()

    def start_once(self) -> None:
        if self._started:  # the cheap check, on every request
            return
        with self._starting:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="kratos-session-ended", daemon=True).start()

    def _run(self) -> None:
        after: str | None = None
        while not self._client.closed:
            try:
                if after is None:
                    after = self._client.last_ended_id()
                for ended in self._client.follow_ended(after=after):
                    after = ended.entry_id
                    self._send(ended)
            except StoreUnavailable:
                time.sleep(_FOLLOW_RETRY_S)

    def _send(self, ended: EndedSession) -> None:
        for receiver in session_ended.receivers_for(self._app):
            try:
                receiver(self._app, ended=ended)
            except Exception:
                log.exception("a session_ended receiver failed")


@dataclass(frozen=True, slots=True)
class _State:
    settings: ExtensionSettings
    client: SessionClient
    ended: EndedFollower


def _follow_ended() -> None:
    if session_ended.receivers:
        flask.current_app.extensions[EXTENSION].ended.start_once()


def _refuse_when_unavailable() -> flask.Response | None:
    if flask.request.environ.get(_UNAVAILABLE):
        response = _json(503, "session_unavailable", "the session could not be read; try again")
        response.headers["Retry-After"] = "1"
        return response
    return None


def _current_session() -> AppSession | None:
    if not flask.has_request_context():
        return None
    session = flask.session._get_current_object()  # type: ignore[attr-defined]
    return session if isinstance(session, AppSession) else None


def _current_identity() -> Identity | None:
    session = _current_session()
    return session.identity if session is not None else None


current_identity: Identity | None = LocalProxy(_current_identity)  # type: ignore[assignment]
"""The request's ``Identity``, or a proxy to ``None``: test it with ``if current_identity:``."""


def csrf_token() -> str:
    """The session's CSRF token, for a form field ``csrf_token`` or the ``X-CSRF-Token``
    header; empty when the request has no session."""
    session = _current_session()
    return session.kratos.csrf_token if session is not None else ""


P = ParamSpec("P")
R = TypeVar("R")


def csrf_protect(view: Callable[P, R]) -> Callable[P, R | BaseResponse]:
    """Refuse a state-changing request (not GET, HEAD, OPTIONS, TRACE) whose ``X-CSRF-Token``
    header or form field ``csrf_token`` is not its session's token: ``403`` JSON
    ``{"error": "csrf_failed"}``. No session: refused too."""

    @wraps(view)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R | BaseResponse:
        request = flask.request
        if request.method not in SAFE_METHODS:
            token = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD)
            session = _current_session()
            if not csrf_valid(session.kratos if session is not None else None, token):
                return _json(403, "csrf_failed", "the CSRF token is missing or not this session's")
        return view(*args, **kwargs)

    return guarded


def require_aal2(view: Callable[P, R]) -> Callable[P, R | BaseResponse]:
    """Let only a session with a second factor through: a browser is sent to Kratos's login
    with ``aal=aal2``, an API call gets ``401`` ``aal2_required``."""

    @wraps(view)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R | BaseResponse:
        identity = _current_identity()
        if identity is None:
            return _session_missing()
        if _RANK.get(identity.aal, 0) < _RANK["aal2"]:
            return _refuse("aal2_required", "this page needs a second factor", aal="aal2")
        return view(*args, **kwargs)

    return guarded


def require_recent_login(
    max_age: timedelta | float,
) -> Callable[[Callable[P, R]], Callable[P, R | BaseResponse]]:
    """Let only a session whose last login is at most ``max_age`` old through: a browser is
    sent to log in again (``refresh=true``), an API call gets ``401``
    ``reauthentication_required``."""
    seconds = max_age.total_seconds() if isinstance(max_age, timedelta) else float(max_age)
    if not seconds > 0:
        raise ValueError(f"max_age must be positive, got {max_age!r}")
    limit = timedelta(seconds=seconds)

    def decorate(view: Callable[P, R]) -> Callable[P, R | BaseResponse]:
        @wraps(view)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R | BaseResponse:
            identity = _current_identity()
            if identity is None:
                return _session_missing()
            at = identity.authenticated_at
            if at is None or datetime.now(UTC) - at > limit:
                message = f"this page needs a login within the last {seconds:g} seconds"
                return _refuse("reauthentication_required", message, refresh="true")
            return view(*args, **kwargs)

        return guarded

    return decorate


def _session_missing() -> BaseResponse:
    return _refuse("session_missing", "this page needs a Kratos session")


def _refuse(code: str, message: str, **login_params: str) -> BaseResponse:
    """As the bridge refuses: a browser navigation is redirected to the login, anything
    else gets ``401`` JSON saying where a browser would go."""
    request = flask.request
    target = _login_url(request.url, **login_params)
    if target is not None and is_navigation(HeaderView.from_environ(request.environ)):
        response = flask.redirect(target, redirect_status(request.method))
        response.headers["Cache-Control"] = "no-store"
        return response
    return _json(401, code, message, target)


def _login_url(return_to: str, **params: str) -> str | None:
    login_url = flask.current_app.extensions[EXTENSION].settings.login_url
    if login_url is None:
        return None
    url = with_query(login_url, **params, return_to=return_to)
    return url if len(url) <= MAX_REDIRECT else with_query(login_url, **params)


def _json(
    status: int, code: str, message: str, redirect_browser_to: str | None = None
) -> flask.Response:
    body = {"error": code, "message": message}
    if redirect_browser_to is not None:
        body["redirect_browser_to"] = redirect_browser_to
    response = flask.current_app.response_class(
        orjson.dumps(body), status=status, mimetype="application/json"
    )
    response.headers["Cache-Control"] = "no-store"
    return response

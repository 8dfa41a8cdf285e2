"""An optional short-lived JWT for the upstream app: the session, signed, in one header.

Apps verify it against the bridge's ``/.well-known/jwks.json`` instead of trusting
plain headers. ES256 only, with keys from a directory (``BRIDGE_JWT_KEYS_DIR``):

- every ``*.pem`` file there is an EC P-256 private key (PKCS#8 or SEC1 PEM), and all
  of them are published; the ``kid`` is the key's RFC 7638 thumbprint, so every replica
  names a key the same way;
- the key whose file name sorts last signs, once its file is ``publish_before_signing_s``
  old (by its modification time, the same for every replica): until then it is only
  published, so that apps holding a cached JWKS (served with ``max-age=60``) know it
  before the first token it signs reaches them. Name files by date (``kratos-bridge
  jwt-keygen DIR`` writes ``YYYYmmddTHHMMSSZ.pem``): adding ``20261201.pem`` beside
  ``20261101.pem`` rotates to it about two minutes later, without a restart. A directory
  whose every key is that new (a first start) signs with the last one at once;
- a removed key stays published until the last token this process signed with it has
  expired. Replicas rescan at their own moments, so remove an old key no sooner than
  one rescan interval plus one token lifetime after its successor was added: until then
  another replica may still be signing with it.

Signing costs far more than a request should, so a token is minted once per session and
reused until a fifth of its lifetime is left or anything it says has changed.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.bounded import BoundedMap
from bridge.clock import parse_timestamp_ms
from bridge.errors import ConfigError
from bridge.sessions.session import MirroredSession, dig

log = logging.getLogger(__name__)

KEYS_DIR = "BRIDGE_JWT_KEYS_DIR"
ALGORITHM = "ES256"
REFRESH_AT = 0.8
"""Share of a token's lifetime after which a new one is minted for the session."""
MAX_CACHED_TOKENS = 50_000
PUBLISH_BEFORE_SIGNING_S = 90.0
"""How long a new key is only published before it signs: the JWKS's max-age (60 s) and
a rescan interval (30 s), so every replica and every app's cached JWKS has it first."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key of the ring: its thumbprint ``kid``, the file it came from, and its
    public half as a JWK (``public_jwk``, the form the JWKS publishes)."""

    kid: str
    file_name: str
    private_key: ec.EllipticCurvePrivateKey
    public_jwk: dict[str, str]
    modified_at: float = 0.0  # the file's mtime: when the key was put there


class KeyRing:
    """The keys in ``directory``: which one signs, and the JWKS that verifies them all.

    The directory is read again at most once per ``rescan_after_s``, on the first call
    after that (no thread). A rescan that meets a file it cannot use logs a warning
    naming it and keeps the previous keys: signing never stops over a bad file."""

    def __init__(
        self,
        directory: Path,
        rescan_after_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        publish_before_signing_s: float = PUBLISH_BEFORE_SIGNING_S,
    ) -> None:
        try:
            keys = _load_keys(directory)
        except ValueError as problem:
            raise ConfigError(KEYS_DIR, str(problem)) from None
        self._directory = directory
        self._rescan_after_s = rescan_after_s
        self._publish_before_signing_s = publish_before_signing_s
        self._clock = clock
        self._lock = threading.Lock()  # guards the key sets below and the document
        self._rescanning = threading.Lock()  # one thread reads the directory at a time
        self._keys = keys  # as loaded, in file-name order: the last one signs
        self._current: dict[str, SigningKey] = {}
        self._signing = keys[-1]
        self._retired: dict[str, SigningKey] = {}  # removed, with tokens still unexpired
        self._last_exp: dict[str, int] = {}  # kid -> latest exp this process signed
        self._published: tuple[str, ...] = ()
        self._jwks = b""
        self._drop_at = math.inf
        now = clock()
        self._rescan_at = now + rescan_after_s
        with self._lock:
            self._replace(keys, now)

    def signing_key(self) -> SigningKey:
        """The key new tokens are signed with."""
        self._keep_current()
        return self._signing

    def jwks(self) -> bytes:
        """The JWKS document (``{"keys": [...]}``), public halves only, JSON-encoded."""
        self._keep_current()
        return self._jwks

    def sign(self, key: SigningKey, claims: Mapping[str, Any]) -> str:
        """``claims`` as a compact JWS by ``key`` (from ``signing_key()``); the key stays
        published at least until ``claims["exp"]``, even if its file is removed."""
        token = jwt.encode(
            dict(claims), key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid}
        )
        exp = int(claims["exp"])
        with self._lock:
            if exp > self._last_exp.get(key.kid, 0):
                self._last_exp[key.kid] = exp
            if key.kid not in self._current:
                # Removed by a rescan since the caller asked for it: keep it published.
                self._retired[key.kid] = key
                self._drop_at = min(self._drop_at, self._last_exp[key.kid])
                self._publish()
        return token

    def _keep_current(self) -> None:
        now = self._clock()
        if now >= self._rescan_at and self._rescanning.acquire(blocking=False):
            try:
                keys = self._rescan(now) if now >= self._rescan_at else None
            finally:
                self._rescanning.release()
            if keys is not None:
                with self._lock:
                    self._replace(keys, now)
        if now >= self._drop_at:
            with self._lock:
                self._replace(self._keys, now)

    def _rescan(self, now: float) -> list[SigningKey] | None:
        self._rescan_at = now + self._rescan_after_s
        try:
            return _load_keys(self._directory)
        except ValueError as problem:
            log.warning("%s: %s; keeping the keys loaded before", KEYS_DIR, problem)
            return None

    def _replace(self, keys: list[SigningKey], now: float) -> None:
        """Make ``keys`` (in file-name order) the current set; call with the lock held."""
        current = {key.kid: key for key in keys}
        for kid, key in self._current.items():
            if kid not in current:
                self._retired[kid] = key
        for kid in list(self._retired):
            if kid in current or self._last_exp.get(kid, 0) <= now:
                del self._retired[kid]
        for kid in list(self._last_exp):
            if kid not in current and kid not in self._retired:
                del self._last_exp[kid]
        self._keys, self._current = keys, current
        settled = [k for k in keys if k.modified_at <= now - self._publish_before_signing_s]
        self._signing = settled[-1] if settled else keys[-1]
        self._drop_at = min((self._last_exp[kid] for kid in self._retired), default=math.inf)
        self._publish()

    def _publish(self) -> None:
        published = (*self._current, *self._retired)
        if published != self._published:
            keys = [*self._current.values(), *self._retired.values()]
            self._jwks = orjson.dumps({"keys": [key.public_jwk for key in keys]})
            self._published = published


class TokenMinter:
    """The JWT for a session and an audience, minted once and reused while it still says
    the same.

    ``audience`` is the ``aud`` of a token asked for without one of its own (a rule's
    ``jwt_audience`` wins over it). ``traits`` are dotted paths into ``identity.traits``
    (``email``, ``name.first``); the token carries those present, nested as in the
    identity. Thread-safe: two threads minting for one session at once both get a valid
    token, and one is kept."""

    def __init__(
        self,
        keyring: KeyRing,
        issuer: str,
        ttl_s: float,
        audience: str | None = None,
        traits: tuple[str, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not issuer:
            raise ValueError("issuer must not be empty")
        if not ttl_s >= 1:
            raise ValueError("ttl_s must be at least 1 (exp counts whole seconds)")
        self._keyring = keyring
        self._issuer = issuer
        self._ttl_ms = int(ttl_s * 1000)
        self._audience = audience
        self._trait_paths = _trait_paths(traits)
        self._clock = clock
        self._minted: BoundedMap[tuple[str, str | None], _Minted] = BoundedMap(MAX_CACHED_TOKENS)

    def token_for(self, session: MirroredSession, audience: str | None = None) -> tuple[str, int]:
        """The session's token for ``audience`` (``None``: the minter's own), and
        ``refresh_at_ms``: when whoever holds it should ask again (a fifth of its
        lifetime left, at the latest one second before ``exp``).

        ``exp`` is never later than the session's expiry: a session with less than a
        second left gets a token that expires with it (the caller asks only for live
        sessions, and an app must not be told a session outlives what Kratos said)."""
        key = self._keyring.signing_key()
        now_ms = int(self._clock() * 1000)
        view = session.kratos
        amr = tuple(dict.fromkeys(m["method"] for m in view["authentication_methods"]))
        traits = view["identity"].get("traits") or {}
        trait_values = tuple(dig(traits, path, _MISSING) for path in self._trait_paths)
        fingerprint = (
            session.identity_id,
            session.aal,
            amr,
            view.get("authenticated_at"),
            session.expires_at_ms,
            trait_values,
            key.kid,
        )
        audience = audience if audience is not None else self._audience
        minted = self._minted.get((session.id, audience))
        if minted is not None and minted.fingerprint == fingerprint:
            # A token already capped at the session's expiry is kept: signing again
            # would give the same exp, so it would cost a signature per request near the end.
            if now_ms < minted.refresh_at_ms or minted.capped:
                return minted.token, minted.refresh_at_ms
        minted = self._mint(session, key, now_ms, audience, amr, trait_values, fingerprint)
        self._minted.put((session.id, audience), minted)
        return minted.token, minted.refresh_at_ms

    def _mint(
        self,
        session: MirroredSession,
        key: SigningKey,
        now_ms: int,
        audience: str | None,
        amr: tuple[str, ...],
        trait_values: tuple[Any, ...],
        fingerprint: tuple[Any, ...],
    ) -> _Minted:
        iat = now_ms // 1000
        session_exp = session.expires_at_ms // 1000
        exp = min((iat * 1000 + self._ttl_ms) // 1000, session_exp)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": session.identity_id,
            "sid": session.id,
            "aal": session.aal,
            "amr": list(amr),
            "iat": iat,
            "exp": exp,
        }
        auth_time = _unix_seconds(session.kratos.get("authenticated_at"))
        if auth_time is not None:
            claims["auth_time"] = auth_time
        if audience is not None:
            claims["aud"] = audience
        if self._trait_paths:
            claims["traits"] = _nest(self._trait_paths, trait_values)
        lifetime_ms = exp * 1000 - now_ms
        refresh_at_ms = min(now_ms + int(lifetime_ms * REFRESH_AT), exp * 1000 - 1000)
        return _Minted(
            fingerprint=fingerprint,
            token=self._keyring.sign(key, claims),
            refresh_at_ms=refresh_at_ms,
            capped=exp == session_exp,
        )


def generate_key(directory: Path, clock: Callable[[], float] = time.time) -> Path:
    """Write a new P-256 key to ``directory`` as ``YYYYmmddTHHMMSSZ.pem`` (UTC), PKCS#8,
    mode 0600, creating the directory (0700) if needed. ``FileExistsError`` if that
    name is taken: a key is never overwritten."""
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is narrowed by the umask, never widened
    name = datetime.fromtimestamp(clock(), UTC).strftime("%Y%m%dT%H%M%SZ") + ".pem"
    path = directory / name
    if path.exists():
        raise FileExistsError(f"{path} exists; a key is never overwritten")
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Written under a name the ring ignores, then linked into place: a rescan never
    # meets half a key, and link (unlike rename) fails rather than replace a file.
    partial = directory / f".{name}.{os.getpid()}.partial"
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(pem)
        os.link(partial, path)
    finally:
        partial.unlink()
    return path


@dataclass(frozen=True, slots=True)
class _Minted:
    fingerprint: tuple[Any, ...]
    token: str
    refresh_at_ms: int
    capped: bool  # exp is the session's expiry, so minting again cannot extend it


def _load_keys(directory: Path) -> list[SigningKey]:
    """Every key in ``directory`` in file-name order; ``ValueError`` naming the directory
    or the first file that is not an EC P-256 private key. Names starting with a dot are
    skipped (temporary files, Kubernetes' ``..data``)."""
    try:
        names = sorted(
            name
            for name in os.listdir(directory)
            if name.endswith(".pem") and not name.startswith(".")
        )
    except FileNotFoundError:
        raise ValueError(f"{directory} does not exist") from None
    except OSError as error:
        raise ValueError(f"cannot read {directory} ({error.strerror})") from None
    if not names:
        raise ValueError(
            f"{directory} holds no *.pem key (make one with: kratos-bridge jwt-keygen DIR)"
        )
    return [_load_key(directory / name) for name in names]


def _load_key(path: Path) -> SigningKey:
    # Messages name the file and the kind of key, never anything read from it.
    try:
        pem = path.read_bytes()
        modified_at = path.stat().st_mtime
    except OSError as error:
        raise ValueError(f"cannot read {path} ({error.strerror})") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC P-256 private key (it is not an EC key)")
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{path} is not an EC P-256 private key (its curve is {key.curve.name})")
    numbers = key.public_key().public_numbers()
    members = {
        "crv": "P-256",
        "kty": "EC",
        "x": _base64url(numbers.x.to_bytes(32, "big")),
        "y": _base64url(numbers.y.to_bytes(32, "big")),
    }
    # RFC 7638: the required members, in lexicographic order, without whitespace.
    kid = _base64url(hashlib.sha256(orjson.dumps(members, option=orjson.OPT_SORT_KEYS)).digest())
    return SigningKey(
        kid=kid,
        file_name=path.name,
        private_key=key,
        public_jwk={**members, "kid": kid, "alg": ALGORITHM, "use": "sig"},
        modified_at=modified_at,
    )


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _trait_paths(traits: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The configured traits as paths, without any already inside another (``name``
    carries ``name.first``)."""
    paths = [tuple(trait.split(".")) for trait in traits]
    for path in paths:
        if not all(path):
            raise ValueError(f"trait {'.'.join(path)!r} is not a dotted path")
    unique = list(dict.fromkeys(paths))
    return tuple(
        path
        for path in unique
        if not any(other != path and path[: len(other)] == other for other in unique)
    )


_MISSING = object()


def _nest(paths: tuple[tuple[str, ...], ...], values: tuple[Any, ...]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in zip(paths, values, strict=True):
        if value is _MISSING:
            continue
        into = nested
        for part in path[:-1]:
            into = into.setdefault(part, {})
        into[path[-1]] = value
    return nested


def _unix_seconds(timestamp: object) -> int | None:
    if timestamp is None:
        return None
    try:
        return parse_timestamp_ms(timestamp) // 1000
    except ValueError:
        return None

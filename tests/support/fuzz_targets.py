"""The entry points hostile input reaches, each with a generator of such input and the
properties that must hold for any of it; ``tests/unit/test_properties.py`` runs them as
properties, ``tests/fuzz.py`` for a time budget.

What holds for every target: the only exceptions are the ones the function documents
(``BadRequest`` for a malformed request, ``CredentialMissing``/``SessionInvalid`` for a
credential, ``KratosUnavailable`` for a Kratos answer the bridge cannot use); no header
the bridge sends (to the proxy, the browser or Kratos) holds CR, LF or NUL; and no
request is allowed with an identity's headers it has no session for, nor on a route
that is not ``public`` without one.

The generators build input from pieces that have broken parsers before: CR/LF (raw and
percent-encoded), NUL, quotes, separators, dot segments and their encodings, non-ASCII.
Header values are Latin-1 text, one character per byte, as the servers hand them over.
Every function here is pure, or does no I/O: ``ForwardAuth.begin`` answers from this
process's memory or hands over to ``finish``, which would ask the store and Kratos and is
not called here (the suite's other tests drive it against the real ones).
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from hypothesis import strategies as st

from bridge.config import load_settings
from bridge.errors import BadRequest, CredentialMissing, KratosUnavailable, SessionInvalid
from bridge.kratos.http_client import Answer
from bridge.kratos.whoami import VouchedSession, _redirect_browser_to, parse_session
from bridge.pipeline.credentials import Kind, extract
from bridge.pipeline.dialects import Dialect
from bridge.pipeline.forward_auth import Pending
from bridge.pipeline.redirects import MAX_REDIRECT
from bridge.pipeline.rules import Access, Rules
from bridge.pipeline.upstream_headers import MAX_VALUE, UpstreamHeaders, header_value, parse_mapping
from bridge.sessions.session import MirroredSession
from bridge.web.request import HeaderView, OriginalRequest
from bridge.web.responses import Refusal, Reply
from bridge.wiring import Bridge, build_bridge

COOKIE_NAME = "ory_kratos_session"
LOGIN_URL = "https://login.example.test/self-service/login/browser"
RULES = """\
default: authenticated
rules:
  - {id: open, match: {path: /public}, access: public}
  - {id: assets, match: {host: "*.example.test", path: "/static/**"}, access: public}
  - {id: closed, match: {path: /internal}, access: deny}
  - {id: second-factor, match: {path: "/admin/**"}, access: aal2}
  - {id: writes, match: {methods: [POST, PUT], path: /api/}, access: authenticated}
"""
MAPPING = (
    "X-User-Id=identity.id,X-Session-Id=session.id,X-User-Aal=session.aal,"
    "X-User-Email=traits.email,X-User-Name=traits.name.first,X-User-Roles=traits.roles,"
    "X-User-Methods=session.amr,X-Tenant=metadata_public.tenant"
)
_FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\x00")


class Crash(AssertionError):
    """A property of a target does not hold."""


def _holds(condition: bool, why: str) -> None:
    if not condition:
        raise Crash(why)


def clean_headers(reply: Reply) -> None:
    """Every header of ``reply``, as the server sends it, is free of CR, LF and NUL."""
    for name, value in reply.raw_headers:
        for byte in _FORBIDDEN_IN_HEADERS:
            _holds(byte not in name and byte not in value, f"{name!r}: {value!r}")


# Generators


_PIECES = (
    "\r", "\n", "\r\n", "\x00", "%0d%0a", "%0D%0A", "%00", "\x85", "\t", " ", ";", ",",
    "=", '"', "\\", "%", "%2", "%25", "%2e", "%2E%2E", "%2F", "%5C", "..", ".", "/", "//",
    "?", "#", "@", ":", "\xff", "\xe9", "\xc3\xa9", "ory_st_", "Bearer ",
)  # fmt: skip
_LATIN1 = st.characters(max_codepoint=0xFF)


def hostile_text(max_pieces: int = 8) -> st.SearchStrategy[str]:
    """Latin-1 text made of pieces that smuggle CR/LF, NUL, separators and escapes."""
    piece = st.one_of(st.sampled_from(_PIECES), st.text(_LATIN1, max_size=6))
    return st.lists(piece, max_size=max_pieces).map("".join)


def _token() -> st.SearchStrategy[str]:
    alphanumeric = st.text(st.sampled_from("abcXYZ019"), min_size=16, max_size=40)
    return st.one_of(alphanumeric.map("ory_st_".__add__), alphanumeric, hostile_text())


def _cookie_value() -> st.SearchStrategy[str]:
    """Shaped like Kratos's cookie, base64url("<time>|<payload>|<HMAC>") (so judged
    plausible and sent on), or anything."""
    payload, mac = st.binary(min_size=1, max_size=30), st.binary(min_size=16, max_size=64)
    raw = st.tuples(st.integers(0, 2**40), payload, mac).map(
        lambda p: b"%d|%s|%s" % (p[0], base64.urlsafe_b64encode(p[1]), p[2])
    )
    return st.one_of(raw.map(lambda r: base64.urlsafe_b64encode(r).decode()), hostile_text())


def cookie_header() -> st.SearchStrategy[str]:
    name = st.sampled_from([COOKIE_NAME, f" {COOKIE_NAME}", f"{COOKIE_NAME} ", "other", ""])
    value = st.one_of(_cookie_value(), _cookie_value().map(lambda v: f'"{v}"'))
    pair = st.tuples(name, st.sampled_from(["=", "", "=="]), value).map("".join)
    separator = st.sampled_from(["; ", ";", " ; ", ";\t", ", ", "\r\n"])
    return st.tuples(st.lists(pair, max_size=4), separator).map(lambda p: p[1].join(p[0]))


_SEGMENTS = (
    "public", "internal", "admin", "static", "api", "x", "..", ".", "%2e", "%2E%2E", "%2F",
    "%5C", "\\", ";x", "", "%25", "%252e", "%0d%0a", "%00", "\xe9", "%c3%a9",
)  # fmt: skip


def _mostly(sane: st.SearchStrategy[str], hostile: st.SearchStrategy[str]) -> st.SearchStrategy:
    """``sane`` seven times in eight: hostile input that never gets past the first check
    tests nothing behind it."""
    return st.sampled_from((sane,) * 7 + (hostile,)).flatmap(lambda chosen: chosen)


def path() -> st.SearchStrategy[str]:
    """A path under one of the rules (or none), then segments, dot segments and escapes."""
    segment = _mostly(st.sampled_from(_SEGMENTS), hostile_text(3))
    body = st.lists(segment, max_size=5).map("/".join)
    query = st.one_of(st.just(""), hostile_text(3).map("?".__add__))
    start = _mostly(
        st.sampled_from(["/public/", "/internal/", "/admin/", "/static/", "/api/", "/"]),
        st.sampled_from(["", "//", "/\\", "/public", "/admin"]),
    )
    return st.tuples(start, body, query).map("".join)


_HOSTS = (
    "app.example.test", "a.example.test", "example.test", "APP.Example.Test.", "[::1]",
    "admin.example.test:8443", "app.example.test:", "h:", "http://x",
)  # fmt: skip


def host() -> st.SearchStrategy[str]:
    return _mostly(st.sampled_from(_HOSTS), hostile_text(4))


def method() -> st.SearchStrategy[str]:
    sane = st.sampled_from(["GET", "POST", "HEAD", "PUT"])
    return _mostly(sane, hostile_text(2) | st.just("get"))


def scheme() -> st.SearchStrategy[str]:
    return _mostly(st.sampled_from(["https", "http"]), st.sampled_from(["HTTP", "ftp", " x", ""]))


def _header(name: str, value: st.SearchStrategy[str]) -> st.SearchStrategy[list]:
    """The header absent, once (most often), or repeated (a proxy that sends it twice)."""
    count = st.sampled_from([0, 1, 1, 1, 2])
    return count.flatmap(lambda n: st.lists(value, min_size=n, max_size=n)).map(
        lambda values: [(name, v) for v in values]
    )


_CREDENTIAL = {
    "x-session-token": _token(),
    "cookie": cookie_header(),
    "authorization": _token().map("Bearer ".__add__) | hostile_text(),
}
_CALLER = {
    "accept": st.sampled_from(["text/html", "*/*", "text/html;q=0", ""]) | hostile_text(),
    "sec-fetch-mode": st.sampled_from(["navigate", "cors"]) | hostile_text(2),
    "x-requested-with": st.just("XMLHttpRequest"),
}


def _one_of_each(headers: dict[str, st.SearchStrategy[str]]) -> st.SearchStrategy[list]:
    parts = [_header(name, value) for name, value in headers.items()]
    return st.tuples(*parts).map(lambda groups: [pair for group in groups for pair in group])


def credential_headers() -> st.SearchStrategy[HeaderView]:
    """The credential headers, each absent, once or twice, hostile or sane."""
    return _one_of_each(_CREDENTIAL).map(HeaderView)


def _original_headers(dialect: str) -> st.SearchStrategy[list[tuple[str, str]]]:
    """What ``dialect``'s proxy says about the original request, as it would say it, then
    changed at up to two places: a header dropped, repeated, or its value made hostile."""
    said = st.tuples(method(), scheme(), host(), path()).map(
        lambda o: {
            "nginx": [
                ("x-original-url", f"{o[1]}://{o[2]}{o[3]}"),
                ("x-original-method", o[0]),
                ("x-forwarded-host", o[2]),
            ],
            "forward-auth": [
                ("x-forwarded-method", o[0]),
                ("x-forwarded-proto", o[1]),
                ("x-forwarded-host", o[2]),
                ("x-forwarded-uri", o[3]),
            ],
            "ext-authz": [("host", o[2]), ("x-forwarded-proto", o[1])],
        }[dialect]
    )
    change = st.tuples(st.integers(0, 3), st.sampled_from(["drop", "repeat", "replace"]))
    how_many = st.sampled_from([0, 0, 0, 0, 0, 1, 2])
    changes = how_many.flatmap(
        lambda n: st.lists(st.tuples(change, hostile_text()), min_size=n, max_size=n)
    )
    return st.tuples(said, changes).map(lambda p: _changed(*p))


def _changed(headers: list[tuple[str, str]], changes: list) -> list[tuple[str, str]]:
    headers = list(headers)
    for (index, how), text in changes:
        if not headers:
            break
        name, value = headers[index % len(headers)]
        if how == "drop":
            headers.remove((name, value))
        elif how == "repeat":
            headers.append((name, text))
        else:
            headers[index % len(headers)] = (name, text)
    return headers


def request_headers(dialect: str) -> st.SearchStrategy[HeaderView]:
    """A request to ``dialect``'s endpoint: credential, original request, caller."""
    groups = st.tuples(_one_of_each(_CREDENTIAL), _original_headers(dialect), _one_of_each(_CALLER))
    return groups.map(lambda g: HeaderView([pair for group in g for pair in group]))


def _json_value(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalar = st.none() | st.booleans() | st.integers() | st.floats() | text
    return st.recursive(
        scalar,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8,
    )


def json_values() -> st.SearchStrategy[Any]:
    """Any JSON value, its strings smuggling CR/LF (and the odd non-JSON float)."""
    return _json_value(st.one_of(hostile_text(), st.text(max_size=20)))


def _kratos_session_body() -> st.SearchStrategy[bytes]:
    """A whoami body: traits and metadata of any JSON, strings smuggling CR/LF; the parts
    the bridge checks mostly right, sometimes wrong."""
    text = st.one_of(hostile_text(), st.text(max_size=20))
    value = _json_value(text).filter(lambda v: not _has_big_int(v))
    uuid = st.sampled_from(["0b5c1c6e-7a64-4d3e-9d0c-3a2f1b5e8c7d"] * 15 + ["x"])
    traits = st.fixed_dictionaries(
        {
            "email": _mostly(text, value),
            "name": st.fixed_dictionaries({"first": _mostly(text, value)}),
            "roles": _mostly(st.lists(text, max_size=3), value),
        },
    )
    identity = st.fixed_dictionaries({"id": uuid, "traits": traits, "metadata_public": value})
    name = _mostly(st.sampled_from(["password", "totp", "code"]), text)
    method = st.fixed_dictionaries({"method": name, "aal": st.just("aal1")})
    body = st.fixed_dictionaries(
        {
            "active": st.sampled_from([True] * 15 + [False]),
            "id": uuid,
            "expires_at": st.sampled_from(["2099-01-01T00:00:00Z"] * 15 + ["soon"]),
            "authenticator_assurance_level": st.sampled_from(["aal1", "aal2"] * 7 + ["aal9"]),
            "authentication_methods": st.lists(method, max_size=3),
            "identity": identity,
        }
    )
    return body.map(orjson.dumps)


def _has_big_int(value: Any) -> bool:
    """orjson writes no integer past 64 bits (nor does Kratos)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, list):
        return any(_has_big_int(item) for item in value)
    if isinstance(value, dict):
        return any(_has_big_int(item) for item in value.values())
    return False


# The bridge under test: real objects from real settings, built once. Nothing here asks
# Kratos or the store (see the module's docstring), so their addresses lead nowhere.


def _bridge() -> tuple[Bridge, Rules]:
    home = Path(tempfile.mkdtemp(prefix="bridge-fuzz-"))
    (home / "rules.yml").write_text(RULES)
    settings = load_settings(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": "http://127.0.0.1:9",
            "BRIDGE_KRATOS_ADMIN_URL": "http://127.0.0.1:9",
            "BRIDGE_SECRET": "fuzz-secret-" + "x" * 40,
            "BRIDGE_LOGIN_URL": LOGIN_URL,
            "BRIDGE_RULES_FILE": str(home / "rules.yml"),
            "BRIDGE_IDENTITY_HEADERS": MAPPING,
        }
    )
    return build_bridge(settings), Rules.load(home / "rules.yml")


_BRIDGE, _RULES = _bridge()
_RULES_OF_THE_FILE = (*(rule for _, rule in _RULES._rules), _RULES.default)
_UPSTREAM = UpstreamHeaders(parse_mapping(MAPPING))
_DIALECTS = _BRIDGE.forward_auth.dialects
_ALL_DIALECTS: tuple[Dialect, ...] = (
    _DIALECTS.nginx,
    _DIALECTS.forward_auth,
    _DIALECTS.ext_authz,
)
_DIALECT = st.sampled_from(_ALL_DIALECTS)


def _bridge_path(dialect: Dialect) -> st.SearchStrategy[str]:
    if dialect is _DIALECTS.ext_authz:
        return path().map(lambda p: "/ext-authz" + p.partition("?")[0])
    return st.just("/forward-auth" if dialect is _DIALECTS.forward_auth else "/auth")


# Targets


def check_credentials(headers: HeaderView) -> None:
    """The credential Kratos would take, or a documented refusal; what is sent on to
    Kratos is byte-exact from the request and holds no CR, LF or NUL."""
    try:
        credential = extract(headers, COOKIE_NAME)
    except (CredentialMissing, SessionInvalid):
        return
    sent = " ".join(
        v for name in ("x-session-token", "cookie", "authorization") for v in headers.get_all(name)
    )
    for value in credential.values:
        _holds(bool(value) and value in sent, f"{value!r} is not from the request")
    if credential.kind is Kind.COOKIE:
        _holds(bool(headers.get_all("cookie")), "a cookie credential without a cookie")
    clean_headers(Reply(200, tuple(credential.headers(COOKIE_NAME).items())))


def check_cookies(cookie: str) -> None:
    """Cookie parsing, on its own: any Cookie header, once or split over several lines."""
    check_credentials(HeaderView([("cookie", cookie)]))
    check_credentials(HeaderView([("cookie", part) for part in cookie.split("; ")]))


@dataclass(frozen=True)
class DialectInput:
    dialect: Dialect
    headers: HeaderView
    method: str
    path: str
    query: str


def dialect_input() -> st.SearchStrategy[DialectInput]:
    query = st.one_of(st.sampled_from(["", "aal=aal2", "aal=aal1", "aal=x"]), hostile_text(3))

    def for_dialect(dialect: Dialect) -> st.SearchStrategy[DialectInput]:
        headers, bridge_path = request_headers(dialect.name), _bridge_path(dialect)
        return st.builds(DialectInput, st.just(dialect), headers, method(), bridge_path, query)

    return _DIALECT.flatmap(for_dialect)


def check_dialect(given: DialectInput) -> None:
    """Each dialect reads the original request or refuses it (``BadRequest``); what it
    reads is visible ASCII, and its refusal, shaped for its proxy, has clean headers."""
    try:
        original = given.dialect.original(given.headers, given.method, given.path, given.query)
    except BadRequest as error:
        refusal = Refusal(400, "bad_request", str(error))
        clean_headers(given.dialect.refuse(refusal, given.headers, None))
        return
    if original is not None:
        for part in (original.method, original.scheme, original.host, original.target):
            _holds(part.isascii() and part.isprintable() and " " not in part, f"{original!r}")
        _holds(original.target.startswith("/"), f"target {original.target!r}")
    login = _BRIDGE.redirects.login(original)
    refusal = Refusal(401, "session_missing", "no session", login)
    clean_headers(given.dialect.refuse(refusal, given.headers, original))


@dataclass(frozen=True)
class RedirectInput:
    original: OriginalRequest | None
    kratos_answer: bytes


def redirect_input() -> st.SearchStrategy[RedirectInput]:
    """An original request as a dialect read it from hostile headers, and a Kratos 403
    body whose ``redirect_browser_to`` may smuggle CR/LF."""

    def read(given: DialectInput) -> OriginalRequest | None:
        try:
            return given.dialect.original(given.headers, given.method, given.path, given.query)
        except BadRequest:
            return None

    hint = st.one_of(
        st.tuples(st.sampled_from(["https://", "http://", "javascript:", ""]), hostile_text())
        .map("".join),
        st.none(),
    )  # fmt: skip
    answer = st.one_of(
        hint.map(lambda h: orjson.dumps({"redirect_browser_to": h})),
        hint.map(lambda h: orjson.dumps({"error": {"details": {"redirect_browser_to": h}}})),
        hostile_text().map(str.encode),
    )
    return st.builds(RedirectInput, dialect_input().map(read), answer)


def check_redirects(given: RedirectInput) -> None:
    """A refused browser is only ever sent to the login URL (or Kratos's own, checked,
    step-up URL), with ``return_to`` only for an allow-listed origin: never a header
    with CR/LF, never longer than a proxy's buffer allows."""
    hint = _redirect_browser_to(Answer(403, [], given.kratos_answer))
    redirects = _BRIDGE.redirects
    for target, url in (
        (LOGIN_URL, redirects.login(given.original)),
        (LOGIN_URL, redirects.reauthenticate(given.original)),
        (hint or LOGIN_URL, redirects.step_up(given.original, hint)),
    ):
        _holds(url.startswith(target), f"{url!r} is not under {target!r}")
        _holds(len(url) <= max(MAX_REDIRECT, len(target) + 40), f"{len(url)} characters")
        clean_headers(Reply(302, (("Location", url),)))
    return_to = redirects.return_to(given.original)
    if return_to is not None:
        _holds(given.original is not None, "return_to without an original request")
        _holds(return_to.isascii() and return_to.isprintable(), repr(return_to))


@dataclass(frozen=True)
class RuleInput:
    method: str
    host: str
    path: str


def rule_input() -> st.SearchStrategy[RuleInput]:
    return st.builds(RuleInput, method(), host(), path())


def check_rules(given: RuleInput) -> None:
    """A rule of the file (or the default), or ``BadRequest``: never another exception."""
    try:
        rule = _RULES.match(given.method, given.host, given.path)
    except BadRequest:
        return
    _holds(rule in _RULES_OF_THE_FILE, f"{rule!r} is not a rule of the file")


def check_header_mapping(kratos_body: bytes) -> None:
    """A Kratos session, however odd its traits, gives identity headers of visible ASCII
    (percent-encoded beyond it), at most ``MAX_VALUE`` long; an unusable session is
    ``KratosUnavailable``, as documented."""
    try:
        view, expires_at_ms = parse_session(kratos_body)
    except KratosUnavailable:
        return
    session = MirroredSession.from_kratos(VouchedSession(view, expires_at_ms, ()), 0)
    headers, _ = _UPSTREAM.for_session(session)
    for name, value in headers:
        _holds(value.isascii() and (value == "" or value.isprintable()), f"{name}: {value!r}")
        _holds(len(value) <= MAX_VALUE, f"{name} is {len(value)} long")
    clean_headers(Reply(200, headers))


def check_header_value(value: Any) -> None:
    text = header_value(value)
    _holds(text.isascii() and (text == "" or text.isprintable()), repr(text))
    _holds(" " not in text and len(text) <= MAX_VALUE, repr(text[:80]))


def check_forward_auth(given: DialectInput) -> None:
    """The whole no-I/O step of a decision, for a process that holds no session: it
    never raises; it answers (refusal, or the anonymous allow of a public route) or hands
    over a credential for Kratos to judge. An allow carries no identity, and comes only
    from a ``public`` rule that no ``?aal=aal2`` tightened."""
    forward_auth = _BRIDGE.forward_auth
    step = forward_auth.begin(given.dialect, given.headers, given.method, given.path, given.query)
    if isinstance(step, Pending):
        _holds(step.credential is not None, "handed over without a credential")
        return
    clean_headers(step)
    if step.status != 200:
        return
    _holds(step is forward_auth.anonymous, "an allow with an identity, and no session")
    original = given.dialect.original(given.headers, given.method, given.path, given.query)
    _holds(original is not None, "an allow without an original request, with a rules file")
    rule = _RULES.match(original.method, original.host, original.target)
    _holds(rule.access is Access.PUBLIC, f"allowed on {rule.label} ({rule.access.value})")
    _holds(given.dialect.asked_aal(given.query) != "aal2", "allowed although aal2 was asked")
    for name in _UPSTREAM.names:
        _holds(all(v == "" for n, v in step.headers if n == name), f"{name} is set")


# Envoy's gRPC check, read independently: the test holds the request as bytes on the wire,
# then says it as Envoy's CheckRequest would and as Envoy's HTTP ext_authz would (a request
# to /ext-authz<path>, read as the HTTP front reads one: ``HeaderView.from_asgi``). The
# gRPC answer must be the HTTP dialect's, in Envoy's terms.

_PEER = ("ipv4:127.0.0.1:40000", "127.0.0.1")  # the gRPC peer, and the HTTP front's
_ENVOY_EXTRA = {
    "x-forwarded-proto": _mostly(st.sampled_from(["https", "http"]), hostile_text(2)),
    "x-user-id": hostile_text(),  # a client's forged identity header
    "user-agent": st.sampled_from(["Mozilla/5.0", ""]) | hostile_text(),
    "x-forwarded-for": st.sampled_from(["203.0.113.7", "203.0.113.7, 10.0.0.1"]),
}


class _Envoy:
    """The gRPC context ``Checks.check`` reads: only its peer."""

    def peer(self) -> str:
        return _PEER[0]


@dataclass(frozen=True)
class GrpcCheckInput:
    method: str
    path: str  # with the query
    host: str
    scheme: str
    headers: tuple[tuple[str, bytes], ...]  # lower-case names, as sent, repeats kept
    raw_headers: bool  # Envoy's encode_raw_headers (header_map), else the headers map
    # (which holds only UTF-8: other bytes come as header_map's raw_value)
    host_header: str | None  # a "host" entry in the headers, which http.host overrides
    mangle: tuple[str, int, bytes] | None  # the serialized request broken: how, where, what

    @property
    def header_map(self) -> bool:
        if self.raw_headers:
            return True
        try:
            for _, value in self.headers:
                value.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    def wire(self) -> list[tuple[bytes, bytes]]:
        """The request's headers as the HTTP front would get them: with the headers map,
        Envoy has joined a repeated header's values with commas."""
        if self.header_map:
            return [(name.encode(), value) for name, value in self.headers]
        joined: dict[str, list[bytes]] = {}
        for name, value in self.headers:
            joined.setdefault(name, []).append(value)
        return [(name.encode(), b",".join(values)) for name, values in joined.items()]

    def check_request(self) -> bytes:
        from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
        from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
        from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

        pseudo = {":authority": self.host, ":path": self.path, ":method": self.method}
        if self.host_header is not None:
            pseudo["host"] = self.host_header
        http = AttributeContext.HttpRequest(
            method=self.method, path=self.path, host=self.host, scheme=self.scheme
        )
        if self.header_map:
            entries = [HeaderValue(key=k, value=v) for k, v in pseudo.items()]
            for name, value in self.headers:
                try:
                    entries.append(HeaderValue(key=name, value=value.decode("utf-8")))
                except UnicodeDecodeError:
                    entries.append(HeaderValue(key=name, raw_value=value))
            http.header_map.CopyFrom(HeaderMap(headers=entries))
        else:
            http.headers.update(pseudo)
            http.headers.update({n.decode(): v.decode("utf-8") for n, v in self.wire()})
        request = CheckRequest(
            attributes=AttributeContext(request=AttributeContext.Request(http=http))
        )
        data = request.SerializeToString()
        if self.mangle is None:
            return data
        how, at, garbage = self.mangle
        at %= len(data) + 1
        if how == "truncate":
            return data[:at]
        if how == "insert":
            return data[:at] + garbage + data[at:]
        return data[:at] + garbage + data[at + len(garbage) :]  # overwrite

    def over_http(self) -> tuple[HeaderView, str, str, str] | None:
        """The same request to ``/ext-authz``: headers, method, path, query; ``None`` when
        its path cannot follow the prefix (it does not start with ``/``)."""
        target, _, query = self.path.partition("?")
        if not target.startswith("/"):
            return None
        wire = [(name, value) for name, value in self.wire() if name != b"host"]
        wire.append((b"host", self.host.encode()))
        if self.scheme and not any(name == b"x-forwarded-proto" for name, _ in wire):
            wire.append((b"x-forwarded-proto", self.scheme.encode()))
        as_read = lambda text: text.encode().decode("latin-1")  # noqa: E731
        view = HeaderView.from_asgi(wire, _PEER[1])
        return view, as_read(self.method), "/ext-authz" + as_read(target), as_read(query)


def grpc_check_input() -> st.SearchStrategy[GrpcCheckInput]:
    def without_bare_query(p: str) -> str:
        # A bare "?" (the first "?" ends the path) reaches /ext-authz as no query at all:
        # the HTTP server drops it. "/a??" keeps its query ("?").
        target, mark, query = p.partition("?")
        return target if mark and not query else p

    headers = st.tuples(
        _one_of_each(_CREDENTIAL), _one_of_each(_CALLER), _one_of_each(_ENVOY_EXTRA)
    ).map(lambda g: tuple((n, v.encode("latin-1")) for group in g for n, v in group))
    mangle = st.one_of(
        st.none(),
        st.none(),
        st.none(),
        st.tuples(
            st.sampled_from(["truncate", "insert", "overwrite"]),
            st.integers(0, 2000),
            st.binary(min_size=1, max_size=8),
        ),
    )
    return st.builds(
        GrpcCheckInput,
        method(),
        path().map(without_bare_query),
        host(),
        scheme(),
        headers,
        st.booleans(),
        st.one_of(st.none(), host()),
        mangle,
    )


def _grpc_checks() -> Any:
    from concurrent.futures import ThreadPoolExecutor

    from bridge.web.envoy_grpc import Checks

    # Only begin's answers are asked for in full: the pool is never used.
    return Checks(_BRIDGE.forward_auth, ThreadPoolExecutor(1), 1.0)


_GRPC_CHECKS = _grpc_checks()


def check_envoy_grpc(given: GrpcCheckInput) -> None:
    """The gRPC check agrees with ``/ext-authz`` for the same request: the same hand-over
    to Kratos (credential, original request, rule), or the same answer (status, headers,
    body) as a ``CheckResponse``: an allow only where ``/ext-authz`` allows. Bytes that are
    no ``CheckRequest`` are a denial or the anonymous allow. Never an exception, never a
    500."""
    import asyncio

    from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

    data = given.check_request()
    got = _GRPC_CHECKS.begin(data, _PEER[1])
    if isinstance(got, Pending):
        _holds(got.credential is not None, "handed over without a credential")
    else:
        clean_headers(got)
    expected: Reply | Pending | None = None
    over_http = given.over_http() if given.mangle is None else None
    if over_http is not None:
        view, method_, bridge_path, query = over_http
        dialect = _DIALECTS.ext_authz
        expected = _BRIDGE.forward_auth.begin(dialect, view, method_, bridge_path, query)
    if isinstance(expected, Pending):
        _holds(isinstance(got, Pending), f"gRPC answered {got!r}, HTTP asks Kratos")
        assert isinstance(got, Pending)
        same = (got.original, got.rule, got.aal, got.credential) == (
            expected.original,
            expected.rule,
            expected.aal,
            expected.credential,
        )
        _holds(same, f"gRPC hands over {got.original!r}, HTTP {expected.original!r}")
        return
    if isinstance(got, Pending):
        _holds(expected is None, f"gRPC asks Kratos, HTTP answered {expected!r}")
        return
    answer = CheckResponse.FromString(asyncio.run(_GRPC_CHECKS.check(data, _Envoy())))
    _holds(answer.denied_response.status.code != 500, f"a 500: {answer.denied_response.body}")
    if expected is None:
        if given.mangle is None:  # a path that is not one: malformed
            _holds(answer.denied_response.status.code == 400, f"{given.path!r}: {answer}")
        elif answer.status.code == 0:  # whatever it parsed as: no identity without a session
            identity = [h.header for h in answer.ok_response.headers if h.header.key in _IDENTITY]
            _holds(
                all(h.value == "" for h in identity), f"an identity without a session: {identity}"
            )
        return
    _same_answer(expected, answer)


_IDENTITY = frozenset(name.lower() for name in _UPSTREAM.names)


def _same_answer(reply: Reply, answer: Any) -> None:
    """``answer`` (a ``CheckResponse``) says what ``reply`` (``/ext-authz``'s) says."""
    headers = [(name.lower(), value) for name, value in reply.headers]
    if reply.status == 200:
        _holds(answer.status.code == 0, f"HTTP allows, gRPC says {answer.status}")
        ok = answer.ok_response
        upstream = [(h.header.key, h.header.value) for h in ok.headers]
        skipped = ("cache-control", "set-cookie")
        _holds(upstream == [(n, v) for n, v in headers if n not in skipped], f"{upstream}")
        cookies = [(h.header.key, h.header.value) for h in ok.response_headers_to_add]
        _holds(cookies == [(n, v) for n, v in headers if n == "set-cookie"], f"{cookies}")
        return
    _holds(answer.status.code != 0, f"HTTP refuses {reply.status}, gRPC allows")
    login = reply.status in (302, 303, 401)
    _holds(answer.status.code == (16 if login else 7), f"{reply.status}: {answer.status}")
    denied = answer.denied_response
    _holds(denied.status.code == reply.status, f"{denied.status.code} for {reply.status}")
    got_headers = [(h.header.key, h.header.value) for h in denied.headers]
    _holds(got_headers == headers, f"{got_headers} != {headers}")
    if reply.status == 400:  # the message names where the request said it (path, header)
        error = orjson.loads(denied.body)["error"]
        _holds(error == orjson.loads(reply.body)["error"], f"{denied.body}")
    else:
        _holds(denied.body.encode() == reply.body, f"{denied.body!r} != {reply.body!r}")


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Callable[[], st.SearchStrategy[Any]]
    check: Callable[[Any], None]


TARGETS = (
    Target("credentials", credential_headers, check_credentials),
    Target("cookies", cookie_header, check_cookies),
    Target("dialects", dialect_input, check_dialect),
    Target("redirects", redirect_input, check_redirects),
    Target("rules", rule_input, check_rules),
    Target("header_mapping", _kratos_session_body, check_header_mapping),
    Target("header_value", json_values, check_header_value),
    Target("forward_auth", dialect_input, check_forward_auth),
    Target("envoy_grpc", grpc_check_input, check_envoy_grpc),
)

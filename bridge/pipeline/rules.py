"""Access rules: which access a request (method, host, path) needs, from a YAML file.

The file is named by ``BRIDGE_RULES_FILE``; without one every request needs a
session (``Rules.everything_authenticated``). Rules are tried in order and the
first that matches wins; ``default`` applies when none does::

    default: authenticated        # optional; public | authenticated | aal2 | deny
    rules:
      - id: static                # optional, unique; names the rule in `check` and logs
        match:                    # optional; a missing or empty match matches everything
          host: app.example.com   # a string or a list; omitted = any host
          path: /static/          # a string or a list; omitted = any path
          methods: [GET, HEAD]    # a string or a list; omitted = any method
        access: public            # public | authenticated | aal2 | deny
      - id: admin
        match: {path: "/admin/**"}
        access: aal2
        max_age: 10m              # authenticated/aal2 only: 90s, 10m, 2h, 1d or seconds
        when:                     # authenticated/aal2 only: every condition must hold
          schema_id: admin        # a string or a list: identity.schema_id is one of them
          traits:                 # dotted path into identity.traits: a value, or a list of them
            role: [admin, ops]
          verified_address: email # true: some address is verified; "email", "sms": one via that
        jwt_audience: admin-app   # optional, not on deny: the JWT's `aud` for this rule's
                                  # requests, instead of BRIDGE_JWT_AUDIENCE

Hosts: ``app.example.com`` matches that host (any case, any port); ``*.example.com``
matches one or more labels left of ``example.com``, not ``example.com`` itself.
Paths match the path as every reading of it gives it (below): ``/admin`` matches
``/admin`` and what lies below it (``/admin/x``), not ``/administrator``; a path
ending in ``/`` is a plain prefix (``/`` matches every path); with ``*`` it is a
glob over the whole path, ``*`` matching within one segment and ``**`` any number
of whole segments (``/admin/**`` matches ``/admin`` too); a glob has at most one
``**`` and one ``*`` per segment, which keeps matching linear in the path's length.

A path is judged by every common reading of it, and allowed only if all of them fall
under the same rule; otherwise it is refused as ambiguous (``BadRequest``, 400), never
judged by a guess, nor by the strictest of the rules (rules with ``when`` or ``max_age``
are not ordered, so there is not always a strictest one). ``path_readings`` lists them: as
sent; decoded, with or without resolving dot segments (Flask); decoded, then resolved
(nginx, Go); resolved on the still encoded path, then decoded, so ``a%2Fb`` is one
segment (RFC 3986 section 5.2.4, Java, Envoy); the WHATWG URL reading (Node, Deno, Bun,
Next.js, Hono: ``%2e`` and ``.%2e`` are dot segments, ``\\`` is ``/``); ``//`` merged
before resolving (nginx ``merge_slashes``, Go ``path.Clean``); ``;parameters`` dropped
from each segment, before decoding (Tomcat, Jetty) or after (Spring); and these steps
combined. Each decodes once (``%252e`` is the name ``%2e``: the app decodes once),
never climbs above ``/``, keeps empty segments unless it merges them, and keeps a
trailing ``/``. A path starting with ``//`` (or ``/\\``) is refused outright: apps that
read a request as ``new URL(target, base)`` (as Node's docs do) take what follows for a
host and route the rest, which no reading of a path gives. A plain path (no ``%``,
``\\``, ``//``, ``/.`` or ``;``, as browsers send) reads one way only and costs a few C
calls; the answer for a path is memoised either way.

Trait values compare with their type: ``1`` is not ``"1"``, ``true`` is not ``1``;
a list or object trait never equals a value.

The rules only say what a request needs: ``max_age`` and the access level are for
the decision stage to enforce; ``Rule.permits`` evaluates ``when``. A bad file
raises ``ConfigError("BRIDGE_RULES_FILE", ...)`` naming the rule and field.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, Protocol, cast
from urllib.parse import unquote_to_bytes

import yaml

from bridge.bounded import BoundedMap
from bridge.errors import BadRequest, ConfigError
from bridge.sessions.session import dig

SETTING = "BRIDGE_RULES_FILE"
MAX_PATH_LENGTH = 8192
_MEMO_ENTRIES = 10_000
# Longer requests are judged each time: a full memo of attacker-chosen long paths
# would otherwise hold tens of megabytes.
_MEMO_MAX_KEY_LENGTH = 1024
_HOST_MEMO_ENTRIES = 1_000

_TOP_FIELDS = ("default", "rules", "case_sensitive_paths")
_RULE_FIELDS = ("id", "match", "access", "max_age", "when", "jwt_audience")
_MATCH_FIELDS = ("host", "path", "methods")
_WHEN_FIELDS = ("schema_id", "traits", "verified_address")

_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,62})"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_VIA = re.compile(r"[a-z0-9_-]{1,32}")
_AUDIENCE = re.compile(r"[\x21-\x7e]{1,256}")  # as BRIDGE_JWT_AUDIENCE
_DURATION = re.compile(r"([0-9]{1,9})([smhd]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ANY_PATH = "/.*"

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Access(Enum):
    PUBLIC = "public"
    AUTHENTICATED = "authenticated"
    AAL2 = "aal2"
    DENY = "deny"


_ACCESS_NAMES = ", ".join(access.value for access in Access)
_NEEDS_SESSION = (Access.AUTHENTICATED, Access.AAL2)


class Condition(Protocol):
    def holds(self, view: Mapping[str, Any]) -> bool: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class SchemaIs:
    """``identity.schema_id`` is one of ``schema_ids``."""

    schema_ids: frozenset[str]

    def holds(self, view: Mapping[str, Any]) -> bool:
        schema_id = _identity(view).get("schema_id")
        return isinstance(schema_id, str) and schema_id in self.schema_ids

    def describe(self) -> str:
        return "schema_id in " + ", ".join(sorted(self.schema_ids))


@dataclass(frozen=True, slots=True)
class TraitIs:
    """The trait at ``path`` (keys into ``identity.traits``) is one of ``allowed``, or, for
    a list trait, holds one of them; ``allowed`` is held as ``(kind, value)`` pairs so that
    equality respects JSON types."""

    path: tuple[str, ...]
    allowed: frozenset[tuple[str, Any]]

    def holds(self, view: Mapping[str, Any]) -> bool:
        value = dig(_identity(view).get("traits"), self.path)  # missing: None, never allowed
        if isinstance(value, list):  # a trait that is a list: one of its items will do
            return any(self._allows(item) for item in value)
        return self._allows(value)

    def _allows(self, value: Any) -> bool:
        kind = _kind(value)
        return kind is not None and (kind, value) in self.allowed

    def describe(self) -> str:
        values = ", ".join(sorted(repr(value) for _, value in self.allowed))
        return f"traits.{'.'.join(self.path)} in {values}"


@dataclass(frozen=True, slots=True)
class VerifiedAddress:
    """Some verifiable address (of kind ``via``, if given) is verified."""

    via: str | None

    def holds(self, view: Mapping[str, Any]) -> bool:
        addresses = _identity(view).get("verifiable_addresses")
        if not isinstance(addresses, list):
            return False
        return any(
            isinstance(address, dict)
            and address.get("verified") is True
            and (self.via is None or address.get("via") == self.via)
            for address in addresses
        )

    def describe(self) -> str:
        return f"a verified {self.via} address" if self.via else "a verified address"


@dataclass(frozen=True, slots=True)
class Rule:
    """What a matched request needs: ``access``, and for a session also ``max_age_s``
    (enforced by the decision stage) and the ``conditions`` of ``permits``. ``matches``
    says in words which requests the rule is for (empty for the default).
    ``jwt_audience`` is the ``aud`` of the JWT an allowed request's app gets (``None``:
    ``BRIDGE_JWT_AUDIENCE``), so that a token handed to one app is no good at another."""

    label: str
    access: Access
    max_age_s: float | None = None
    conditions: tuple[Condition, ...] = ()
    matches: str = ""
    jwt_audience: str | None = None

    def permits(self, view: Mapping[str, Any]) -> bool:
        """Whether a session view (``MirroredSession.kratos``) meets every condition."""
        for condition in self.conditions:
            if not condition.holds(view):
                return False
        return True

    def describe(self) -> str:
        """One line for ``check``: the rule, what it matches, what it needs."""
        needs = self.access.value
        if self.max_age_s is not None:
            needs += f", a login within {self.max_age_s:g}s"
        if self.conditions:
            needs += ", when " + " and ".join(c.describe() for c in self.conditions)
        if self.jwt_audience is not None:
            needs += f"; JWT aud {self.jwt_audience}"
        if not self.matches:
            return f"{self.label} -> {needs}"
        return f"{self.label}: {self.matches} -> {needs}"


@dataclass(frozen=True, slots=True)
class _Match:
    """A rule's ``match``, compiled: ``None`` for a part means any."""

    methods: frozenset[str] | None
    exact_hosts: frozenset[str] | None
    host_suffixes: tuple[str, ...]  # ".example.com" for "*.example.com"
    path_regex: str | None  # for ``fullmatch`` of the normalised path
    hosts: tuple[str, ...]  # as written, lower case
    text: str

    def applies_to(self, method: str, host: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.exact_hosts is None:
            return True
        if host in self.exact_hosts:
            return True
        return any(
            host.endswith(suffix) and len(host) > len(suffix) for suffix in self.host_suffixes
        )


@dataclass(frozen=True, slots=True)
class _PathTable:
    """The rules that apply to one method and host, in order, as one regular expression
    of one group per rule: which group matched is which rule won. One search, in C,
    costs less than testing the rules one by one in Python."""

    regex: re.Pattern[str] | None
    rules: tuple[Rule, ...]


class Rules:
    """The loaded rules; ``match`` is safe to call from many threads at once."""

    __slots__ = (
        "_by_host",
        "_configured",
        "_default",
        "_hosts",
        "_matched",
        "_path_flags",
        "_rules",
        "_tables",
    )

    def __init__(
        self,
        rules: tuple[tuple[_Match, Rule], ...],
        default: Rule,
        hosts: tuple[str, ...],
        configured: bool,
        case_sensitive_paths: bool = True,
    ) -> None:
        self._rules = rules
        self._path_flags = 0 if case_sensitive_paths else re.IGNORECASE
        self._default = default
        self._hosts = hosts
        self._configured = configured
        # The memos hold values computed from the request alone: a racing thread that
        # misses, or finds a memo just cleared, computes the same answer again.
        self._matched: BoundedMap[tuple[str, str, str], Rule] = BoundedMap(_MEMO_ENTRIES)
        self._by_host: BoundedMap[tuple[str, str], _PathTable] = BoundedMap(_HOST_MEMO_ENTRIES)
        # Keyed by which rules apply: the file, not requests, bounds how many there are.
        self._tables: dict[tuple[int, ...], _PathTable] = {}

    @classmethod
    def load(cls, path: str | Path) -> Rules:
        """Read and validate a rules file; ``ConfigError`` on the first problem."""
        path = Path(path)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as error:
            _fail(str(path), f"cannot be read ({error.strerror})")
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            _fail(str(path), f"is not valid YAML ({error})")
        if document is None:
            _fail(str(path), "is empty (write `rules: []` for no rules)")
        if not isinstance(document, dict):
            _fail(str(path), "must be a mapping with `rules` and optionally `default`")
        return cls._from_document(document)

    @classmethod
    def everything_authenticated(cls) -> Rules:
        """The behaviour without a rules file: every request needs a session."""
        return cls((), Rule("default", Access.AUTHENTICATED), (), configured=False)

    @property
    def default(self) -> Rule:
        """The rule for a request no rule matches."""
        return self._default

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host pattern the file names, lower case, in order, once each."""
        return self._hosts

    @property
    def configured(self) -> bool:
        """Whether the rules come from a file."""
        return self._configured

    @property
    def jwt_audiences(self) -> dict[str, str]:
        """The ``jwt_audience`` of each rule that has one, by the rule's label."""
        return {r.label: r.jwt_audience for _, r in self._rules if r.jwt_audience is not None}

    def match(self, method: str, host: str, path: str) -> Rule:
        """The first rule matching the request, else the default. ``path`` is the raw
        request target's path (a query is ignored); ``BadRequest`` if it is malformed."""
        if not self._rules:
            # Nothing depends on the path: it is not judged (nor refused).
            return self._default
        if "?" in path:
            path = path.partition("?")[0]
        key = (method, host, path)
        rule = self._matched.get(key)
        if rule is not None:
            return rule
        rule = self._match(method, host, path)
        if len(method) + len(host) + len(path) <= _MEMO_MAX_KEY_LENGTH:
            self._matched.put(key, rule)
        return rule

    def describe(self) -> list[str]:
        """One line per rule and one for the default, for ``check``."""
        return [rule.describe() for _, rule in self._rules] + [self._default.describe()]

    def _match(self, method: str, host: str, path: str) -> Rule:
        readings = path_readings(path)
        table = self._by_host.get((method, host))
        if table is None:
            table = self._table(method, host)
            self._by_host.put((method, host), table)
        rule = self._first(table, readings[0])
        # The app, or a proxy in front of it, may read the path in any of the common
        # ways, and the bridge cannot know which: a path that two readings send to
        # different rules is refused. A path as browsers send it reads the same in all.
        for reading in readings[1:]:
            if self._first(table, reading) is not rule:
                raise BadRequest(
                    "the path is ambiguous: read as different servers and frameworks read "
                    "paths (decoded or not, dot segments resolved before or after "
                    "decoding, ...) it falls under different rules"
                )
        return rule

    def _first(self, table: _PathTable, path: str) -> Rule:
        if table.regex is None:
            return table.rules[0] if table.rules else self._default
        matched = table.regex.fullmatch(path)
        if matched is None:
            return self._default
        # Each rule's pattern is one group of the alternation: one of them matched.
        return table.rules[cast(int, matched.lastindex) - 1]

    def _table(self, method: str, host: str) -> _PathTable:
        method, host = method.upper(), normalise_host(host)
        applying: list[int] = []
        for index, (found, _) in enumerate(self._rules):
            if found.applies_to(method, host):
                applying.append(index)
                if found.path_regex is None:
                    break  # it matches every path: no later rule can win
        key = tuple(applying)
        table = self._tables.get(key)
        if table is None:
            rules = tuple(self._rules[index][1] for index in key)
            branches = [self._rules[index][0].path_regex for index in key]
            if not branches or branches[0] is None:
                table = _PathTable(None, rules)
            else:
                regex = "|".join(f"({branch or '.*'})" for branch in branches)
                table = _PathTable(re.compile(regex, re.DOTALL | self._path_flags), rules)
            table = self._tables.setdefault(key, table)
        return table

    @classmethod
    def _from_document(cls, document: dict[Any, Any]) -> Rules:
        for key in document:
            if key not in _TOP_FIELDS:
                _fail(str(key), f"unknown top-level key (keys: {', '.join(_TOP_FIELDS)})")
        default = Rule("default", _access(document.get("default", "authenticated"), "default"))
        items = document.get("rules", [])
        if not isinstance(items, list):
            _fail("rules", "must be a list of rules")
        rules: list[tuple[_Match, Rule]] = []
        hosts: dict[str, None] = {}
        labels_by_id: dict[str, str] = {}
        for index, item in enumerate(items):
            found, rule = _rule(item, index, labels_by_id)
            rules.append((found, rule))
            hosts.update(dict.fromkeys(found.hosts))
        case_sensitive = document.get("case_sensitive_paths", True)
        if not isinstance(case_sensitive, bool):
            _fail("case_sensitive_paths", "must be true or false")
        return cls(tuple(rules), default, tuple(hosts), True, case_sensitive)


def normalise_path(raw: str) -> str:
    """The path a request is judged by: query and fragment dropped, percent-decoded
    once (UTF-8), ``\\`` read as ``/``, empty and ``.`` segments dropped and ``..``
    resolved (never above ``/``). ``BadRequest`` for a path that is too long, badly
    escaped, not UTF-8, or holds a control character. ``raw`` holds one character per
    byte sent (Latin-1, as the bridge reads headers).
    """
    path = _without_query(raw)
    if _plain(path):
        return path
    return _normalised(_decoded(path))


def path_readings(raw: str) -> tuple[str, ...]:
    """Every path an app or a proxy in front of it may route ``raw`` as, once each,
    ``normalise_path``'s first (see the module's docstring): ``Rules.match`` allows a
    path only if all of them fall under the same rule. A plain path (no ``%``, ``\\``,
    ``//``, ``/.`` or ``;``) reads one way only. ``BadRequest`` as ``normalise_path``,
    for a path that does not start with ``/``, and for one that starts with ``//``.
    """
    sent = raw.partition("?")[0] if "?" in raw else raw
    if len(sent) <= MAX_PATH_LENGTH and "#" not in sent and _plain(sent):
        return (sent,)
    path = _without_query(sent)
    decoded = _decoded(path)
    if path[:1] != "/":
        raise BadRequest("path does not start with /")
    if path[1:2] in ("/", "\\"):
        # Apps that read the target as Node's docs do, new URL(req.url, base), take what
        # follows "//" (or "/\\") for a host: "//x/internal" is "/internal" there.
        raise BadRequest("path starts with two slashes, which some apps read as a host name")
    readings = dict.fromkeys((_normalised(decoded), sent))
    states = {(path, False)}
    for stage in _STAGES:
        states |= {stage(text, is_decoded) for text, is_decoded in states}
    readings.update(dict.fromkeys(text for text, _ in states))
    return tuple(readings)


def _without_query(raw: str) -> str:
    path = raw
    if "?" in path:
        path = path.partition("?")[0]
    if "#" in path:
        path = path.partition("#")[0]
    if len(path) > MAX_PATH_LENGTH:
        raise BadRequest(f"path is longer than {MAX_PATH_LENGTH} characters")
    return path


def _plain(path: str) -> bool:
    """A path that needs no work and that every reading reads as it is, in a few C calls:
    the common case."""
    return (
        path[:1] == "/"
        and path.isascii()
        and path.isprintable()
        and "%" not in path
        and "\\" not in path
        and "//" not in path
        and "/." not in path
        and ";" not in path
    )


def _decoded(path: str) -> str:
    """``path`` percent-decoded once, checked: ``BadRequest`` for a bad escape, bytes
    that are not UTF-8, or a control character."""
    if "%" in path or not path.isascii():
        if _BAD_ESCAPE.search(path):
            raise BadRequest("path has a '%' not followed by two hex digits")
        try:
            path = unquote_to_bytes(path.encode("latin-1")).decode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("path holds characters that are not bytes") from None
        except UnicodeDecodeError:
            raise BadRequest("path is not UTF-8 once percent-decoded") from None
    if _CONTROL.search(path):
        raise BadRequest("path holds a control character")
    return path


def _normalised(decoded: str) -> str:
    """The decoded path with ``\\`` as ``/``, ``;parameters`` and empty segments
    dropped, dot segments resolved: every normalisation at once."""
    path = decoded.replace("\\", "/")
    if path and path[0] != "/":
        raise BadRequest("path does not start with /")
    segments: list[str] = []
    # Servlet containers (Tomcat, Jetty) drop ";parameters" from each segment before they
    # route, so "/public/..;/admin" reaches "/admin" there: judge it as such here too.
    parts = [part.partition(";")[0] for part in path.split("/")[1:]]
    for part in parts:
        if part == "..":
            if segments:
                segments.pop()
        elif part and part != ".":
            segments.append(part)
    # A path ending in "/", "/." or "/.." names a directory: keep its trailing "/".
    trailing = "/" if segments and parts[-1] in ("", ".", "..") else ""
    return "/" + "/".join(segments) + trailing


# The steps that the common readings of a path take, in this order, each of which a
# reading takes or leaves out. A state is (the path so far, whether it is decoded); a
# step returns it unchanged when it does not apply. The path is checked already, so
# decoding cannot fail: a "/", ";" or backslash never splits a UTF-8 sequence of a path that
# decodes as a whole.


def _drop_parameters(path: str, decoded: bool) -> tuple[str, bool]:
    """Tomcat and Jetty drop ";..." from each segment before decoding, Spring after."""
    if ";" not in path:
        return path, decoded
    return "/".join(segment.partition(";")[0] for segment in path.split("/")), decoded


def _decode(path: str, decoded: bool) -> tuple[str, bool]:
    """Once: before resolving (nginx, Go), after it (RFC 3986, WHATWG), or never."""
    if decoded or ("%" not in path and path.isascii()):
        return path, True
    return unquote_to_bytes(path.encode("latin-1")).decode("utf-8"), True


def _backslash(path: str, decoded: bool) -> tuple[str, bool]:
    """WHATWG reads ``\\`` as ``/`` (in http and https URLs); IIS does, after decoding."""
    return path.replace("\\", "/"), decoded


def _merge_slashes(path: str, decoded: bool) -> tuple[str, bool]:
    """nginx's ``merge_slashes``, Go's ``path.Clean``: ``//`` is ``/``."""
    if "//" not in path:
        return path, decoded
    return _SLASHES.sub("/", path), decoded


def _whatwg_dots(path: str, decoded: bool) -> tuple[str, bool]:
    """WHATWG reads ``%2e`` (any case) as ``.``, in a still encoded path: ``.%2e`` is a
    dot segment there, one decoding (the app's) later. Decoded, ``%2e`` came from
    ``%252e``: a name."""
    if decoded or "%" not in path:
        return path, decoded
    segments = path.split("/")
    for index, segment in enumerate(segments):
        if "%" in segment:
            segments[index] = _WHATWG_DOTS.get(segment.lower(), segment)
    return "/".join(segments), decoded


def _remove_dot_segments(path: str, decoded: bool) -> tuple[str, bool]:
    """RFC 3986 section 5.2.4: ``.`` and ``..`` resolved, never above ``/``; empty
    segments kept; a path ending in a dot segment keeps a trailing ``/``."""
    if "/." not in path:
        return path, decoded
    parts = path.split("/")[1:]
    segments: list[str] = []
    for part in parts:
        if part == "..":
            if segments:
                segments.pop()
        elif part != ".":
            segments.append(part)
    trailing = "/" if segments and parts[-1] in (".", "..") else ""
    return "/" + "/".join(segments) + trailing, decoded


_SLASHES = re.compile(r"//+")
_WHATWG_DOTS = {"%2e": ".", ".%2e": "..", "%2e.": "..", "%2e%2e": ".."}
_STAGES = (
    _drop_parameters,
    _decode,
    _backslash,
    _drop_parameters,
    _merge_slashes,
    _whatwg_dots,
    _remove_dot_segments,
    _decode,
)


def normalise_host(host: str) -> str:
    """A Host header as host patterns are matched: no port, lower case, no trailing
    dot; an IPv6 address without brackets, in its shortest form."""
    host = host.lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    if ":" in host:
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            pass
    return host


def _rule(item: Any, index: int, labels_by_id: dict[str, str]) -> tuple[_Match, Rule]:
    where = f"rules[{index}]"
    if not isinstance(item, dict):
        _fail(where, "must be a mapping with `access` and optionally `id`, `match`, ...")
    _known_fields(item, where, _RULE_FIELDS)
    label = where
    if "id" in item:
        rule_id = item["id"]
        if not isinstance(rule_id, str) or not _ID.fullmatch(rule_id):
            _fail(f"{where}.id", f"{rule_id!r} is not 1-64 of A-Z a-z 0-9 _ . : -")
        if rule_id in labels_by_id:
            _fail(f"{where}.id", f"{rule_id!r} is already the id of {labels_by_id[rule_id]}")
        labels_by_id[rule_id] = where
        label = f"{where} ({rule_id})"
    if "access" not in item:
        _fail(f"{where}.access", f"is required (one of {_ACCESS_NAMES})")
    access = _access(item["access"], f"{where}.access")
    for name in ("max_age", "when"):
        if name in item and access not in _NEEDS_SESSION:
            _fail(f"{where}.{name}", "only for access authenticated or aal2")
    max_age_s = _duration(item["max_age"], f"{where}.max_age") if "max_age" in item else None
    conditions = _conditions(item.get("when"), f"{where}.when") if "when" in item else ()
    audience = None
    if "jwt_audience" in item:
        audience = _audience(item["jwt_audience"], access, f"{where}.jwt_audience")
    found = _compile_match(item.get("match"), f"{where}.match")
    return found, Rule(label, access, max_age_s, conditions, found.text, audience)


def _audience(value: Any, access: Access, where: str) -> str:
    if access is Access.DENY:
        _fail(where, "not for access deny (it lets no request through to carry a JWT)")
    if not isinstance(value, str) or not _AUDIENCE.fullmatch(value):
        _fail(where, f"{value!r} is not 1-256 visible ASCII characters")
    return value


def _compile_match(match: Any, where: str) -> _Match:
    if match is None:
        match = {}
    if not isinstance(match, dict):
        _fail(where, f"must be a mapping of {', '.join(_MATCH_FIELDS)}")
    _known_fields(match, where, _MATCH_FIELDS)
    text = []

    methods = None
    if "methods" in match:
        methods = frozenset(
            _method(m, w) for m, w in _strings(match["methods"], f"{where}.methods")
        )
        text.append("methods " + " ".join(sorted(methods)))

    exact_hosts, suffixes, hosts = None, [], []
    if "host" in match:
        exact = set()
        for pattern, place in _strings(match["host"], f"{where}.host"):
            host = _host_pattern(pattern, place)
            if host.startswith("*."):
                suffixes.append(host[1:])
            else:
                exact.add(host)
            hosts.append(pattern.lower())
        exact_hosts = frozenset(exact)
        text.append("host " + " ".join(hosts))

    path_regex = None
    if "path" in match:
        branches = [
            _path_regex(pattern, place)
            for pattern, place in _strings(match["path"], f"{where}.path")
        ]
        if _ANY_PATH not in branches:
            path_regex = "|".join(branches)
        text.append("path " + " ".join(_as_list(match["path"])))

    return _Match(
        methods=methods,
        exact_hosts=exact_hosts,
        host_suffixes=tuple(suffixes),
        path_regex=path_regex,
        hosts=tuple(hosts),
        text="; ".join(text) or "any request",
    )


def _host_pattern(pattern: str, where: str) -> str:
    host = pattern.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host).compressed
        except ValueError:
            _fail(where, f"{pattern!r} is not a host name (no port: ports are ignored)")
    name = host[2:] if host.startswith("*.") else host
    if len(name) > 253 or not _HOST_NAME.fullmatch(name):
        _fail(
            where,
            f"{pattern!r} is not a host name or *.domain "
            "(labels of a-z 0-9 _ -, '*.' only as the first label, no trailing dot)",
        )
    return host


def _path_regex(pattern: str, where: str) -> str:
    """A path pattern as a regular expression for ``fullmatch`` of a normalised path."""
    if not pattern.startswith("/"):
        _fail(where, f"{pattern!r} must start with /")
    for characters, why in (
        ("?#", "a path has no query or fragment"),
        ("%", "requests are matched decoded: write the character itself"),
        ("\\", "requests are matched with \\ read as /"),
    ):
        if any(c in pattern for c in characters):
            _fail(where, f"{pattern!r} must not hold {' or '.join(characters)} ({why})")
    if _CONTROL.search(pattern):
        _fail(where, f"{pattern!r} holds a control character")
    normalised = normalise_path(pattern)
    if normalised != pattern:
        _fail(where, f"{pattern!r} would never match: requests are matched as {normalised!r}")
    if "*" in pattern:
        return _glob(pattern, where)
    if pattern.endswith("/"):
        return _ANY_PATH if pattern == "/" else re.escape(pattern) + ".*"
    return re.escape(pattern) + "(?:/.*)?"


def _glob(pattern: str, where: str) -> str:
    """A glob as a regular expression. A ``**`` stands for any number of whole
    segments, none included (``/admin/**`` matches ``/admin``, ``/a/**/b`` matches
    ``/a/b``). The limits (one ``**``, as a whole segment; one ``*`` per segment) keep
    matching linear in the path's length: two wildcards that could each take the same
    characters would let a long path cost quadratic time or worse."""
    segments = pattern.split("/")[1:]
    if pattern.count("**") > 1 or any("**" in s and s != "**" for s in segments):
        _fail(where, f"{pattern!r}: ** must be a whole segment (/**/ or a final /**), once")
    if any(s.count("*") > 1 and s != "**" for s in segments):
        _fail(where, f"{pattern!r}: at most one * per segment")
    if pattern == "/**":
        return _ANY_PATH
    regex = []
    for segment in segments:
        if segment == "**":
            regex.append("(?:/.*)?")
        else:
            regex.append("/" + "[^/]*".join(re.escape(part) for part in segment.split("*")))
    return "".join(regex)


def _conditions(when: Any, where: str) -> tuple[Condition, ...]:
    if not isinstance(when, dict) or not when:
        _fail(where, f"must be a mapping of one or more of {', '.join(_WHEN_FIELDS)}")
    _known_fields(when, where, _WHEN_FIELDS)
    conditions: list[Condition] = []
    if "schema_id" in when:
        schema_ids = frozenset(s for s, _ in _strings(when["schema_id"], f"{where}.schema_id"))
        conditions.append(SchemaIs(schema_ids))
    if "traits" in when:
        traits = when["traits"]
        if not isinstance(traits, dict) or not traits:
            _fail(f"{where}.traits", "must be a mapping of trait paths to values")
        for name, values in traits.items():
            place = f"{where}.traits.{name}"
            if not isinstance(name, str) or not all(name.split(".")):
                _fail(f"{where}.traits", f"{name!r} is not a dotted trait path like name.first")
            conditions.append(TraitIs(tuple(name.split(".")), _trait_values(values, place)))
    if "verified_address" in when:
        via = when["verified_address"]
        if via is True:
            conditions.append(VerifiedAddress(None))
        elif isinstance(via, str) and _VIA.fullmatch(via):
            conditions.append(VerifiedAddress(via))
        else:
            _fail(f"{where}.verified_address", f"{via!r} is not true or a via such as email, sms")
    return tuple(conditions)


def _trait_values(values: Any, where: str) -> frozenset[tuple[str, Any]]:
    items = values if isinstance(values, list) else [values]
    if not items:
        _fail(where, "is an empty list (it would never match)")
    allowed = set()
    for position, value in enumerate(items):
        kind = _kind(value)
        if kind is None or (kind == "number" and not math.isfinite(value)):
            place = f"{where}[{position}]" if isinstance(values, list) else where
            _fail(
                place,
                f"{value!r} is not a string, number or boolean (quote dates and the like)",
            )
        allowed.add((kind, value))
    return frozenset(allowed)


def _kind(value: Any) -> str | None:
    """The JSON type of a scalar; ``bool`` is checked first as it is an ``int``."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _access(value: Any, where: str) -> Access:
    try:
        return Access(value)
    except ValueError:
        _fail(where, f"{value!r} is not one of {_ACCESS_NAMES}")


def _duration(value: Any, where: str) -> float:
    seconds = None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (found := _DURATION.fullmatch(value.strip())):
        seconds = int(found[1]) * _DURATION_UNITS[found[2]]
    if seconds is None or seconds <= 0:
        _fail(where, f"{value!r} is not a duration above 0 such as 90s, 10m, 2h, 1d or seconds")
    return float(seconds)


def _method(value: str, where: str) -> str:
    if not _METHOD.fullmatch(value):
        _fail(where, f"{value!r} is not an HTTP method")
    return value.upper()


def _strings(value: Any, where: str) -> list[tuple[str, str]]:
    """A string or a non-empty list of strings, each with where it was written."""
    if isinstance(value, str):
        return [(value, where)]
    if isinstance(value, list) and value:
        for position, item in enumerate(value):
            if not isinstance(item, str):
                _fail(f"{where}[{position}]", f"{item!r} is not a string")
        return [(item, f"{where}[{position}]") for position, item in enumerate(value)]
    _fail(where, f"{value!r} is not a string or a non-empty list of strings")


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _known_fields(mapping: dict[Any, Any], where: str, known: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in known:
            _fail(where, f"unknown field {key!r} (fields: {', '.join(known)})")


def _identity(view: Mapping[str, Any]) -> Mapping[str, Any]:
    identity = view.get("identity")
    return identity if isinstance(identity, dict) else {}


def _fail(where: str, problem: str) -> NoReturn:
    raise ConfigError(SETTING, f"{where}: {problem}")

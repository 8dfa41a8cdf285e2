"""Settings: read once at start-up from ``BRIDGE_*`` variables over an optional YAML file.

Every key is declared once in ``OPTIONS`` with its parser, default and one line
of documentation; the README's configuration table is generated from the same
list (``kratos-bridge config-reference``) and a test keeps the two in step.
A bad value raises ``ConfigError`` naming the key, and nothing starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qs, parse_qsl, unquote, urlsplit

import yaml
from redis import connection as redis_connection

from bridge.errors import ConfigError
from bridge.pipeline.redirects import Origin, parse_origin
from bridge.pipeline.rules import Rules
from bridge.pipeline.upstream_headers import DEFAULT_MAPPING, RESERVED, parse_mapping

ENV_PREFIX = "BRIDGE_"
MIN_SECRET_LENGTH = 32


# Labels of letters, digits, "-" and "_" (compose service names may hold "_").
_HOST_NAME = re.compile(
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?)*\.?"
)
# Query options of a Redis URL that would undo the bridge's own time bounds.
_SET_BY_THE_BRIDGE = frozenset(
    ("socket_timeout", "socket_connect_timeout", "retry_on_timeout", "retry", "max_connections")
)
_DB_PATH = re.compile(r"/?([0-9]{1,5})?")


def _host_and_port(parts: SplitResult) -> None:
    """A URL's host must be an IP address or a host name (resolving it is left to the
    moment of use: in compose, names resolve only once the other containers run), and
    its port, if any, a number from 1 to 65535."""
    host = parts.hostname
    if not host:
        raise ValueError("has no host")
    if not is_ip(host) and not _HOST_NAME.fullmatch(host):
        raise ValueError(f"host {host!r} is not a host name or IP address")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("port is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("port is not a number from 1 to 65535")


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _http_url(value: str) -> str:
    """An API base URL: scheme, host, port and path; no query, fragment or user."""
    parts = _browser_url_parts(value)
    if parts.query:
        raise ValueError("must not have a query string")
    return value.rstrip("/")


def _browser_url(value: str) -> str:
    _browser_url_parts(value)
    return value


def _browser_url_parts(value: str) -> SplitResult:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("not an http:// or https:// URL")
    _host_and_port(parts)
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user name or password")
    if parts.fragment or "#" in value:
        raise ValueError("must not have a fragment")
    _require_visible_ascii(value)
    return parts


@dataclass(frozen=True)
class RedisAddress:
    """A ``BRIDGE_REDIS_URL`` taken apart: what ``bridge.store.redis.connection`` builds its client
    from. A standalone URL goes to redis-py whole (``url``); the Sentinel and Cluster forms,
    which redis-py cannot read, are described by the other fields."""

    kind: str  # "standalone" | "sentinel" | "cluster"
    url: str = field(repr=False)
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()  # the Sentinels, or the cluster's seed nodes
    service: str | None = None  # the Sentinel service name (``sentinel monitor <name>``)
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_options: dict[str, str | bool] = field(default_factory=dict)  # redis-py's ssl_* names


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _require_visible_ascii(value: str) -> None:
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in value):
        raise ValueError("must be visible ASCII, without spaces")


_SENTINEL_PORT = 26379
_CLUSTER_PORT = 6379
_MULTI_HOST_SCHEMES = {
    "redis+sentinel": "sentinel",
    "rediss+sentinel": "sentinel",
    "redis+cluster": "cluster",
    "rediss+cluster": "cluster",
}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_TLS_OPTIONS = (*_TLS_FILES, "ssl_cert_reqs", "ssl_check_hostname")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_PORT_TEXT = re.compile(r"[0-9]{1,5}")


def _redis_url(value: str) -> str:
    parse_redis_url(value)
    return value


def parse_redis_url(value: str) -> RedisAddress:
    """``redis://``, ``rediss://`` or ``unix://`` (what redis-py reads itself), or
    ``redis[s]+sentinel://`` and ``redis[s]+cluster://`` with a list of hosts. Anything
    redis-py or the bridge would stumble on later is refused here, by name; no message
    quotes the user name or password."""
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme in _MULTI_HOST_SCHEMES:
        return _multi_host_url(value, scheme)
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            "not a redis://, rediss://, unix://, redis[s]+sentinel:// or redis[s]+cluster:// URL"
        )
    if parts.scheme == "unix":
        if not parts.path or parts.path == "/":
            raise ValueError("unix:// URL has no socket path")
    else:
        _host_and_port(parts)
        if not _DB_PATH.fullmatch(parts.path):
            raise ValueError(f"database {_quoted(parts.path.lstrip('/'), value)} is not a number")
    query = parse_qs(parts.query)
    _refuse_set_by_the_bridge(query)
    query_db = query.get("db")
    if query_db and not all(db.isdigit() for db in query_db):
        raise ValueError(f"database {query_db[0]!r} is not a number")
    tls_query = {name: values for name, values in query.items() if name.startswith("ssl_")}
    _tls_options(tls_query, parts.scheme)
    try:
        redis_connection.parse_url(value)
    except ValueError as error:
        raise ValueError(str(error)) from None
    return RedisAddress("standalone", value, tls=parts.scheme == "rediss")


def _multi_host_url(value: str, scheme: str) -> RedisAddress:
    kind = _MULTI_HOST_SCHEMES[scheme]
    rest = value[len(scheme) + 3 :]
    _require_visible_ascii(value)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "#" in tail:
        raise ValueError("must not have a fragment")
    path, _, query = tail.partition("?")
    userinfo, at, host_list = authority.rpartition("@")
    username = password = None
    if at:
        user_text, _, password_text = userinfo.partition(":")
        username, password = unquote(user_text) or None, unquote(password_text) or None
        if username is None and password is None:
            raise ValueError("has an '@' but no user name or password before it")
    default_port = _SENTINEL_PORT if kind == "sentinel" else _CLUSTER_PORT
    nodes = tuple(_node(item, default_port, value) for item in host_list.split(","))
    if len(set(nodes)) < len(nodes):
        raise ValueError("lists the same host and port twice")

    service, db = None, 0
    segments = path[1:].split("/") if path else []
    if kind == "sentinel":
        if not segments or not segments[0]:
            raise ValueError(
                "has no service name: redis+sentinel://host:port[,host:port...]/<service>[/db]"
            )
        service, db_text = segments[0], "/".join(segments[1:])
        if not _SERVICE_NAME.fullmatch(service):
            raise ValueError(
                f"service name {_quoted(service, value)} is not 1-128 of A-Z a-z 0-9 _ . : -"
            )
        if db_text and not _PORT_TEXT.fullmatch(db_text):
            raise ValueError(f"database {_quoted(db_text, value)} is not a number")
        db = int(db_text) if db_text else 0
    elif path not in ("", "/", "/0"):
        raise ValueError(
            f"database {_quoted(path[1:], value)}: a Redis Cluster has only database 0 (omit it)"
        )

    tls = scheme.startswith("rediss")
    options: dict[str, list[str]] = {}
    for name, option_value in parse_qsl(query, keep_blank_values=True):
        options.setdefault(name, []).append(option_value)
    _refuse_set_by_the_bridge(options)
    unknown = sorted(name for name in options if name not in _TLS_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown option {_quoted(unknown[0], value)}: a {scheme}:// URL takes only the TLS "
            f"options ({', '.join(_TLS_OPTIONS)}), on rediss+{kind}://"
        )
    return RedisAddress(
        kind,
        value,
        tls=tls,
        nodes=nodes,
        service=service,
        db=db,
        username=username,
        password=password,
        tls_options=_tls_options(options, scheme),
    )


def _node(item: str, default_port: int, value: str) -> tuple[str, int]:
    """One ``host[:port]`` of a host list; an IPv6 address in brackets."""
    if not item:
        raise ValueError("has an empty host in its host list")
    port_text: str | None
    if item.startswith("["):
        address, bracket, port_text = item[1:].partition("]")
        if not bracket or not _is_ipv6(address):
            raise ValueError(f"host {_quoted(item, value)} is not an IPv6 address in brackets")
        host = address
        if port_text and not port_text.startswith(":"):
            raise ValueError(f"host {_quoted(item, value)} has text after its IPv6 address")
        port_text = port_text[1:] if port_text else None
    elif item.count(":") > 1:
        raise ValueError(f"IPv6 host {_quoted(item, value)} must be in brackets: [address]:port")
    else:
        host, colon, port_text = item.partition(":")
        port_text = port_text if colon else None
        if not host:
            raise ValueError(f"host {_quoted(item, value)} has no host name")
        if not is_ip(host) and not _HOST_NAME.fullmatch(host):
            raise ValueError(f"host {_quoted(host, value)} is not a host name or IP address")
    if port_text is None:
        return host, default_port
    if not _PORT_TEXT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port of host {_quoted(host, value)} is not a number from 1 to 65535")
    return host, int(port_text)


def _quoted(text: str, url: str) -> str:
    """``text`` from ``url`` for a message, unless it may be part of a password: one
    holding an unencoded "/", "?" or "#" ends the host part early, so only text that
    appears after the URL's last "@" is shown."""
    last_at = url.rfind("@")
    return "(not shown)" if last_at >= 0 and url.rfind(text) < last_at else repr(text)


def _is_ipv6(value: str) -> bool:
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


def _refuse_set_by_the_bridge(query: Mapping[str, list[str]]) -> None:
    overridden = sorted(set(query) & _SET_BY_THE_BRIDGE)
    if overridden:
        raise ValueError(
            f"{overridden[0]} is set by the bridge (BRIDGE_REDIS_TIMEOUT bounds every wait)"
        )


def _tls_options(query: Mapping[str, list[str]], scheme: str) -> dict[str, str | bool]:
    """The TLS query options as redis-py keyword arguments, each checked: a file must be
    readable now (a missing CA file would otherwise surface only as failed connections)."""
    if query and not scheme.startswith("rediss"):
        name = sorted(query)[0]
        tls_scheme = scheme.replace("redis", "rediss", 1) if scheme != "unix" else "rediss"
        raise ValueError(f"{name} needs TLS: use {tls_scheme}://")
    options: dict[str, str | bool] = {}
    for name, values in sorted(query.items()):
        if len(values) > 1:
            raise ValueError(f"{name} is given more than once")
        text = values[0]
        if name in _TLS_FILES:
            if not text:
                raise ValueError(f"{name} is empty")
            try:
                Path(text).open("rb").close()
            except OSError as error:
                raise ValueError(f"{name} {text!r} cannot be read ({error.strerror})") from None
            options[name] = text
        elif name == "ssl_cert_reqs":
            if text not in ("none", "optional", "required"):
                raise ValueError(f"ssl_cert_reqs {text!r} is not one of none, optional, required")
            options[name] = text
        elif name == "ssl_check_hostname":
            if text.lower() not in ("true", "false"):
                raise ValueError(f"ssl_check_hostname {text!r} is not true or false")
            options[name] = text.lower() == "true"
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate)")
    return options


def _origins(value: str) -> tuple[Origin, ...]:
    origins = tuple(parse_origin(entry) for entry in value.split(",") if entry.strip())
    if not origins:
        raise ValueError("names no origin")
    return origins


def _identity_headers(value: str) -> tuple[tuple[str, str], ...]:
    return parse_mapping(value)


def _jwt_header(value: str) -> str:
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}", value):
        raise ValueError(f"{value!r} is not a header name")
    if value.lower() in RESERVED and value.lower() != "authorization":
        raise ValueError(f"{value!r} is a header the bridge or the proxy owns")
    return value


def _trait_list(value: str) -> tuple[str, ...]:
    traits = tuple(entry.strip() for entry in value.split(",") if entry.strip())
    for trait in traits:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})*", trait):
            raise ValueError(f"{trait!r} is not a dotted trait path")
    return traits


def _listen_host(value: str) -> str:
    """An IP address, or a host name resolved now to the address ``serve`` binds."""
    if is_ip(value):
        return value
    if not _HOST_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a host name or IP address")
    try:
        found = socket.getaddrinfo(value, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ValueError(f"{value!r} does not resolve to an address") from None
    return str(found[0][4][0])


def _number(low: float, high: float, *, integer: bool = False) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise ValueError(f"{value!r} is not {kind}") from None
        if not low <= number <= high:
            raise ValueError(f"{value} is outside {low:g}..{high:g}")
        return number

    return parse


def _matching(pattern: str, description: str) -> Callable[[str], str]:
    compiled = re.compile(pattern)

    def parse(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not {description}")
        return value

    return parse


def _stream_key(value: str) -> str:
    """A Redis key the bridge can keep its per-upgrade keys beside, in one hash slot."""
    from bridge.store.base import has_hash_tag

    _matching(r"[A-Za-z0-9:_.{}-]{1,128}", "a Redis key")(value)
    if "}" in value and not has_hash_tag(value):
        raise ValueError(
            f"{value!r} has '}}' but no {{tag}}: name a hash tag, e.g. 'events:{{aal2}}'"
        )
    return value


def _boolean(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(f"{value!r} is not true or false")
    return value.lower() == "true"


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    if not networks:
        raise ValueError("names no address")
    return tuple(networks)


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value.lower()

    return parse


def _password(value: str) -> str:
    if not value:
        raise ValueError("is empty")
    return value


def _secret(value: str) -> str:
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters")
    return value


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "host",
        _listen_host,
        "127.0.0.1",
        "Address `serve` listens on (`--host` overrides); a host name is resolved at start-up.",
    ),
    Option(
        "port",
        _number(1, 65535, integer=True),
        4480,
        "Port `serve` listens on (`--port` overrides).",
    ),
    Option(
        "kratos_public_url",
        _http_url,
        "http://127.0.0.1:4433",
        "Kratos public API, where `/sessions/whoami` is asked.",
    ),
    Option(
        "kratos_admin_url",
        _http_url,
        "http://127.0.0.1:4434",
        "Kratos admin API, used by `check` (it reports the Kratos version).",
    ),
    Option(
        "kratos_timeout",
        _number(0.05, 60),
        2.0,
        "Seconds a request may wait for Kratos in all (connect, send and the whole answer); "
        "then it is answered 503.",
    ),
    Option(
        "login_url",
        _browser_url,
        None,
        "Browser-facing Kratos login URL put in 401 answers; "
        "default `<kratos_public_url>/self-service/login/browser`.",
    ),
    Option(
        "rules_file",
        str,
        None,
        'YAML access-rules file (README, "Access rules"): what each host, path and method '
        "needs (`public`, `authenticated`, `aal2`, `deny`, `max_age`, `when`). Unset = "
        "every request needs a session (and `?aal=aal2` on the endpoint still asks for more).",
    ),
    Option(
        "return_to_origins",
        _origins,
        None,
        "Comma-separated origins a login's `return_to` may point at "
        "(`https://app.example.com`, `http://localhost:8080`, `https://*.example.com`); "
        "default: every host the rules file names (http or https, any port). A URL outside "
        "them is left out of `return_to`; with neither, `return_to` is never set.",
    ),
    Option(
        "identity_headers",
        _identity_headers,
        DEFAULT_MAPPING,
        "Headers sent to the upstream app on an allow, `Name=source` comma separated. "
        "Sources: `identity.id`, `identity.schema_id`, `identity.state`, `session.id`, "
        "`session.aal`, `session.amr`, `session.authenticated_at`, `session.expires_at`, "
        "`traits.<path>`, `metadata_public.<path>`. Each is sent on every 200, empty when "
        "the session lacks it; non-ASCII, spaces and `%` are percent-encoded (UTF-8).",
    ),
    Option(
        "jwt_header",
        _jwt_header,
        None,
        "Header that carries a signed JWT (ES256) of the session to the upstream app, e.g. "
        "`X-Bridge-Jwt` (`Authorization` sends `Bearer <jwt>`); unset = no JWT. Needs "
        "`BRIDGE_JWT_KEYS_DIR`. Public keys at `/.well-known/jwks.json`.",
    ),
    Option(
        "jwt_keys_dir",
        str,
        None,
        "Directory of P-256 private keys (`*.pem`, made by `kratos-bridge jwt-keygen DIR`). "
        "All are published in the JWKS; the file whose name sorts last signs once it is 90 s "
        "old. Re-read every 30 s: rotate by adding a later-named key, and remove the old one "
        "2 minutes plus `BRIDGE_JWT_TTL` later.",
    ),
    Option(
        "jwt_issuer",
        _matching(r"[\x21-\x7e]{1,256}", "1-256 visible ASCII characters"),
        "kratos-session-bridge",
        "The JWT's `iss`.",
    ),
    Option(
        "jwt_audience",
        _matching(r"[\x21-\x7e]{1,256}", "1-256 visible ASCII characters"),
        None,
        "The JWT's `aud`, for requests whose rule sets no `jwt_audience` of its own; unset "
        "= none (which `bridge.flask` refuses: give each app an audience of its own).",
    ),
    Option(
        "jwt_ttl",
        _number(10, 3600),
        300.0,
        "Seconds a JWT is valid (never past the session's `expires_at`); it is re-minted "
        "when a fifth of that is left, never per request.",
    ),
    Option(
        "jwt_traits",
        _trait_list,
        None,
        "Comma-separated traits (dotted paths, e.g. `email,name.first`) copied into the "
        "JWT's `traits` claim.",
    ),
    Option(
        "redis_url",
        _redis_url,
        None,
        "Redis for the session mirror and AAL2 events; unset = embedded in-process store "
        "(one process only). One server: `redis://[[user]:password@]host[:port][/db]` "
        "(port 6379), `unix:///path.sock[?db=N]`. Sentinel: "
        "`redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]` "
        "(the Sentinels, port 26379; the master of `service` is asked of them on every new "
        "connection, so a failover is followed). Cluster: "
        "`redis+cluster://[[user]:password@]host[:port][,host[:port]...]` (seed nodes, port "
        "6379; database 0 only). An IPv6 host goes in brackets, `[::1]:26379`. `rediss` "
        "instead of `redis` means TLS (to the Sentinels too), with the query options "
        "`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile` (files, read at start-up), "
        "`ssl_cert_reqs` (`none`, `optional`, `required`: the default) and "
        "`ssl_check_hostname` (`true`, `false`).",
    ),
    Option(
        "redis_sentinel_password",
        _password,
        None,
        "Password of the Sentinels (`AUTH <password>`), only with a `redis+sentinel://` URL; "
        "unset = the URL's user name and password, as for the master. Never printed. "
        "Prefer `BRIDGE_REDIS_SENTINEL_PASSWORD_FILE`.",
    ),
    Option(
        "redis_sentinel_password_file",
        str,
        None,
        "File holding `redis_sentinel_password` (trailing newline ignored); wins over "
        "`BRIDGE_REDIS_SENTINEL_PASSWORD`.",
    ),
    Option(
        "redis_timeout",
        _number(0.01, 30),
        0.5,
        "Seconds to wait for one Redis command. No request waits longer than "
        "`kratos_timeout + 2 * redis_timeout` in all: then it is answered 503.",
    ),
    Option(
        "key_prefix",
        _matching(r"[A-Za-z0-9:_.-]{1,64}", "1-64 of A-Z a-z 0-9 : _ . -"),
        "bridge:",
        "Prefix of every Redis key the bridge writes.",
    ),
    Option(
        "session_cookie",
        _matching(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}", "a cookie name"),
        "ory_kratos_session",
        "Name of the Kratos session cookie (`session.cookie.name`).",
    ),
    Option(
        "revalidate_after",
        _number(0, 3600),
        5.0,
        "Seconds a mirrored session is trusted before Kratos is asked again; "
        "`0` asks every time. This is the bound on how late a logout or revocation "
        "takes effect.",
    ),
    Option(
        "negative_cache_ttl",
        _number(0, 300),
        10.0,
        "Seconds a credential Kratos rejected is answered 401 without asking again.",
    ),
    Option(
        "secret",
        _secret,
        None,
        "Key for HMAC-SHA256 of credentials; required with Redis so replicas agree; "
        "random per process when embedded. Prefer `BRIDGE_SECRET_FILE`.",
    ),
    Option(
        "secret_file",
        str,
        None,
        "File holding `secret` (trailing newline ignored); wins over `BRIDGE_SECRET`.",
    ),
    Option(
        "hook_secret",
        _secret,
        None,
        "Shared secret Kratos's `web_hook` sends in the `X-Bridge-Hook-Key` header "
        "(`auth.type: api_key`) to `POST /hooks/kratos/<flow>`; unset = that endpoint "
        'answers 404 (README, "Kratos webhooks"). Never printed. Prefer '
        "`BRIDGE_HOOK_SECRET_FILE`.",
    ),
    Option(
        "hook_secret_file",
        str,
        None,
        "File holding `hook_secret` (trailing newline ignored); wins over `BRIDGE_HOOK_SECRET`.",
    ),
    Option(
        "app_token",
        _secret,
        None,
        "Bearer token an app sends in `X-Bridge-App-Token` (compared in constant time) to "
        "write a session's app section with `PATCH /whoami/app`, beside the user's own "
        "session credential; unset = that endpoint refuses every write (`403`, "
        "`app_writes_disabled`). Never printed. Prefer `BRIDGE_APP_TOKEN_FILE`.",
    ),
    Option(
        "app_token_file",
        str,
        None,
        "File holding `app_token` (trailing newline ignored); wins over `BRIDGE_APP_TOKEN`.",
    ),
    Option(
        "aal2_stream",
        _stream_key,
        None,
        "Redis Stream that receives AAL2 events; default `<key_prefix>events:aal2`.",
    ),
    Option(
        "aal2_stream_maxlen",
        _number(1, 10**9, integer=True),
        1_000_000,
        "Approximate cap on the AAL2 stream's length (`XADD MAXLEN ~`).",
    ),
    Option(
        "app_data_max_bytes",
        _number(256, 16 * 1024 * 1024, integer=True),
        65536,
        "Cap on one session's app-owned data (field names and JSON values, in bytes); a "
        "write past it is refused (`413`, `AppDataTooLarge`) and writes nothing.",
    ),
    Option(
        "trusted_proxies",
        _networks,
        None,
        "Comma-separated addresses or networks (`10.0.0.0/8,127.0.0.1`) of proxies whose "
        "`X-Forwarded-For` names the client; unset = the client address is not known, and "
        "device changes are judged by user agent alone.",
    ),
    Option(
        "on_device_change",
        _one_of("off", "record", "deny"),
        "record",
        "When a session is used from another IP address (with `trusted_proxies`) or user "
        "agent than Kratos recorded: `record` a device-change signal (once per session and "
        "change), `deny` records it and refuses the request (`403`; so is a request without "
        "a user agent when Kratos recorded one), `off` ignores it.",
    ),
    Option(
        "device_stream",
        _stream_key,
        None,
        "Redis Stream of device-change signals; default `<key_prefix>events:device`.",
    ),
    Option(
        "device_stream_maxlen",
        _number(1, 10**9, integer=True),
        100_000,
        "Approximate cap on the device-change stream's length (`XADD MAXLEN ~`).",
    ),
    Option(
        "workers",
        _number(0, 64, integer=True),
        0,
        "Server processes; `0` = one per CPU the process may use (its affinity) with Redis, "
        "always 1 when embedded.",
    ),
    Option(
        "threads",
        _number(1, 256, integer=True),
        16,
        "Worker threads per server process, for requests that need Redis or Kratos (answers "
        "from the process's fresh copy need no thread). Raise it when Kratos is slow or far.",
    ),
    Option(
        "body_timeout",
        _number(0.1, 300),
        10.0,
        "Seconds a client may take to send a request body to a route that takes one "
        "(`PATCH /whoami/app`, the Kratos hooks, the dashboard's forms); then it is answered "
        "`408`. Other routes never wait for a body.",
    ),
    Option(
        "log_level",
        _one_of("debug", "info", "warning", "error"),
        "info",
        "Log level; logs never contain cookies or tokens.",
    ),
    Option(
        "log_format",
        _one_of("auto", "text", "json"),
        "auto",
        "`text` (human-readable lines), `json` (one JSON object per line, with a decision's "
        "fields), or `auto`: text on a terminal, JSON otherwise.",
    ),
    Option(
        "admin_host",
        _listen_host,
        "127.0.0.1",
        "Address of the admin listener (admin API, `/metrics`, OpenAPI); an address that is "
        "not loopback needs `BRIDGE_ADMIN_TOKEN`.",
    ),
    Option(
        "admin_port",
        _number(0, 65535, integer=True),
        4481,
        "Port of the admin listener; `0` = no admin listener.",
    ),
    Option(
        "admin_token",
        _secret,
        None,
        "Bearer token the admin listener requires (`Authorization: Bearer ...`, compared in "
        "constant time); unset = only loopback requests from no other site are answered, "
        "and only a loopback `BRIDGE_ADMIN_HOST` is allowed. Never printed. Prefer "
        "`BRIDGE_ADMIN_TOKEN_FILE`.",
    ),
    Option(
        "admin_token_file",
        str,
        None,
        "File holding `admin_token` (trailing newline ignored); wins over `BRIDGE_ADMIN_TOKEN`.",
    ),
    Option(
        "analytics",
        _boolean,
        True,
        'Session analytics that outlive the sessions (README, "Analytics"): who was seen '
        "when, requests per session, how sessions ended; served by `/admin/stats`.",
    ),
    Option(
        "analytics_retention_days",
        _number(1, 3650, integer=True),
        90,
        "Days the per-day analytics (counters, unique identities) are kept.",
    ),
    Option(
        "metrics",
        _boolean,
        True,
        "Prometheus metrics at `/metrics` on the admin listener.",
    ),
    Option(
        "log_decisions",
        _boolean,
        False,
        "One log line per forward-auth decision (`bridge.decisions`, level info): request id "
        "(`X-Request-Id`), dialect, method, decision, status, rule, identity and session id, "
        "tier (process, redis, kratos), latency. Never a credential, host or path.",
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """The validated configuration; build it with ``load_settings``."""

    host: str
    port: int
    kratos_public_url: str
    kratos_admin_url: str
    kratos_timeout: float
    login_url: str
    rules_file: str | None
    return_to_origins: tuple[Origin, ...] | None
    identity_headers: tuple[tuple[str, str], ...]
    jwt_header: str | None
    jwt_keys_dir: str | None
    jwt_issuer: str
    jwt_audience: str | None
    jwt_ttl: float
    jwt_traits: tuple[str, ...]
    redis_url: str | None
    redis_sentinel_password: str | None = field(repr=False)
    redis_timeout: float
    key_prefix: str
    session_cookie: str
    revalidate_after: float
    negative_cache_ttl: float
    secret: bytes = field(repr=False)
    secret_is_random: bool
    hook_secret: str | None = field(repr=False)
    app_token: str | None = field(repr=False)
    aal2_stream: str
    aal2_stream_maxlen: int
    app_data_max_bytes: int
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None
    on_device_change: str
    device_stream: str
    device_stream_maxlen: int
    workers: int
    threads: int
    body_timeout: float
    log_level: str
    log_format: str
    log_decisions: bool
    admin_host: str
    admin_port: int
    admin_token: str | None = field(repr=False)
    analytics: bool
    analytics_retention_days: int
    metrics: bool

    def with_overrides(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in changes.items() if v is not None})
        return Settings(**values)

    @property
    def request_budget(self) -> float:
        """Seconds a request may wait in all for Kratos and Redis: one Kratos call (bounded
        as a whole) and a Redis command on either side of it. The front answers 503 past
        it; the mirror's revalidation lock, its wait for a peer's answer, and how long an
        admin's revocation holds off a save already under way are measured from it."""
        return self.kratos_timeout + 2 * self.redis_timeout


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | Path | None = None
) -> Settings:
    """Read, validate and resolve every option; raise ``ConfigError`` on the first bad one."""
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[str, str]] = {}  # name -> (key as the user wrote it, value)

    if config_file is not None:
        for key, value in _read_yaml(Path(config_file)).items():
            raw[key] = (f"{config_file}: {key}", value)

    for env_key, value in environ.items():
        if not env_key.startswith(ENV_PREFIX):
            continue
        name = env_key[len(ENV_PREFIX) :].lower()
        if name not in _BY_NAME:
            raise ConfigError(env_key, "unknown setting (see `kratos-bridge config-reference`)")
        raw[name] = (env_key, value)

    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name not in raw:
            # A default written as text is read like a value (each such parse is idempotent).
            default = option.default
            values[option.name] = option.parse(default) if isinstance(default, str) else default
            continue
        key, text = raw[option.name]
        try:
            values[option.name] = option.parse(text.strip())
        except ValueError as error:
            raise ConfigError(key, str(error)) from None

    return _resolve(values, {name: key for name, (key, _) in raw.items()})


def parse_option(name: str, value: object, key: str) -> Any:
    """One option's value given some other way (a command-line flag), checked the same
    way; ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        return _BY_NAME[name].parse(str(value))
    except ValueError as error:
        raise ConfigError(key, str(error)) from None


def _read_yaml(path: Path) -> dict[str, str]:
    key = str(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(key, f"cannot be read ({error.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(key, f"is not valid YAML ({error})") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(key, "must be a mapping of setting names to values")
    result = {}
    for name, value in document.items():
        if name not in _BY_NAME:
            raise ConfigError(
                f"{key}: {name}", "unknown setting (see `kratos-bridge config-reference`)"
            )
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(f"{key}: {name}", "must be a single value")
        result[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return result


def _resolve(values: dict[str, Any], keys: dict[str, str]) -> Settings:
    def key_of(name: str) -> str:
        return keys.get(name, _BY_NAME[name].env)

    secret_text = _secret_or_file(values, "secret", key_of)
    values["hook_secret"] = _secret_or_file(values, "hook_secret", key_of)
    values["app_token"] = _secret_or_file(values, "app_token", key_of)
    values["admin_token"] = _secret_or_file(values, "admin_token", key_of)
    if (
        values["admin_token"] is None
        and values["admin_port"]
        and not _loopback(values["admin_host"])
    ):
        raise ConfigError(
            key_of("admin_token"),
            f"required: the admin listener is on {values['admin_host']}, not a loopback "
            "address (set BRIDGE_ADMIN_TOKEN or BRIDGE_ADMIN_TOKEN_FILE, or BRIDGE_ADMIN_PORT=0)",
        )

    values["redis_sentinel_password"] = _sentinel_password(
        values.pop("redis_sentinel_password"),
        values.pop("redis_sentinel_password_file"),
        values["redis_url"],
        key_of,
    )

    if secret_text is None and values["redis_url"] is not None:
        raise ConfigError(
            "BRIDGE_SECRET", "required when BRIDGE_REDIS_URL is set, so that replicas agree"
        )
    values["secret_is_random"] = secret_text is None
    values["secret"] = os.urandom(32) if secret_text is None else secret_text.encode()

    values["jwt_traits"] = values["jwt_traits"] or ()
    if values["rules_file"] is not None:
        # Compiled again by each process; here to fail early.
        rules = Rules.load(values["rules_file"])
        if rules.jwt_audiences and values["jwt_header"] is None:
            label = next(iter(rules.jwt_audiences))
            raise ConfigError(
                key_of("rules_file"),
                f"{label} sets jwt_audience, but no JWT is minted (set BRIDGE_JWT_HEADER "
                "and BRIDGE_JWT_KEYS_DIR)",
            )
    if (values["jwt_header"] is None) != (values["jwt_keys_dir"] is None):
        given, missing = (
            ("jwt_header", "jwt_keys_dir")
            if values["jwt_keys_dir"] is None
            else ("jwt_keys_dir", "jwt_header")
        )
        raise ConfigError(key_of(given), f"needs {_BY_NAME[missing].env} too")
    if values["jwt_header"] is not None:
        if values["jwt_header"].lower() in {n.lower() for n, _ in values["identity_headers"]}:
            raise ConfigError(key_of("jwt_header"), "is also in BRIDGE_IDENTITY_HEADERS")
        from bridge.pipeline.tokens import KeyRing  # cryptography, only when JWTs are on

        KeyRing(Path(values["jwt_keys_dir"]))  # raises naming BRIDGE_JWT_KEYS_DIR

    if values["login_url"] is None:
        values["login_url"] = values["kratos_public_url"] + "/self-service/login/browser"
    if values["aal2_stream"] is None:
        values["aal2_stream"] = values["key_prefix"] + "events:aal2"
    if values["device_stream"] is None:
        values["device_stream"] = values["key_prefix"] + "events:device"
    return Settings(**values)


def _secret_or_file(values: dict[str, Any], name: str, key_of: Callable[[str], str]) -> str | None:
    """A secret option, or the content of its ``<name>_file`` twin, which wins."""
    secret, secret_file = values.pop(name), values.pop(name + "_file")
    if secret_file is None:
        return secret
    try:
        secret = Path(secret_file).read_text(encoding="utf-8").rstrip("\r\n")
        return _secret(secret)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(key_of(name + "_file"), f"cannot be read ({error})") from None
    except ValueError as error:
        raise ConfigError(key_of(name + "_file"), f"secret {error}") from None


def _loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def _sentinel_password(
    password: str | None,
    password_file: str | None,
    redis_url: str | None,
    key_of: Callable[[str], str],
) -> str | None:
    """The Sentinels' own password, from its file when one is named; refused without a
    Sentinel URL, where it would silently do nothing."""
    name = (
        "redis_sentinel_password_file" if password_file is not None else "redis_sentinel_password"
    )
    if password is None and password_file is None:
        return None
    if redis_url is None or parse_redis_url(redis_url).kind != "sentinel":
        raise ConfigError(
            key_of(name),
            "only used with a redis+sentinel:// or rediss+sentinel:// BRIDGE_REDIS_URL",
        )
    if password_file is None:
        return password
    try:
        password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(key_of(name), f"cannot be read ({error})") from None
    if not password:
        raise ConfigError(key_of(name), "holds no password")
    return password


def reference_table() -> str:
    """The Markdown configuration table for the README."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for option in OPTIONS:
        default = "unset" if option.default is None else f"`{option.default}`"
        rows.append(f"| `{option.env}` | {default} | {option.doc} |")
    return "\n".join(rows)

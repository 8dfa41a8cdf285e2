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
from urllib.parse import SplitResult, parse_qs, urlsplit

import yaml
from redis import connection as redis_connection

from bridge.errors import ConfigError

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
    if not _is_ip(host) and not _HOST_NAME.fullmatch(host):
        raise ValueError(f"host {host!r} is not a host name or IP address")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("port is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("port is not a number from 1 to 65535")


def _is_ip(value: str) -> bool:
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
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in value):
        raise ValueError("must be visible ASCII, without spaces")
    return parts


def _redis_url(value: str) -> str:
    """``redis://`` or ``rediss://`` with host, port and db; ``unix://`` with a socket path.
    What redis-py itself would refuse (a bad query option) is refused here, by name."""
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("not a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix":
        if not parts.path or parts.path == "/":
            raise ValueError("unix:// URL has no socket path")
    else:
        _host_and_port(parts)
        if not _DB_PATH.fullmatch(parts.path):
            raise ValueError(f"database {parts.path.lstrip('/')!r} is not a number")
    query = parse_qs(parts.query)
    overridden = sorted(set(query) & _SET_BY_THE_BRIDGE)
    if overridden:
        raise ValueError(
            f"{overridden[0]} is set by the bridge (BRIDGE_REDIS_TIMEOUT bounds every wait)"
        )
    query_db = query.get("db")
    if query_db and not all(db.isdigit() for db in query_db):
        raise ValueError(f"database {query_db[0]!r} is not a number")
    try:
        redis_connection.parse_url(value)
    except ValueError as error:
        raise ValueError(str(error)) from None
    return value


def _listen_host(value: str) -> str:
    """An IP address, or a host name resolved now to the address ``serve`` binds."""
    if _is_ip(value):
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


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value.lower()

    return parse


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
        "redis_url",
        _redis_url,
        None,
        "Redis for the session mirror and AAL2 events; unset = embedded "
        "in-process store (one process only).",
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
        "aal2_stream",
        _matching(r"[A-Za-z0-9:_.{}-]{1,128}", "a Redis key"),
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
        "log_level",
        _one_of("debug", "info", "warning", "error"),
        "info",
        "Log level; logs never contain cookies or tokens.",
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
    redis_url: str | None
    redis_timeout: float
    key_prefix: str
    session_cookie: str
    revalidate_after: float
    negative_cache_ttl: float
    secret: bytes = field(repr=False)
    secret_is_random: bool
    aal2_stream: str
    aal2_stream_maxlen: int
    workers: int
    threads: int
    log_level: str

    def with_overrides(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in changes.items() if v is not None})
        return Settings(**values)


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
            values[option.name] = option.default
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

    secret_text = values.pop("secret")
    secret_file = values.pop("secret_file")
    if secret_file is not None:
        try:
            secret_text = Path(secret_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(key_of("secret_file"), f"cannot be read ({error})") from None
        try:
            _secret(secret_text)
        except ValueError as error:
            raise ConfigError(key_of("secret_file"), f"secret {error}") from None

    if secret_text is None and values["redis_url"] is not None:
        raise ConfigError(
            "BRIDGE_SECRET", "required when BRIDGE_REDIS_URL is set, so that replicas agree"
        )
    values["secret_is_random"] = secret_text is None
    values["secret"] = os.urandom(32) if secret_text is None else secret_text.encode()

    if values["login_url"] is None:
        values["login_url"] = values["kratos_public_url"] + "/self-service/login/browser"
    if values["aal2_stream"] is None:
        values["aal2_stream"] = values["key_prefix"] + "events:aal2"
    return Settings(**values)


def reference_table() -> str:
    """The Markdown configuration table for the README."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for option in OPTIONS:
        default = "unset" if option.default is None else f"`{option.default}`"
        rows.append(f"| `{option.env}` | {default} | {option.doc} |")
    return "\n".join(rows)

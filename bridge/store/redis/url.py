"""``BRIDGE_REDIS_URL`` taken apart: one server (``redis://``, ``rediss://``, ``unix://``),
a master found through Sentinel (``redis[s]+sentinel://``) or a Redis Cluster
(``redis[s]+cluster://``). ``bridge.store.redis.connection`` builds its client from the
``RedisAddress``; the settings, the apps' client and the command line check a URL here."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

from redis import connection as redis_connection

from bridge.hosts import HOST_NAME, check_host_and_port, is_ip, require_visible_ascii

# Query options of a Redis URL that would undo the bridge's own time bounds.
_SET_BY_THE_BRIDGE = frozenset(
    ("socket_timeout", "socket_connect_timeout", "retry_on_timeout", "retry", "max_connections")
)
_DB_PATH = re.compile(r"/?([0-9]{1,5})?")


@dataclass(frozen=True)
class RedisAddress:
    """A ``BRIDGE_REDIS_URL`` taken apart: what ``bridge.store.redis.connection`` builds
    its client from. A standalone URL goes to redis-py whole (``url``); the Sentinel and
    Cluster forms, which redis-py cannot read, are described by the other fields."""

    kind: str  # "standalone" | "sentinel" | "cluster"
    url: str = field(repr=False)
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()  # the Sentinels, or the cluster's seed nodes
    service: str | None = None  # the Sentinel service name (``sentinel monitor <name>``)
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_options: dict[str, str | bool] = field(default_factory=dict)  # redis-py's ssl_* names


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
        check_host_and_port(parts)
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
    require_visible_ascii(value)
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
        if not is_ip(host) and not HOST_NAME.fullmatch(host):
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

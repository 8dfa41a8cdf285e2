"""``kratos-bridge``: serve, check, config-reference, jwt-keygen; sessions, events and stats
(the admin API's client, ``bridge.admin.cli``). Exit 2 on a configuration error."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from bridge.admin import cli as admin_cli
from bridge.config import Settings, load_settings
from bridge.config.options import parse_option, reference_table
from bridge.errors import (
    BridgeError,
    ConfigError,
    KratosAdminRefused,
    KratosUnavailable,
    KratosUnreachable,
    StoreUnavailable,
)
from bridge.hosts import host_port
from bridge.logs import configure_logging
from bridge.store.redis.url import parse_redis_url
from bridge.web.cpu_budget import worker_count
from bridge.web.responses import Reply

EXIT_CONFIG = 2
EXIT_UNHEALTHY = 1
_ASKED_AS = "/forward-auth"  # check --url decides as the X-Forwarded-* dialect does


DESCRIPTION = (
    "Forward-auth for Ory Kratos: the server, a check of its settings and of the services "
    "it needs, and the operators' commands. Exit 2 on a configuration error."
)


def build_parser() -> argparse.ArgumentParser:
    """The ``kratos-bridge`` command line. Its help is for people at a terminal: plain
    words, not the docstrings' reStructuredText."""
    parser = argparse.ArgumentParser(prog="kratos-bridge", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the forward-auth server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--config", help="YAML file of settings; BRIDGE_* variables win")
    check = commands.add_parser(
        "check",
        help="validate settings and reach Redis and Kratos; with --url, show how the "
        "rules and a session decide a request",
    )
    check.add_argument("--config")
    check.add_argument("--url", help="an original URL to decide, e.g. https://app.example.com/")
    check.add_argument("--method", default="GET", help="its method (default GET)")
    check.add_argument("--session-token", help="decide for this Kratos session token")
    commands.add_parser("config-reference", help="print the settings table (Markdown)")
    keygen = commands.add_parser("jwt-keygen", help="write a new JWT signing key into DIR")
    keygen.add_argument("directory")
    admin_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "config-reference":
        print(reference_table())
        return 0
    if args.command == "jwt-keygen":
        from bridge.pipeline.tokens import generate_key

        try:
            print(generate_key(Path(args.directory)))
        except (OSError, FileExistsError) as error:
            print(
                f"kratos-bridge: cannot write a key into {args.directory}: {error}", file=sys.stderr
            )
            return EXIT_UNHEALTHY
        return 0
    try:
        settings = load_settings(config_file=args.config)
        if args.command == "serve":
            settings = settings.with_overrides(
                host=parse_option("host", args.host, "--host"),
                port=parse_option("port", args.port, "--port"),
            )
    except ConfigError as error:
        return _configuration_error(error)
    if args.command in admin_cli.COMMANDS:
        return admin_cli.run(args, settings)

    # check's output is the lines it prints: the log (the store's warnings, urllib3's)
    # would repeat them or come between them, so it shows only at BRIDGE_LOG_LEVEL=debug.
    configure_logging(settings.log_level, settings.log_format, quiet=args.command == "check")
    if args.command == "check" and args.url is not None:
        return decide_command(settings, args.url, args.method, args.session_token)
    if args.command == "check":
        return check_command(settings)
    from bridge.web.server import serve as run_server

    try:
        run_server(settings)  # checks what it can only check at start-up: a port taken
    except ConfigError as error:
        return _configuration_error(error)
    return 0


def _configuration_error(error: ConfigError) -> int:
    """One line naming the key, and the exit status that says "fix the settings"."""
    print(f"kratos-bridge: configuration error: {error}", file=sys.stderr)
    return EXIT_CONFIG


def check_command(settings: Settings) -> int:
    """Print what the bridge would run with and whether Redis and Kratos answer."""
    from bridge.kratos.admin import KratosAdmin
    from bridge.kratos.whoami import KratosClient
    from bridge.wiring import build_store

    ok = True
    workers = worker_count(settings)
    print(f"kratos public:   {settings.kratos_public_url}")
    with_token = " (with BRIDGE_KRATOS_ADMIN_TOKEN)" if settings.kratos_admin_token else ""
    print(f"kratos admin:    {settings.kratos_admin_url}{with_token}")
    print(f"store:           {_store_label(settings)}")
    print(f"workers:         {workers.count} ({workers.reason})")
    print(
        f"revalidate after {settings.revalidate_after:g}s, negative cache "
        f"{settings.negative_cache_ttl:g}s"
    )
    started = time.perf_counter()
    try:
        store = build_store(settings)
        store.ping()
        print(f"redis:           ok ({(time.perf_counter() - started) * 1000:.1f} ms)")
        print(f"topology:        {_topology_label(store.topology())}")
    except StoreUnavailable as error:
        print(f"redis:           FAILED ({error})")
        ok = False
    kratos = KratosClient(
        settings.kratos_public_url, settings.session_cookie, settings.kratos_timeout
    )
    problem = kratos.ready()
    print(f"kratos:          {'ok' if problem is None else 'FAILED (' + problem + ')'}")
    ok = ok and problem is None
    admin = KratosAdmin.of(settings)
    try:
        print(f"kratos version:  {admin.version()}")
    except KratosUnreachable:
        print("kratos version:  unknown (admin API not reachable)")
    except KratosAdminRefused as error:  # revocation and the web hooks would fail alike
        print(f"kratos version:  FAILED ({error})")
        ok = False
    except KratosUnavailable as error:
        print(f"kratos version:  unknown ({error})")
    finally:
        admin.close()
    return 0 if ok else EXIT_UNHEALTHY


def decide_command(settings: Settings, url: str, method: str, token: str | None) -> int:
    """How the bridge would answer ``method url`` (with ``token``'s session): the rule that
    matches, and the answer an API client and a browser would get. It runs the real
    forward-auth path on an embedded store, so it writes nothing to Redis."""
    from bridge.store import Keys
    from bridge.store.memory.store import MemoryStore
    from bridge.web.request import HeaderView
    from bridge.wiring import build_bridge, load_rules

    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if scheme not in ("http", "https") or not host:
        print(f"kratos-bridge: --url {url!r} is not an http:// or https:// URL", file=sys.stderr)
        return EXIT_CONFIG
    target = slash + path or "/"
    rules = load_rules(settings)
    print(f"rules:           {settings.rules_file or 'none: every request needs a session'}")
    print(f"request:         {method.upper()} {url}")
    try:
        rule = rules.match(method.upper(), host, target)
    except BridgeError as error:
        print(f"rule:            none ({error})")
        return EXIT_UNHEALTHY
    print(f"rule:            {rule.describe()}")

    bridge = build_bridge(settings, MemoryStore(Keys(settings.key_prefix, "check"), 1))
    forwarded = [
        ("x-forwarded-method", method.upper()),
        ("x-forwarded-proto", scheme),
        ("x-forwarded-host", host),
        ("x-forwarded-uri", target),
    ]
    if token is not None:
        forwarded.append(("x-session-token", token))
    forward_auth = bridge.forward_auth
    dialect = forward_auth.dialect_for(_ASKED_AS)
    assert dialect is not None  # the path Traefik and Caddy ask on, whatever the settings
    try:
        for caller, accept in (("api client", "application/json"), ("browser", "text/html")):
            headers = HeaderView([*forwarded, ("accept", accept)])
            reply = forward_auth(dialect, headers, "GET", _ASKED_AS, "")
            print(f"{caller + ':':<17}{_answer_label(reply)}")
    finally:
        bridge.mirror.close()
        bridge.kratos.close()
    return 0


def _answer_label(reply: Reply) -> str:
    headers = dict(reply.headers)
    if reply.status == 200:
        shown = ", ".join(
            f"{name}: {value}" for name, value in reply.headers if name != "Cache-Control"
        )
        return f"200 allow ({shown})"
    if "Location" in headers:
        return f"{reply.status} redirect to {headers['Location']}"
    body = orjson.loads(reply.body) if reply.body else {}
    return f"{reply.status} {body.get('error', '')}: {body.get('message', '')}"


def _store_label(settings: Settings) -> str:
    """Where the store is, without user name, password or query options."""
    if settings.redis_url is None:
        return "embedded (in-process, single process only)"
    address = parse_redis_url(settings.redis_url)
    scheme = settings.redis_url.partition("://")[0].lower()
    if address.kind == "standalone":
        parts = urlsplit(settings.redis_url)
        if parts.scheme == "unix":
            return f"redis unix://{parts.path}"
        where = host_port(parts.hostname or "", parts.port or 6379)
        return f"redis {scheme}://{where}{parts.path}"
    hosts = ",".join(host_port(host, port) for host, port in address.nodes)
    if address.kind == "sentinel":
        return f"redis {scheme}://{hosts}/{address.service}/{address.db}"
    return f"redis {scheme}://{hosts}"


def _topology_label(topology: dict[str, object]) -> str:
    """One line from ``SessionStore.topology()``."""
    kind = topology.get("kind")
    if kind == "embedded":
        return "embedded (this process only)"
    if kind == "standalone":
        return (
            f"standalone {topology['address']} ({topology['role']}, "
            f"{_count(topology['replicas'], 'replica')})"
        )
    if kind == "sentinel":
        return (
            f"sentinel service {topology['service']}: master {topology['master']}, "
            f"{_count(topology['replicas'], 'replica')}, "
            f"{_count(topology['sentinels'], 'sentinel')} configured"
        )
    if kind == "cluster":
        return (
            f"cluster: {_count(topology['masters'], 'master')}, "
            f"{_count(topology['replicas'], 'replica')}"
        )
    return ", ".join(f"{key} {value}" for key, value in topology.items())


def _count(number: object, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"

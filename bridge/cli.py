"""``kratos-bridge``: serve, check, config-reference. Exit 2 on a configuration error."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from urllib.parse import urlsplit

from bridge.config import (
    Settings,
    host_port,
    load_settings,
    parse_option,
    parse_redis_url,
    reference_table,
)
from bridge.errors import ConfigError, StoreUnavailable

EXIT_CONFIG = 2
EXIT_UNHEALTHY = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kratos-bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the forward-auth server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--config", help="YAML file of settings; BRIDGE_* variables win")
    check = commands.add_parser("check", help="validate settings and reach Redis and Kratos")
    check.add_argument("--config")
    commands.add_parser("config-reference", help="print the settings table (Markdown)")
    args = parser.parse_args(argv)

    if args.command == "config-reference":
        print(reference_table())
        return 0
    try:
        settings = load_settings(config_file=args.config)
        if args.command == "serve":
            settings = settings.with_overrides(
                host=parse_option("host", args.host, "--host"),
                port=parse_option("port", args.port, "--port"),
            )
    except ConfigError as error:
        print(f"kratos-bridge: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG

    configure_logging(settings)
    if args.command == "check":
        return check_command(settings)
    from bridge.server import serve as run_server

    run_server(settings)
    return 0


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def check_command(settings: Settings) -> int:
    """Print what the bridge would run with and whether Redis and Kratos answer."""
    from bridge.app import build_store
    from bridge.kratos import KratosClient

    ok = True
    print(f"kratos public:   {settings.kratos_public_url}")
    print(f"kratos admin:    {settings.kratos_admin_url}")
    print(f"store:           {_store_label(settings)}")
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
        settings.kratos_public_url,
        settings.kratos_admin_url,
        settings.session_cookie,
        settings.kratos_timeout,
    )
    problem = kratos.ready()
    print(f"kratos:          {'ok' if problem is None else 'FAILED (' + problem + ')'}")
    ok = ok and problem is None
    version = kratos.version()
    print(f"kratos version:  {version or 'unknown (admin API not reachable)'}")
    return 0 if ok else EXIT_UNHEALTHY


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

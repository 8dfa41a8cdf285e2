"""The host /auth judges, through the real nginx with config/nginx/bridge.conf, in front of
the real bridge, Kratos and Redis: nginx picks its server (and the app's backend) by the host
of an absolute-form request line, while the shipped config builds ``X-Original-URL`` from the
``Host`` header. Requests are written on a raw socket, since HTTP clients never send an
absolute-form request line or a ``Host`` of their own beside one.

The rules name hosts: ``admin.example.test`` is denied, ``/account`` needs a session, and
everything else is public, as on a site whose only closed door is its admin host."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from bridge.pipeline.redirects import MAX_REDIRECT, with_query
from tests.conftest import SECRET
from tests.support.harness import BridgeServer
from tests.support.proxies import ROOT, Addresses, RunningProxy, start_proxy, start_upstream

RULES = """\
default: public
rules:
  - id: admin
    match: { host: admin.example.test }
    access: deny
  - id: account
    match: { path: /account }
    access: authenticated
"""
SHIPPED = ROOT / "config" / "nginx" / "bridge.conf"
ROUTED_HOST_LINE = "proxy_set_header X-Forwarded-Host $host;"
BROWSER = (
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    "Sec-Fetch-Mode: navigate\r\n"
)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Site:
    bridge: BridgeServer
    addresses: Addresses
    home: Path
    kratos_public_url: str

    @contextmanager
    def nginx(self, name: str, config: str) -> Iterator[RunningProxy]:
        """nginx with ``config`` (a bridge.conf) as its site, stopped when done."""
        config_dir = self.home / name
        config_dir.mkdir()
        (config_dir / "bridge.conf").write_text(config)
        proxy = start_proxy("nginx", self.addresses, self.home / f"{name}-run", config_dir)
        try:
            yield proxy
        finally:
            proxy.stop()


def send(proxy: RunningProxy, request_line: str, headers: str) -> Answer:
    """One request written as given, ``Connection: close``; the answer read to its end."""
    raw = f"{request_line} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n".encode("latin-1")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), fields, body)


def reached_app(answer: Answer) -> bool:
    """Whether tests/support/echo_upstream.py answered: it echoes the request as JSON."""
    if answer.status != 200:
        return False
    return "headers" in json.loads(answer.body)


@pytest.fixture(scope="module")
def site(kratos, redis_server, workdir) -> Iterator[Site]:
    home = workdir / "nginx-host"
    home.mkdir()
    (home / "rules.yml").write_text(RULES)
    bridge = BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": "nginx-host:",
            "BRIDGE_WORKERS": "1",
            "BRIDGE_RULES_FILE": str(home / "rules.yml"),
            "BRIDGE_RETURN_TO_ORIGINS": "http://app.example.test",
        },
        workdir,
    )
    upstream_url, stop_upstream = start_upstream()
    try:
        yield Site(
            bridge, Addresses(bridge.url, upstream_url, kratos.public_url), home, kratos.public_url
        )
    finally:
        stop_upstream()
        bridge.stop()


@pytest.fixture(scope="module")
def shipped(site) -> Iterator[RunningProxy]:
    with site.nginx("shipped", SHIPPED.read_text()) as proxy:
        yield proxy


def test_the_rules_see_the_host_nginx_routes_an_absolute_form_request_by(shipped):
    assert reached_app(send(shipped, "GET /secret", "Host: public.example.test\r\n"))
    assert send(shipped, "GET /secret", "Host: admin.example.test\r\n").status == 403
    # nginx routes by the request line's host, and builds X-Original-URL from Host.
    confused = send(
        shipped, "GET http://admin.example.test/secret", "Host: public.example.test\r\n"
    )
    assert confused.status == 403
    assert not reached_app(confused)
    same = send(shipped, "GET http://public.example.test/secret", "Host: public.example.test\r\n")
    assert reached_app(same)


def test_a_host_header_with_an_empty_port_is_refused(shipped):
    """``Host: http:`` and ``//admin.example.test/secret`` make X-Original-URL
    ``http://http://admin.example.test/secret``: not host ``http`` with a public path (an
    app resolving its request target against ``http://`` + Host reads admin.example.test)."""
    answer = send(shipped, "GET //admin.example.test/secret", "Host: http:\r\n")
    assert answer.status == 403
    assert not reached_app(answer)
    assert send(shipped, "GET /secret", "Host: public.example.test:\r\n").status == 403


def test_a_config_without_the_routed_host_fails_closed(site):
    """nginx configured as the docs once allowed, without ``X-Forwarded-Host``: the
    absolute-form request is refused, not judged by the host the client chose."""
    config = SHIPPED.read_text()
    assert ROUTED_HOST_LINE in config
    without = "\n".join(line for line in config.splitlines() if ROUTED_HOST_LINE not in line)
    with site.nginx("without-routed-host", without) as proxy:
        confused = send(
            proxy, "GET http://admin.example.test/secret", "Host: public.example.test\r\n"
        )
        assert confused.status == 403
        assert not reached_app(confused)
        assert not reached_app(send(proxy, "GET /secret", "Host: public.example.test\r\n"))


def test_the_shipped_config_redirects_a_browser_with_the_longest_login_url(site, shipped):
    """Every 401 of /auth carries the login URL in X-Bridge-Redirect, and a browser
    navigation's in Location too: the longest URL kept with its return_to still fits
    nginx's default buffer for the auth answer's headers (else nginx answers 500)."""
    login = f"{site.kratos_public_url}/self-service/login/browser"
    target = "/account?q="
    target += "a" * (
        MAX_REDIRECT - len(with_query(login, return_to="http://app.example.test" + target))
    )
    original = "http://app.example.test" + target
    assert len(with_query(login, return_to=original)) == MAX_REDIRECT
    answer = send(shipped, f"GET {target}", f"Host: app.example.test\r\n{BROWSER}")
    assert answer.status == 302, shipped.log()
    assert parse_qs(urlsplit(answer.headers["location"]).query)["return_to"] == [original]
    api = send(shipped, f"GET {target}", "Host: app.example.test\r\nAccept: application/json\r\n")
    assert api.status == 401
    assert parse_qs(urlsplit(api.headers["x-bridge-redirect"]).query)["return_to"] == [original]


def test_a_config_reading_only_x_bridge_redirect_sends_browsers_to_the_login(site):
    """An nginx config written from "every 401 carries the URL in X-Bridge-Redirect":
    it redirects every 401 to ``$upstream_http_x_bridge_redirect``."""
    config = SHIPPED.read_text()
    start = config.index("    location @bridge_unauthorized {")
    end = config.index("\n    }\n", start) + len("\n    }\n")
    redirect_all = (
        "    location @bridge_unauthorized {\n        return 302 $bridge_redirect;\n    }\n"
    )
    with site.nginx(
        "x-bridge-redirect-only", config[:start] + redirect_all + config[end:]
    ) as proxy:
        answer = send(proxy, "GET /account", f"Host: app.example.test\r\n{BROWSER}")
        assert answer.status == 302
        location = answer.headers.get("location", "")
        assert location.startswith(f"{site.kratos_public_url}/self-service/login/browser?")
        assert parse_qs(urlsplit(location).query)["return_to"] == [
            "http://app.example.test/account"
        ]

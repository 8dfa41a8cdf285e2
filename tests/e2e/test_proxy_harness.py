"""Self-test of tests/support/proxies.py: each real proxy, started by the harness from a minimal
forward-auth config written here (same placeholders as the shipped configs), with a
stand-in bridge and tests/support/echo_upstream.py behind it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support.harness import free_port
from tests.support.proxies import (
    ENVOY_KINDS,
    KINDS,
    ROOT,
    Addresses,
    RunningProxy,
    _start_envoy,
    rewrite,
    start_proxy,
    start_upstream,
)

NGINX_SITE = """\
server {
    listen 8080;
    location = /_auth {
        internal;
        proxy_pass http://bridge:4480/auth;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
    }
    location = /login {
        return 302 http://127.0.0.1:4433/self-service/login/browser;
    }
    location / {
        auth_request /_auth;
        auth_request_set $user_id $upstream_http_x_user_id;
        proxy_set_header X-User-Id $user_id;
        proxy_pass http://demo:5000;
    }
}
"""

CADDYFILE = """\
:8080 {
	redir /login http://127.0.0.1:4433/self-service/login/browser 302
	route {
		forward_auth bridge:4480 {
			uri /auth
			copy_headers X-User-Id
		}
		reverse_proxy demo:5000
	}
}
"""

TRAEFIK_STATIC = """\
entryPoints:
  web:
    address: ":8080"
providers:
  file:
    filename: /etc/traefik/dynamic.yml
"""

TRAEFIK_DYNAMIC = """\
http:
  routers:
    app:
      entryPoints: [web]
      rule: PathPrefix(`/`)
      middlewares: [auth]
      service: app
    login:
      entryPoints: [web]
      rule: Path(`/login`)
      priority: 100
      middlewares: [to-kratos]
      service: app
  middlewares:
    auth:
      forwardAuth:
        address: http://bridge:4480/auth
        authResponseHeaders: [X-User-Id]
    to-kratos:
      redirectRegex:
        regex: ".*"
        replacement: http://127.0.0.1:4433/self-service/login/browser
  services:
    app:
      loadBalancer:
        servers:
          - url: http://demo:5000
"""

CONFIGS = {
    "nginx": {"bridge.conf": NGINX_SITE},
    "caddy": {"Caddyfile": CADDYFILE},
    "traefik": {"traefik.yml": TRAEFIK_STATIC, "dynamic.yml": TRAEFIK_DYNAMIC},
}


class StandInBridge(BaseHTTPRequestHandler):
    """200 with X-User-Id: u-1 for a request carrying the cookie ok=1, else 401."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        allowed = "ok=1" in [c.strip() for c in self.headers.get("Cookie", "").split(";")]
        body = b"" if allowed else b"no session"
        self.send_response(200 if allowed else 401)
        if allowed:
            self.send_header("X-User-Id", "u-1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def addresses() -> Iterator[Addresses]:
    bridge = ThreadingHTTPServer(("127.0.0.1", 0), StandInBridge)
    bridge.daemon_threads = True
    threading.Thread(target=bridge.serve_forever, daemon=True).start()
    upstream_url, stop_upstream = start_upstream()
    yield Addresses(
        bridge_url=f"http://127.0.0.1:{bridge.server_address[1]}",
        upstream_url=upstream_url,
        kratos_public_url=f"http://127.0.0.1:{free_port()}",  # only redirected to
    )
    stop_upstream()
    bridge.shutdown()
    bridge.server_close()


@pytest.fixture(params=KINDS)
def proxy(request, addresses: Addresses, tmp_path: Path) -> Iterator[RunningProxy]:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name, text in CONFIGS[request.param].items():
        (config_dir / name).write_text(text)
    running = start_proxy(request.param, addresses, tmp_path / "home", config_dir=config_dir)
    yield running
    running.stop()


def test_the_bridge_decides_and_its_headers_reach_the_upstream(proxy: RunningProxy, addresses):
    allowed = httpx.get(
        proxy.url + "/some/path?q=1",
        headers={"Cookie": "ok=1", "X-User-Id": "forged"},
        timeout=10,
    )
    assert allowed.status_code == 200, proxy.log()
    seen = allowed.json()
    assert seen["path"] == "/some/path?q=1"
    assert seen["headers"]["x-user-id"] == ["u-1"]

    denied = httpx.get(proxy.url + "/some/path", headers={"X-User-Id": "u-1"}, timeout=10)
    assert denied.status_code == 401, proxy.log()
    assert "x-user-id" not in denied.text

    login = httpx.get(proxy.url + "/login", timeout=10)
    assert login.status_code == 302
    assert login.headers["Location"] == (
        addresses.kratos_public_url + "/self-service/login/browser"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_rewrite_refuses_a_config_without_a_placeholder(kind: str, addresses: Addresses):
    name = "dynamic.yml" if kind == "traefik" else next(iter(CONFIGS[kind]))
    text = CONFIGS[kind][name]
    assert "127.0.0.1:4433" not in rewrite(text, kind, addresses, 1234)
    for placeholder in ("bridge:4480", "demo:5000"):
        with pytest.raises(ValueError, match="placeholder"):
            rewrite(text.replace(placeholder, "elsewhere:1"), kind, addresses, 1234)
    if kind == "traefik":
        text = CONFIGS[kind]["traefik.yml"]
        assert '"127.0.0.1:1234"' in rewrite(text, kind, addresses, 1234)
    listen = {"nginx": "listen 8080", "caddy": ":8080 {", "traefik": '":8080"'}[kind]
    with pytest.raises(ValueError, match="listen"):
        rewrite(text.replace(listen, listen.replace("8080", "8081")), kind, addresses, 1234)


@pytest.mark.parametrize("kind", ["envoy", "envoy-grpc"])
def test_an_envoy_config_without_a_placeholder_is_refused(
    kind: str, addresses: Addresses, tmp_path
):
    """Envoy's shipped config, with one placeholder address changed: the harness names it
    instead of starting an Envoy that sends checks elsewhere."""
    shipped = ROOT / "config" / "envoy" / ENVOY_KINDS[kind]
    grpc = Addresses(**{**vars(addresses), "bridge_grpc": "127.0.0.1:1"})
    text = shipped.read_text()
    # Each placeholder, and what the refusal names once its port is changed (1 in front).
    placeholders = {
        "bridge, port_value: 4480": "bridge:14480",
        "demo, port_value: 5000": "demo:15000",
        "port_value: 8080": "port 8080",
    }
    if kind == "envoy-grpc":
        placeholders["bridge, port_value: 4482"] = "bridge:14482"
    for placeholder, named in placeholders.items():
        assert placeholder in text
        broken = tmp_path / f"{named.replace(':', '-').replace(' ', '-')}.yaml"
        broken.write_text(
            text.replace(placeholder, placeholder.replace("port_value: ", "port_value: 1"))
        )
        home = tmp_path / named.replace(":", "-").replace(" ", "-")
        home.mkdir()
        with pytest.raises(ValueError, match=named):
            _start_envoy(broken, grpc, home, 1234)

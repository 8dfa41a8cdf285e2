"""The compose stack and the proxy configs stay in step with the bridge: the bridge's
compose settings load, and every proxy config passes on (and strips from clients) every
header the bridge sends to the app."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
import yaml

from bridge.config import load_settings
from bridge.pipeline.tokens import generate_key
from tests.support.harness import free_port, stop_process, wait_until
from tests.support.proxies import ROOT

COMPOSE = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())


def _compose_settings(tmp_path):
    env = dict(COMPOSE["services"]["bridge"]["environment"])
    generate_key(tmp_path / "jwt")
    env["BRIDGE_RULES_FILE"] = str(ROOT / "config" / "rules.yml")
    env["BRIDGE_SECRET_FILE"] = str(ROOT / "compose" / "secrets" / "bridge_secret.example")
    env["BRIDGE_JWT_KEYS_DIR"] = str(tmp_path / "jwt")
    secrets_dir = ROOT / "compose" / "secrets"
    env["BRIDGE_ADMIN_TOKEN_FILE"] = str(secrets_dir / "bridge_admin_token.example")
    return load_settings(env)


def test_compose_admin_listener_needs_its_token_and_is_published_on_loopback(tmp_path):
    settings = _compose_settings(tmp_path)
    assert settings.admin_host == "0.0.0.0"
    assert settings.admin_token is not None and len(settings.admin_token) >= 32
    bridge = COMPOSE["services"]["bridge"]
    assert bridge["ports"] == [f"127.0.0.1:{settings.admin_port}:{settings.admin_port}"]
    assert "bridge_admin_token" in bridge["secrets"]


def test_compose_bridge_settings_load_with_the_shipped_rules(tmp_path):
    settings = _compose_settings(tmp_path)
    mounts = COMPOSE["services"]["bridge"]["volumes"]
    assert "../config/rules.yml:/etc/bridge/rules.yml:ro" in mounts
    assert settings.jwt_header == "X-Bridge-Jwt"
    proxy_ports = [COMPOSE["services"][name]["ports"][0] for name in ("proxy", "nginx")]
    for published in proxy_ports:
        origin = "http://" + published.rsplit(":", 1)[0]
        assert any(o.port == int(origin.rsplit(":", 1)[1]) for o in settings.return_to_origins)


def test_compose_demo_wants_the_audience_the_bridge_gives_it(tmp_path):
    settings = _compose_settings(tmp_path)
    demo = COMPOSE["services"]["demo"]["environment"]
    assert settings.jwt_audience is not None
    assert demo["KRATOS_SESSION_JWT_AUDIENCE"] == settings.jwt_audience
    assert (
        f'KRATOS_SESSION_JWT_AUDIENCE="{settings.jwt_audience}"'
        in (ROOT / "compose" / "demo" / "app.py").read_text()
    )


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        ("config/nginx/bridge.conf", r"proxy_set_header {name} \$"),
        ("config/caddy/Caddyfile", r"request_header {name} \{{rp\.header\.{name}\}}"),
        ("config/traefik/dynamic.yml", r"- {name}\n"),
        ("config/envoy/envoy.yaml", r"remove: {lower}\n"),
        ("config/envoy/envoy.yaml", r"exact: {lower}\n"),
        ("config/envoy/envoy-grpc.yaml", r"remove: {lower}\n"),
    ],
)
def test_every_proxy_config_handles_every_header_the_bridge_sends(tmp_path, path, pattern):
    settings = _compose_settings(tmp_path)
    names = [name for name, _ in settings.identity_headers] + [settings.jwt_header]
    text = (ROOT / path).read_text()
    for name in names:
        expected = pattern.format(name=re.escape(name), lower=re.escape(name.lower()))
        assert re.search(expected, text), f"{path} does not handle {name}"


def test_demo_app_links_the_rule_pages_and_shows_the_headers():
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "compose" / "demo" / "app.py")],
        env={"DEMO_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url).status_code == 200, 10, "demo")
        page = httpx.get(url + "/", headers={"X-User-Id": "<u-1>"}).text
        for href in ('href="/aal2"', 'href="/recent"', 'href="/public/"'):
            assert href in page
        assert "&lt;u-1&gt;" in page and "<u-1>" not in page
    finally:
        stop_process(demo)

"""Kratos as Ory Network serves it: the admin API behind an API key, and rate limits.

Ory Network itself cannot run here; the real Kratos stands behind a real nginx that plays
the two parts of it the bridge meets (``OryStandIn``):

- *Ory Network's API-key check*: every ``/admin/`` request without
  ``Authorization: Bearer <the key>`` is answered ``401``, as Ory Network answers one
  without a project API key. Revocation, the session detail, the web hooks and
  ``check`` work with ``BRIDGE_KRATOS_ADMIN_TOKEN`` and fail naming it without.
- *Ory Network's rate limits*: one admin port answers ``429`` with ``Retry-After``, and
  one public port adds ``x-ratelimit-remaining: 0`` to Kratos's answers.

Its public port logs the ``Authorization`` header of every request, so that the test
can see the key never reaches a public call; the admin ports log no header at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bridge.config import load_settings
from bridge.errors import KratosRateLimited
from bridge.pipeline.credentials import extract
from bridge.web.app import create_app
from bridge.web.request import HeaderView
from tests.conftest import SECRET
from tests.support import harness
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, Kratos, RedisServer, forwarded
from tests.support.proxies import _binary, _wait_for_http

API_KEY = "ory_pat_stand-in-" + "k" * 24
ADMIN_TOKEN = "admin-token-for-tests-" + "a" * 20
HOOK_SECRET = "hook-secret-for-tests-" + "h" * 20
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HOOK = {"X-Bridge-Hook-Key": HOOK_SECRET}
RETRY_AFTER = 30


@dataclass
class OryStandIn:
    public_url: str  # Kratos's public API; logs each request's Authorization header
    admin_url: str  # Kratos's admin API behind the API-key check
    limited_admin_url: str  # /admin/ answered 429 (Retry-After: RETRY_AFTER)
    nearly_used_public_url: str  # Kratos's public API with x-ratelimit-remaining: 0
    home: Path

    def public_log(self) -> str:
        return (self.home / "public.log").read_text()

    def admin_log(self) -> str:
        return (self.home / "admin.log").read_text()


_SERVERS = ("public", "admin", "limited_admin", "nearly_used_public")
_PUBLIC_LOG = "log_format public '$request_method $uri authorization=\"$http_authorization\"';"
_ADMIN_LOG = "log_format admin '$server_port $request_method $uri $status';"
_REFUSED = (
    'return 401 \'{"error":{"code":401,"status":"Unauthorized",'
    '"message":"the API key is missing or not valid"}}\';'
)


def _nginx_config(kratos: Kratos, home: Path, ports: dict[str, int]) -> str:
    temp = " ".join(
        f"{name}_temp_path {home / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    key_check = f'if ($http_authorization != "Bearer {API_KEY}") {{ {_REFUSED} }}'
    admin_log = f"access_log {home / 'admin.log'} admin;"
    return f"""{user}daemon off;
worker_processes 1;
pid {home / "nginx.pid"};
error_log {home / "error.log"} info;
events {{}}
http {{
  {temp}
  {_PUBLIC_LOG}
  {_ADMIN_LOG}
  server {{
    listen 127.0.0.1:{ports["public"]};
    access_log {home / "public.log"} public;
    location / {{ proxy_pass {kratos.public_url}; }}
  }}
  server {{
    listen 127.0.0.1:{ports["admin"]};
    {admin_log}
    location /admin/ {{
      default_type application/json;
      {key_check}
      proxy_pass {kratos.admin_url};
    }}
    location / {{ proxy_pass {kratos.admin_url}; }}
  }}
  server {{
    listen 127.0.0.1:{ports["limited_admin"]};
    {admin_log}
    location /admin/ {{
      add_header Retry-After {RETRY_AFTER} always;
      add_header x-ratelimit-remaining 0 always;
      return 429;
    }}
    location / {{ proxy_pass {kratos.admin_url}; }}
  }}
  server {{
    listen 127.0.0.1:{ports["nearly_used_public"]};
    access_log off;
    location / {{
      add_header x-ratelimit-limit "10, 10;w=1, 300;w=60" always;
      add_header x-ratelimit-remaining 0 always;
      add_header x-ratelimit-reset {RETRY_AFTER} always;
      proxy_pass {kratos.public_url};
    }}
  }}
}}
"""


@pytest.fixture(scope="module")
def ory(kratos: Kratos, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OryStandIn]:
    home = tmp_path_factory.mktemp("ory-stand-in")
    ports = {name: harness.free_port() for name in _SERVERS}
    (home / "nginx.conf").write_text(_nginx_config(kratos, home, ports))
    nginx = str(_binary("nginx"))
    process = subprocess.Popen(
        [nginx, "-p", str(home), "-e", str(home / "error.log"), "-c", str(home / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    _wait_for_http(url["public"] + "/health/ready", process, time.monotonic() + 30, "nginx")
    yield OryStandIn(
        url["public"], url["admin"], url["limited_admin"], url["nearly_used_public"], home
    )
    harness.stop_process(process)


@pytest.fixture
def start_bridge(
    ory: OryStandIn, redis_server: RedisServer, workdir: Path, prefix: str
) -> Iterator[Callable[..., BridgeServer]]:
    started: list[BridgeServer] = []

    def start(**env: str) -> BridgeServer:
        values = {
            "BRIDGE_KRATOS_PUBLIC_URL": ory.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": ory.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": prefix,
            "BRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
            "BRIDGE_HOOK_SECRET": HOOK_SECRET,
            "BRIDGE_WORKERS": "1",
            "BRIDGE_LOG_LEVEL": "debug",
            **env,
        }
        server = BridgeServer({k: v for k, v in values.items() if v != ""}, workdir)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _signed_in(kratos: Kratos) -> tuple[str, str]:
    """A new user's session token and session id."""
    token = flows.register(kratos).token
    return token, flows.session_of(kratos, token=token).json()["id"]


def _hook(bridge: BridgeServer, session_id: str) -> httpx.Response:
    """The body ``bridge-hook.jsonnet`` makes for a password login."""
    body = {"session": {"id": session_id, "aal": "aal1", "methods": 1}}
    return httpx.post(bridge.url + "/hooks/kratos/login", json=body, headers=HOOK, timeout=10)


def _admin(bridge: BridgeServer, method: str, path: str) -> httpx.Response:
    return httpx.request(method, bridge.admin_url + path, headers=ADMIN, timeout=10)


def _forward_auth(bridge: BridgeServer, token: str) -> int:
    headers = {"X-Session-Token": token, **forwarded("/")}
    return httpx.get(bridge.url + "/forward-auth", headers=headers).status_code


def test_with_the_api_key_revocation_the_detail_and_the_hooks_work(
    start_bridge, ory: OryStandIn, kratos: Kratos, tmp_path: Path
):
    key_file = tmp_path / "kratos-admin-token"
    key_file.write_text(API_KEY + "\n")
    bridge = start_bridge(BRIDGE_KRATOS_ADMIN_TOKEN_FILE=str(key_file))
    token, session_id = _signed_in(kratos)
    public_start = len(ory.public_log().splitlines())
    admin_start = len(ory.admin_log().splitlines())
    assert _forward_auth(bridge, token) == 200

    hooked = _hook(bridge, session_id)
    assert hooked.status_code == 200, hooked.text
    assert hooked.json()["session_id"] == session_id

    shown = _admin(bridge, "GET", f"/admin/sessions/{session_id}")
    assert shown.status_code == 200, shown.text
    assert shown.json()["active_in_kratos"] is True

    revoked = _admin(bridge, "DELETE", f"/admin/sessions/{session_id}")
    assert revoked.status_code == 200, revoked.text
    assert flows.session_of(kratos, token=token).status_code == 401  # revoked in Kratos
    assert _forward_auth(bridge, token) == 401

    # Each admin call passed the key check; the key itself is in no log and no public call.
    port = ory.admin_url.rsplit(":", 1)[1]
    admin_calls = [
        line for line in ory.admin_log().splitlines()[admin_start:] if line.startswith(port)
    ]
    assert {line.split()[1] for line in admin_calls} == {"GET", "DELETE"}
    assert all(line.endswith((" 200", " 204")) for line in admin_calls), admin_calls
    public_calls = ory.public_log().splitlines()[public_start:]
    whoamis = [line for line in public_calls if "/sessions/whoami" in line]
    assert whoamis and all(line.endswith('authorization="-"') for line in whoamis), whoamis
    assert API_KEY not in ory.public_log()
    assert API_KEY not in bridge.log()


@pytest.mark.parametrize(
    ("given", "problem"),
    [("", "needs an API key"), ("ory_pat_not-the-key-" + "x" * 20, "does not accept")],
)
def test_without_the_api_key_each_fails_naming_the_setting(
    start_bridge, kratos: Kratos, given: str, problem: str
):
    bridge = start_bridge(BRIDGE_KRATOS_ADMIN_TOKEN=given)
    token, session_id = _signed_in(kratos)

    hooked = _hook(bridge, session_id)
    assert hooked.status_code == 503
    assert "BRIDGE_KRATOS_ADMIN_TOKEN" in hooked.json()["message"]

    for method in ("GET", "DELETE"):
        answer = _admin(bridge, method, f"/admin/sessions/{session_id}")
        assert answer.status_code == 502
        assert answer.json()["error"] == "kratos_unavailable"
        assert "BRIDGE_KRATOS_ADMIN_TOKEN" in answer.json()["message"]
        assert problem in answer.json()["message"]
    assert flows.session_of(kratos, token=token).status_code == 200  # nothing was revoked

    assert "BRIDGE_KRATOS_ADMIN_TOKEN" in bridge.log()  # the hook's failure, for operators
    if given:
        assert given not in bridge.log()


def _check(env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", "check"],
        env={**full, "BRIDGE_LOG_LEVEL": "debug", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_reports_the_admin_api_refusing_the_bridge(ory: OryStandIn):
    urls = {"BRIDGE_KRATOS_PUBLIC_URL": ory.public_url, "BRIDGE_KRATOS_ADMIN_URL": ory.admin_url}

    done = _check({**urls, "BRIDGE_KRATOS_ADMIN_TOKEN": API_KEY})
    assert done.returncode == 0, done.stdout
    assert f"kratos admin:    {ory.admin_url} (with BRIDGE_KRATOS_ADMIN_TOKEN)\n" in done.stdout
    version = next(line for line in done.stdout.splitlines() if line.startswith("kratos version"))
    assert not version.endswith(")"), version  # neither FAILED (...) nor unknown (...)
    assert API_KEY not in done.stdout + done.stderr  # the debug log included

    done = _check(urls)
    assert done.returncode == 1
    refused = (
        "kratos version:  FAILED (Kratos admin API answered 401: it needs an API key: set "
        "BRIDGE_KRATOS_ADMIN_TOKEN or BRIDGE_KRATOS_ADMIN_TOKEN_FILE)\n"
    )
    assert refused in done.stdout


def test_a_429_from_the_admin_api_holds_admin_calls_until_retry_after(
    start_bridge, ory: OryStandIn, kratos: Kratos
):
    """Each admin client (the admin listener's, the web hooks') asks once, is told to
    come back in ``RETRY_AFTER`` seconds, and until then answers without asking."""
    bridge = start_bridge(
        BRIDGE_KRATOS_ADMIN_URL=ory.limited_admin_url, BRIDGE_KRATOS_ADMIN_TOKEN=API_KEY
    )
    _, session_id = _signed_in(kratos)
    port = ory.limited_admin_url.rsplit(":", 1)[1]

    def asked() -> int:
        return ory.admin_log().count(f"{port} GET /admin/")

    before = asked()
    for _ in range(2):
        shown = _admin(bridge, "GET", f"/admin/sessions/{session_id}")
        assert shown.status_code == 502
        assert "rate limiting the bridge: retry in" in shown.json()["message"]
        assert asked() == before + 1
    for _ in range(2):
        hooked = _hook(bridge, session_id)
        assert hooked.status_code == 429
        assert hooked.json()["error"] == "kratos_rate_limited"
        assert 0 < int(hooked.headers["Retry-After"]) <= RETRY_AFTER
        assert asked() == before + 2


def test_a_429_one_admin_client_sees_holds_the_others_in_its_process(
    ory: OryStandIn, kratos: Kratos, redis_server: RedisServer, prefix: str
):
    """The web hooks' read, sliding sessions and the check of a whoami ``401`` share the
    process's admin reader: after the hooks are told ``429``, the ``401`` check's question
    (``is_active``) is not sent until ``Retry-After``."""
    app = create_app(
        load_settings(
            {
                "BRIDGE_KRATOS_PUBLIC_URL": ory.public_url,
                "BRIDGE_KRATOS_ADMIN_URL": ory.limited_admin_url,
                "BRIDGE_KRATOS_ADMIN_TOKEN": API_KEY,
                "BRIDGE_REDIS_URL": redis_server.url,
                "BRIDGE_SECRET": SECRET,
                "BRIDGE_KEY_PREFIX": prefix,
                "BRIDGE_HOOK_SECRET": HOOK_SECRET,
            }
        )
    )
    _, session_id = _signed_in(kratos)
    port = ory.limited_admin_url.rsplit(":", 1)[1]

    def asked() -> int:
        return ory.admin_log().count(f"{port} GET /admin/")

    try:
        before = asked()
        body = {"session": {"id": session_id, "aal": "aal1", "methods": 1}}
        hooked = app.test_client().post("/hooks/kratos/login", json=body, headers=HOOK)
        assert hooked.status_code == 429
        assert asked() == before + 1
        with pytest.raises(KratosRateLimited):
            app.extensions["bridge"].admin_reads.is_active(session_id, 5.0)
        assert asked() == before + 1
    finally:
        app.extensions["bridge"].close()


def test_a_nearly_used_rate_limit_holds_refresh_ahead_back(
    make_client, ory: OryStandIn, kratos: Kratos
):
    """Refresh-ahead keeps a busy session answered from memory (tests/integration/
    test_refresh.py); with Ory Network's budget nearly used it waits, and the copy is
    left to go stale: the next request asks Kratos on its own."""
    revalidate_after = 1.0
    client = make_client(
        kratos,
        BRIDGE_KRATOS_PUBLIC_URL=ory.nearly_used_public_url,
        BRIDGE_REVALIDATE_AFTER=str(revalidate_after),
    )
    mirror = client.application.extensions["bridge"].mirror
    user = flows.register(kratos)
    credential = extract(HeaderView([("x-session-token", user.token)]), "ory_kratos_session")
    mirror.resolve(credential)
    calls = kratos.whoami_calls()

    deadline = time.monotonic() + 2 * revalidate_after
    answers = []
    while time.monotonic() < deadline:
        known = mirror.from_memory(credential)
        answers.append(known)
        time.sleep(0.02)
    assert None in answers  # the copy went stale: nobody refreshed it
    assert kratos.whoami_calls() == calls
    assert client.get("/auth", headers={"X-Session-Token": user.token}).status_code == 200
    assert kratos.whoami_calls() == calls + 1

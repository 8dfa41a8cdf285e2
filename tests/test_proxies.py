"""The shipped proxy configs, run for real: nginx from Debian with config/nginx/bridge.conf."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests import kratos_flows as flows
from tests.conftest import SECRET
from tests.harness import BridgeServer, free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[1]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture(scope="module")
def stack(kratos_strict, redis_server, workdir):
    """nginx -> bridge (Redis) -> Kratos, with the compose demo app as the upstream."""
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed; run the README test command")
    bridge = BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos_strict.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos_strict.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": "proxy:",
            "BRIDGE_WORKERS": "1",
        },
        workdir,
    )
    demo_port, nginx_port = free_port(), free_port()
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "compose" / "demo" / "app.py")],
        env={"DEMO_PORT": str(demo_port), "DEMO_WHOAMI_URL": bridge.url + "/whoami"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    site = (ROOT / "config" / "nginx" / "bridge.conf").read_text()
    site = (
        site.replace("listen 8080;", f"listen 127.0.0.1:{nginx_port};")
        .replace("http://bridge:4480", bridge.url)
        .replace("http://demo:5000", f"http://127.0.0.1:{demo_port}")
        .replace("http://127.0.0.1:4433", kratos_strict.public_url)
    )
    home = workdir / "nginx"
    home.mkdir(exist_ok=True)
    (home / "site.conf").write_text(site)
    (home / "nginx.conf").write_text(
        f"daemon off; pid {home}/nginx.pid; error_log {home}/error.log;\n"
        "events {}\n"
        f"http {{ access_log off; client_body_temp_path {home}/body; "
        f"proxy_temp_path {home}/proxy; include {home}/site.conf; }}\n"
    )
    nginx = subprocess.Popen([NGINX, "-p", str(home), "-c", str(home / "nginx.conf")])
    url = f"http://127.0.0.1:{nginx_port}"
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{demo_port}/").status_code == 200, 10, "demo")
    wait_until(lambda: httpx.get(url).status_code in (200, 302), 10, "nginx")
    yield url
    for process in (nginx, demo):
        stop_process(process)
    bridge.stop()


def test_no_session_is_redirected_to_login_with_return_to(stack, kratos_strict):
    response = httpx.get(stack + "/reports?year=2026&q=a")
    assert response.status_code == 302
    assert response.headers["Location"] == (
        f"{kratos_strict.public_url}/self-service/login/browser"
        f"?return_to=http%3A%2F%2F{stack[7:].replace(':', '%3A')}%2Freports%3Fyear%3D2026%26q%3Da"
    )


def test_session_reaches_the_app_and_forged_headers_do_not(stack, kratos_strict):
    user = flows.register(kratos_strict)
    cookie = flows.browser_login(kratos_strict, user)
    response = httpx.get(
        stack + "/",
        headers={
            "Cookie": f"ory_kratos_session={cookie}",
            "X-User-Id": "forged-admin",
            "X-User-Email": "root@forged.test",
        },
    )
    assert response.status_code == 200
    page = response.text
    assert user.identity_id in page
    assert user.email in page
    assert "forged" not in page
    assert "200 OK" in page  # the demo's own call to the bridge's /whoami


def test_identity_header_the_bridge_omits_cannot_be_forged(stack, kratos_strict):
    """A non-ASCII email is not sent as a header; a client's own X-User-Email must not
    stand in for it."""
    user = flows.register(kratos_strict, local_part="jürgen")
    response = httpx.get(
        stack + "/",
        headers={"X-Session-Token": user.token, "X-User-Email": "root@forged.test"},
    )
    assert response.status_code == 200
    assert user.identity_id in response.text
    assert "forged" not in response.text


def test_missing_second_factor_goes_to_the_aal2_login(stack, kratos_strict):
    user = flows.register(kratos_strict)
    flows.enable_totp(kratos_strict, user)
    token = flows.login_api(kratos_strict, user)
    response = httpx.get(stack + "/pay", headers={"X-Session-Token": token})
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(f"{kratos_strict.public_url}/self-service/login/browser?aal=aal2")
    assert "return_to=" in location

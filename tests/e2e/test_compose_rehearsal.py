"""The compose stack rehearsed for real: compose/docker-compose.yml read by Compose's own
loader, every service a process in a network namespace of its own
(tests/support/compose_rehearsal.py), and Chromium doing what compose/README.md says a
person does: sign up, add TOTP, log out, step up to aal2 on /aal2, count, be refused
/internal, log out. Through Traefik (port 8080), then nginx (the nginx profile, 8081).

Screenshots at 1280 px go to ``$BRIDGE_SCREENSHOTS_DIR`` (compose-*.png)."""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest

from tests.conftest import CHROMIUM, chromium, needs_chromium, screenshot
from tests.support.compose_rehearsal import (
    IMAGES,
    TRAEFIK_BIN,
    RehearsalFailed,
    Stack,
    image_of,
    load_project,
    running,
)
from tests.support.harness import KRATOS_BIN
from tests.support.proxies import ROOT

playwright_api = pytest.importorskip("playwright.sync_api")

COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
VIEWPORT = {"width": 1280, "height": 860}
PASSWORD = "correct-horse-battery-" + secrets.token_hex(6)
# Password hashing and Kratos's checks on a shared 2-core machine: generous, never hit.
STEP_TIMEOUT_MS = 30_000

# What each proxy answers a browser without a session once it is up: the bridge's redirect
# to log in (before Traefik has read its routes it answers 404).
ANSWERED_WHEN_UP = {"proxy": {302, 303}, "nginx": {302, 303}}

pytestmark = [
    needs_chromium,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


@pytest.fixture(scope="module")
def projects() -> dict[str, dict]:
    return {
        "default": load_project(COMPOSE_FILE),
        "nginx": load_project(COMPOSE_FILE, ("nginx",)),
    }


@pytest.fixture(scope="module")
def stack(projects, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # One run of the nginx profile: Traefik and nginx side by side, as Compose runs them.
    with running(projects["nginx"], tmp_path_factory.mktemp("compose")) as started:
        started.wait_until_answering(ANSWERED_WHEN_UP)
        yield started


@pytest.fixture(scope="module")
def browser(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    # Chromium runs where the published ports are: the namespace standing in for the machine.
    wrapper = tmp_path_factory.mktemp("chromium") / "chromium"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(stack.in_host([str(CHROMIUM)])) + ' "$@"\n')
    wrapper.chmod(0o755)
    with chromium(executable=str(wrapper)) as launched:
        yield launched


@pytest.fixture(scope="module")
def person() -> dict[str, str]:
    """Who signs up through Traefik and logs in again through nginx."""
    return {"email": f"rehearsal-{secrets.token_hex(4)}@example.com"}


def test_the_loader_reads_what_compose_runs_and_the_stand_ins_match_the_images(projects):
    default, with_nginx = projects["default"], projects["nginx"]
    assert set(with_nginx["services"]) - set(default["services"]) == {"nginx"}
    for service in with_nginx["services"].values():
        assert image_of(service) in IMAGES.values()
    # The stand-ins are the images' versions (major and minor where the tag says).
    kratos = subprocess.run([str(KRATOS_BIN), "version"], capture_output=True, text=True)
    assert "v1.3.1" in kratos.stdout + kratos.stderr
    traefik = subprocess.run([str(TRAEFIK_BIN), "version"], capture_output=True, text=True)
    assert re.search(r"Version:\s+3\.6\.", traefik.stdout)
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    assert re.search(r"v=7\.", redis.stdout), "redis:7-alpine is Redis 7"
    nginx = subprocess.run(
        [shutil.which("nginx") or "/usr/sbin/nginx", "-v"], capture_output=True, text=True
    )
    assert re.search(r"nginx/1\.", nginx.stderr), "nginx:1.27-alpine is nginx 1"


def _shot(page, shots: Path, name: str) -> None:
    screenshot(page, shots / f"compose-{name}.png", full_page=True)


def _log_in(page, email: str) -> None:
    """On the demo's login page: the password, then the second factor Kratos asks for."""
    page.locator("form[data-group=password] input[name=identifier]").fill(email)
    page.locator("form[data-group=password] input[name=password]").fill(PASSWORD)
    page.locator("form[data-group=password] button[value=password]").click()
    page.wait_for_selector("h1:text('Second factor')")


def _second_factor(page, secret: str) -> None:
    page.locator("form[data-group=totp] input[name=totp_code]").fill(pyotp.TOTP(secret).now())
    page.locator("form[data-group=totp] button[value=totp]").click()


def _row(page, name: str) -> str:
    return page.locator(f"tr:has(th:text-is('{name}')) td").inner_text()


@pytest.fixture
def page(browser) -> Iterator[object]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(STEP_TIMEOUT_MS)
    yield context.new_page()
    context.close()


def _log_out(page, pages: str) -> None:
    """The demo's logout page links to Kratos's logout, which ends on the login page."""
    page.goto(pages + "/account/logout")
    page.get_by_role("link", name="Log out", exact=True).click()
    page.wait_for_url(re.compile(re.escape(pages) + r"/account/login\?flow="))


def test_through_traefik_sign_up_add_totp_step_up_count_and_log_out(
    stack: Stack, page, shots: Path, person: dict[str, str]
):
    site = stack.published()["proxy"]
    # No session: the proxy sends the browser to Kratos, Kratos to the demo's login.
    page.goto(site + "/")
    assert page.url.startswith(site + "/account/login?flow=")
    _shot(page, shots, "01-login")
    page.get_by_role("link", name="No account yet? Sign up").click()
    page.locator("input[name='traits.email']").fill(person["email"])
    page.locator("button[value=profile]").click()
    page.locator("input[name=password]").fill(PASSWORD)
    _shot(page, shots, "02-sign-up")
    page.locator("button[value=password]").click()
    page.wait_for_url(site + "/")
    assert _row(page, "AAL") == "aal1"
    assert person["email"] in _row(page, "traits")
    assert _row(page, "methods") == "password"
    _shot(page, shots, "03-home-aal1")

    # A second factor: the settings page shows the QR code and its secret.
    page.get_by_role("link", name=re.compile("account settings")).click()
    page.wait_for_selector("img[alt='Authenticator app QR code']")
    person["secret"] = page.locator("code#totp_secret_key").inner_text().strip()
    _shot(page, shots, "04-settings-totp")
    page.locator("form[data-group=totp] input[name=totp_code]").fill(
        pyotp.TOTP(person["secret"]).now()
    )
    page.locator("form[data-group=totp] button[value=totp]").click()
    page.wait_for_selector("form[data-group=totp] button[name=totp_unlink]")

    # Log out, then /aal2: log in with the password, and Kratos asks for the code.
    _log_out(page, site)
    page.goto(site + "/aal2")
    assert "/account/login?flow=" in page.url
    _log_in(page, person["email"])
    _shot(page, shots, "05-second-factor")
    _second_factor(page, person["secret"])
    page.wait_for_url(site + "/aal2")
    assert _row(page, "AAL") == "aal2"
    assert _row(page, "methods") == "password, totp"
    _shot(page, shots, "06-aal2")

    # The counter: a form with the session's CSRF token.
    page.get_by_role("button", name="count").click()
    page.wait_for_url(site + "/")
    page.get_by_role("button", name="count").click()
    # The second post redirects to the page it came from: wait for the new count.
    playwright_api.expect(page.locator("h2", has_text="Counter:")).to_have_text("Counter: 2")
    _shot(page, shots, "07-counter")

    refused = page.goto(site + "/internal")
    assert refused is not None and refused.status == 403
    public = page.goto(site + "/public/")
    assert public is not None and public.status == 200

    _log_out(page, site)
    page.goto(site + "/")
    assert "/account/login?flow=" in page.url, "logged out: the proxy sends to log in"


def test_through_nginx_the_same_person_steps_up_counts_and_logs_out(
    stack: Stack, page, shots: Path, person: dict[str, str]
):
    assert "secret" in person, "the Traefik rehearsal signed this person up"
    site, pages = stack.published()["nginx"], stack.published()["proxy"]
    # nginx sends the browser to Kratos; the login pages are the demo's, through Traefik.
    page.goto(site + "/aal2")
    assert page.url.startswith(pages + "/account/login?flow=")
    _log_in(page, person["email"])
    _second_factor(page, person["secret"])
    page.wait_for_url(site + "/aal2")
    assert _row(page, "AAL") == "aal2"
    page.get_by_role("button", name="count").click()
    page.wait_for_url(site + "/")
    # The counter lives in the Kratos session, a new one here.
    playwright_api.expect(page.locator("h2", has_text="Counter:")).to_have_text("Counter: 1")
    _shot(page, shots, "08-nginx-aal2")
    refused = page.goto(site + "/internal")
    assert refused is not None and refused.status == 403
    _log_out(page, pages)
    page.goto(site + "/")
    assert "/account/login?flow=" in page.url


def test_a_wrong_secret_path_fails_naming_the_service(projects, tmp_path):
    project = copy.deepcopy(projects["default"])
    project["secrets"]["bridge_secret"]["file"] = str(tmp_path / "no-such-secret")
    stack = Stack(project, tmp_path)
    try:
        with pytest.raises(RehearsalFailed, match=r"service bridge: .*no-such-secret"):
            stack.up()
    finally:
        stack.stop()


def test_a_wrong_bridge_url_in_traefiks_middleware_fails_naming_the_proxy(projects, tmp_path):
    project = copy.deepcopy(projects["default"])
    dynamic = (ROOT / "config" / "traefik" / "dynamic.yml").read_text()
    assert "http://bridge:4480/forward-auth" in dynamic
    broken = tmp_path / "dynamic.yml"
    broken.write_text(dynamic.replace("http://bridge:4480/", "http://bridge:4490/"))
    for volume in project["services"]["proxy"]["volumes"]:
        if volume["target"] == "/etc/traefik/dynamic.yml":
            volume["source"] = str(broken)
    with running(project, tmp_path) as stack:
        with pytest.raises(RehearsalFailed, match=r"service proxy .*answered 5\d\d"):
            stack.wait_until_answering(ANSWERED_WHEN_UP, timeout=10)

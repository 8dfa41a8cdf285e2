"""The admin dashboard in a real browser (Playwright driving Debian's Chromium) against a
real bridge, real Redis and a real Kratos with a scripted set of identities and sessions.

Screenshots of every page, at desktop and phone width, go to ``$BRIDGE_SCREENSHOTS_DIR``
(tests/run.sh names it; a temporary folder otherwise)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SECRET, chromium, needs_chromium
from tests.conftest import screenshot as take_screenshot
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, Kratos, RedisServer, forwarded, wait_until

playwright_api = pytest.importorskip("playwright.sync_api")

TOKEN = "dashboard-token-for-tests-" + "d" * 20
SIZES = {"desktop": {"width": 1280, "height": 860}, "phone": {"width": 390, "height": 844}}

pytestmark = needs_chromium


class Scene:
    """The bridge, and who is logged in through it."""

    def __init__(self, kratos: Kratos, bridge: BridgeServer) -> None:
        self.kratos, self.bridge = kratos, bridge
        self.users = [flows.register(kratos, name) for name in ("ada", "grace", "linus")]
        self.tokens = {u.email: flows.login_api(kratos, u) for u in self.users}
        flows.enable_totp(kratos, self.users[1])  # grace's registration session: aal2
        self.tokens["grace-aal2"] = self.users[1].token
        for token in self.tokens.values():
            headers = {"X-Session-Token": token, **forwarded("/")}
            assert httpx.get(bridge.url + "/forward-auth", headers=headers).status_code == 200
        self.session_ids = {
            email: flows.session_of(kratos, token=token).json()["id"]
            for email, token in self.tokens.items()
        }
        wait_until(lambda: set(self.session_ids.values()) <= set(self.listed()), 10, "the registry")

    def api(self, path: str) -> dict:
        response = httpx.get(
            self.bridge.admin_url + path, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status_code == 200, response.text
        return response.json()

    def listed(self) -> list[str]:
        return [s["session_id"] for s in self.api("/admin/sessions?page_size=500")["sessions"]]


def start_bridge(kratos: Kratos, redis_server: RedisServer, workdir: Path, **env: str):
    """A bridge on its own key prefix, with the admin listener on a free port."""
    values = {
        "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
        "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
        "BRIDGE_REDIS_URL": redis_server.url,
        "BRIDGE_KEY_PREFIX": f"ui{uuid.uuid4().hex[:8]}:",
        "BRIDGE_SECRET": SECRET,
        **env,
    }
    return BridgeServer(values, workdir)


@pytest.fixture(scope="module")
def scene(kratos: Kratos, redis_server: RedisServer, workdir: Path) -> Iterator[Scene]:
    bridge = start_bridge(
        kratos,
        redis_server,
        workdir,
        BRIDGE_ADMIN_TOKEN=TOKEN,
        BRIDGE_REVALIDATE_AFTER="300",
    )
    try:
        yield Scene(kratos, bridge)
    finally:
        bridge.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser, scene: Scene):
    context = browser.new_context(viewport=SIZES["desktop"])
    opened = context.new_page()
    problems: list[str] = []

    def console(message) -> None:
        # A page answered 401 or 403 on purpose is logged as a failed load: not a problem.
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(message.text)

    opened.on("console", console)
    opened.on("pageerror", lambda e: problems.append(str(e)))
    yield opened
    context.close()
    assert problems == [], problems  # a CSP violation or a script error shows up here


def sign_in(page, scene: Scene, token: str = TOKEN) -> None:
    page.goto(scene.bridge.admin_url + "/admin/ui/")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def screenshot(page, shots: Path, name: str) -> None:
    for size, viewport in SIZES.items():
        page.set_viewport_size(viewport)
        take_screenshot(page, shots / f"{name}-{size}.png", full_page=True)
    page.set_viewport_size(SIZES["desktop"])


def test_a_wrong_token_is_refused(page, scene: Scene, shots: Path) -> None:
    page.goto(scene.bridge.admin_url + "/admin/ui/sessions")
    assert page.url.endswith("/admin/ui/login")
    screenshot(page, shots, "login")
    sign_in(page, scene, token="not-the-token-" + "x" * 30)
    assert page.get_by_role("alert").inner_text() == "That is not the admin token."
    assert page.url.endswith("/admin/ui/login")
    direct = httpx.get(scene.bridge.admin_url + "/admin/ui/", follow_redirects=False)
    assert direct.status_code == 303
    assert direct.headers["location"].endswith("/admin/ui/login")


def test_the_overview_matches_the_admin_api(page, scene: Scene, shots: Path) -> None:
    sign_in(page, scene)
    stats = scene.api("/admin/stats?since=7d")
    assert page.locator("#active-sessions").inner_text() == str(stats["active_sessions"])
    assert page.locator("#unique-today").inner_text() == str(stats["days"][-1]["unique_identities"])
    share = f"{round(stats['aal2_share'] * 100, 1)}%"
    assert page.locator("#aal2-share").inner_text() == share
    assert page.locator("#kratos-health").inner_text() == "Kratos ok"
    for chart, points in (("sessions-started", 7), ("by-hour", 24), ("durations", 6)):
        figure = page.locator(f"#{chart}")
        assert figure.get_attribute("data-points") == str(points)
        assert figure.locator("rect.bar").count() == points
    assert page.locator("#aal2-by-method rect.bar").count() == 7 * len(
        stats["aal2_events_by_method"] or {"": 0}
    )
    response = page.goto(scene.bridge.admin_url + "/admin/ui/?days=30")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.locator("#sessions-started rect.bar").count() == 30
    screenshot(page, shots, "overview")


def test_find_a_session_by_email_and_revoke_it(page, scene: Scene, shots: Path) -> None:
    sign_in(page, scene)
    linus = scene.users[2]
    sid, token = scene.session_ids[linus.email], scene.tokens[linus.email]
    page.get_by_role("link", name="Sessions").click()
    screenshot(page, shots, "sessions")
    page.get_by_label("Find by email, identity id or session id").fill(linus.email)
    page.get_by_role("button", name="Search").click()
    rows = page.locator("table.sessions tbody tr")
    assert rows.count() == 1
    assert rows.first.get_attribute("data-session-id") == sid
    rows.first.get_by_role("link", name=linus.email).click()
    assert page.locator("#active-in-kratos").inner_text() == "yes"
    screenshot(page, shots, "session")
    page.get_by_role("link", name="Revoke this session").click()
    screenshot(page, shots, "confirm")
    page.get_by_role("button", name="Revoke").click()
    assert page.locator("li.revoked").all_inner_texts() == [sid]
    assert flows.session_of(scene.kratos, token=token).status_code == 401
    headers = {"X-Session-Token": token, **forwarded("/")}
    assert httpx.get(scene.bridge.url + "/forward-auth", headers=headers).status_code == 401
    page.get_by_role("link", name="Back to sessions").click()
    assert page.locator(f'tr[data-session-id="{sid}"]').count() == 0
    assert sid not in scene.listed()


def test_a_state_change_without_the_csrf_token_is_refused(page, scene: Scene) -> None:
    sign_in(page, scene)
    ada = scene.users[0]
    sid = scene.session_ids[ada.email]
    url = f"{scene.bridge.admin_url}/admin/ui/sessions/{sid}/revoke"
    missing = page.request.post(url, form={})
    assert missing.status == 403
    page.goto(f"{scene.bridge.admin_url}/admin/ui/sessions/{sid}/revoke")
    token = page.locator('main input[name="csrf_token"]').get_attribute("value")
    cross_site = page.request.post(
        url, form={"csrf_token": token}, headers={"Origin": "https://evil.example"}
    )
    assert cross_site.status == 403
    assert flows.session_of(scene.kratos, token=scene.tokens[ada.email]).status_code == 200


def test_the_aal2_timeline_filters_and_exports(page, scene: Scene, shots: Path) -> None:
    sign_in(page, scene)
    grace = scene.users[1]
    page.get_by_role("link", name="AAL2 timeline").click()
    page.get_by_label("Identity id").fill(grace.identity_id)
    page.get_by_label("Method").select_option("totp")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("table.events tbody tr")
    assert rows.count() == 1
    assert grace.identity_id in rows.first.inner_text()
    assert page.locator("#events-per-day").get_attribute("data-points") == "7"
    screenshot(page, shots, "events")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert lines[0].startswith("at,id,session_id,identity_id,methods")
    assert len(lines) == 2 and grace.identity_id in lines[1]


def test_the_sessions_page_refreshes_itself(page, scene: Scene) -> None:
    sign_in(page, scene)
    page.goto(scene.bridge.admin_url + "/admin/ui/sessions", wait_until="load")
    page.evaluate("window.notReloaded = true")
    newcomer = flows.register(scene.kratos, "newcomer")
    token = flows.login_api(scene.kratos, newcomer)
    headers = {"X-Session-Token": token, **forwarded("/")}
    assert httpx.get(scene.bridge.url + "/forward-auth", headers=headers).status_code == 200
    sid = flows.session_of(scene.kratos, token=token).json()["id"]
    row = page.locator(f'tr[data-session-id="{sid}"]')
    playwright_api.expect(row).to_have_count(1, timeout=40_000)  # one or two 15 s rounds
    assert page.evaluate("window.notReloaded") is True


def test_a_session_the_bridge_never_saw_is_shown_from_kratos(page, scene: Scene) -> None:
    user = flows.register(scene.kratos, "unseen")
    sid = flows.session_of(scene.kratos, token=flows.login_api(scene.kratos, user)).json()["id"]
    sign_in(page, scene)
    page.goto(f"{scene.bridge.admin_url}/admin/ui/sessions/{sid}")
    assert page.locator("#not-seen").inner_text() == "not seen by the bridge"
    assert page.locator("#active-in-kratos").inner_text() == "yes"
    facts = page.locator("dl#in-kratos").inner_text()
    assert user.email in facts and "password (aal1" in facts
    assert page.locator("dl#seen").count() == 0
    assert httpx.delete(f"{scene.kratos.admin_url}/admin/sessions/{sid}").status_code == 204
    page.reload()
    assert page.locator("#active-in-kratos").inner_text() == "no"
    assert page.locator("span.badge.ended").count() == 1


def test_a_session_the_bridge_saw_shows_what_it_saw(page, scene: Scene) -> None:
    ada = scene.users[0]
    sid = scene.session_ids[ada.email]
    sign_in(page, scene)
    page.goto(f"{scene.bridge.admin_url}/admin/ui/sessions/{sid}")
    assert page.locator("#not-seen").count() == 0
    seen = page.locator("dl#seen").inner_text()
    assert "Requests" in seen and "(script)" in seen
    assert ada.email in page.locator("dl#in-kratos").inner_text()


HOSTILE_AGENT = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


def test_what_users_control_is_shown_as_text(page, scene: Scene) -> None:
    user = flows.register(scene.kratos, "hostile")
    flow = httpx.get(scene.kratos.public_url + "/self-service/login/api").json()
    token = httpx.post(
        flow["ui"]["action"],
        json={"method": "password", "identifier": user.email, "password": user.password},
        headers={"User-Agent": HOSTILE_AGENT},
    ).json()["session_token"]
    headers = {"X-Session-Token": token, **forwarded("/")}
    assert httpx.get(scene.bridge.url + "/forward-auth", headers=headers).status_code == 200
    sid = flows.session_of(scene.kratos, token=token).json()["id"]
    sign_in(page, scene)
    page.goto(f"{scene.bridge.admin_url}/admin/ui/sessions/{sid}")
    assert HOSTILE_AGENT in page.locator("dl#in-kratos").inner_text()
    assert page.locator("main script, main img").count() == 0
    assert page.evaluate("window.pwned") is None


def test_signing_out_drops_the_cookie(page, scene: Scene) -> None:
    sign_in(page, scene)
    assert any(c["name"] == "bridge_admin_ui" for c in page.context.cookies())
    cookie = next(c for c in page.context.cookies() if c["name"] == "bridge_admin_ui")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin/ui"
    assert cookie["value"] != TOKEN and TOKEN not in cookie["value"]
    page.get_by_role("button", name="Sign out").click()
    assert page.url.endswith("/admin/ui/login")
    assert not any(c["name"] == "bridge_admin_ui" for c in page.context.cookies())
    page.goto(scene.bridge.admin_url + "/admin/ui/sessions")
    assert page.url.endswith("/admin/ui/login")


def test_a_forged_or_expired_cookie_is_refused(scene: Scene) -> None:
    url = scene.bridge.admin_url + "/admin/ui/"
    for value in ("", "1.abc", f"{2**40}.00", "123", "9999999999." + "0" * 64):
        answer = httpx.get(url, cookies={"bridge_admin_ui": value}, follow_redirects=False)
        assert answer.status_code == 303, value
    old = httpx.post(
        scene.bridge.admin_url + "/admin/ui/login", data={"token": TOKEN}, follow_redirects=False
    ).cookies["bridge_admin_ui"]
    issued, _, mac = old.partition(".")
    earlier = f"{int(issued) - 13 * 3600}.{mac}"  # a real MAC moved to another time
    answer = httpx.get(url, cookies={"bridge_admin_ui": earlier}, follow_redirects=False)
    assert answer.status_code == 303
    assert httpx.get(url, cookies={"bridge_admin_ui": old}).status_code == 200


def test_the_dashboard_without_a_token(
    browser, kratos: Kratos, redis_server: RedisServer, workdir: Path
) -> None:
    bridge = start_bridge(kratos, redis_server, workdir)
    try:
        context = browser.new_context(viewport=SIZES["desktop"])
        opened = context.new_page()
        opened.goto(bridge.admin_url + "/admin/ui/")
        assert opened.get_by_role("heading", name="Overview").count() == 1
        assert opened.get_by_role("button", name="Sign out").count() == 0
        url = f"{bridge.admin_url}/admin/ui/sessions/{uuid.uuid4()}/revoke"
        assert opened.request.post(url, form={}).status == 403  # no CSRF token
        rebound = httpx.get(bridge.admin_url + "/admin/ui/", headers={"Host": "evil.example"})
        assert rebound.status_code == 403
        context.close()
    finally:
        bridge.stop()


def test_keyboard_first_stop_is_the_skip_link(page, scene: Scene) -> None:
    sign_in(page, scene)
    page.goto(scene.bridge.admin_url + "/admin/ui/sessions", wait_until="load")
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    playwright_api.expect(skip).to_be_focused()
    page.keyboard.press("Enter")
    playwright_api.expect(page.locator("main#content")).to_be_focused()

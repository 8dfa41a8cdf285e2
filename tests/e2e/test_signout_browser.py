"""Sign-out in a real browser: Playwright driving Debian's Chromium through the shipped
nginx and Traefik configs (tests/support/proxies.py), in front of two bridge processes on
one Redis and a real Kratos.

The proxy sends everything to one bridge; the other, on the same Redis and key prefix,
is asked directly, as a second replica behind a load balancer would be. That shows "every
process refuses it at once" without guessing which replica a proxy picked: the second
process never saw the sign-out, holds its own copy of the session (one worker each, both
asked before), and re-validates only every 300 s, so a refusal within seconds can only
come from the sign-out's announcement.

The user logs in through Kratos's browser flow over the browser context's own HTTP client,
so Kratos's cookie lands in Chromium's jar with Kratos's attributes (SameSite=Lax,
host-only); everything after that is Chromium's doing. The app behind the proxy and the
other sites' pages come from one tiny server of the test (``Pages``). Another site is
``attacker.test`` (mapped to 127.0.0.1 inside Chromium): cross-site, so Chromium withholds
the Lax cookie from a form POST and an image; a page on another port of 127.0.0.1 is
same-site, and Chromium sends the cookie with all three ways of asking, so there the
bridge's check is all that stands in the way.

A token's sign-out is not a browser's: it is tested with two bridges in
tests/integration/test_logout.py and through nginx, Caddy and Traefik in
tests/e2e/test_proxies.py.

Screenshots go to ``$BRIDGE_SCREENSHOTS_DIR`` (signout-*.png)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import pytest

from tests.conftest import bridge_env, chromium, needs_chromium, screenshot
from tests.support import kratos_flows as flows
from tests.support.harness import (
    BridgeServer,
    Kratos,
    RedisServer,
    cookie_status,
    free_port,
    wait_until,
)
from tests.support.proxies import ROOT, Addresses, RunningProxy, start_proxy

pytest.importorskip("playwright.sync_api")
pytestmark = needs_chromium

LOGOUT = "/.bridge/logout"
COOKIE = "ory_kratos_session"
OTHER_SITE = "attacker.test"
# A refusal by the second bridge within this long is the announcement's: it would
# otherwise keep its copy for BRIDGE_REVALIDATE_AFTER (300 s). A bound, not a figure: far
# below 300 s, and far above what a loaded 2-core machine takes to deliver it.
AT_ONCE = 60.0
# Password hashing and Kratos on a shared 2-core machine: generous, never hit.
STEP_TIMEOUT_MS = 30_000
JSON = {"Accept": "application/json"}


class Pages:
    """The app behind the proxy (``/app``: who is signed in, and a sign-out link and form;
    ``/public/signed-out``) and other sites' pages that ask the proxy's sign-out URL
    (``/attack/link``, ``/attack/form``, ``/attack/img``), served on 127.0.0.1."""

    def __init__(self, proxy_url: str) -> None:
        self.proxy_url = proxy_url
        self.signed_out_url = proxy_url + "/public/signed-out"
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), _PagesHandler)
        self._server.daemon_threads = True
        self._server.pages = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def origin(self, site: str) -> str:
        """Where a page of a ``cross-site`` or ``same-site`` origin is (not the proxy's)."""
        host = OTHER_SITE if site == "cross-site" else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def answer(self, path: str, session_id: str) -> tuple[int, str]:
        sign_out = escape(f"{LOGOUT}?{urlencode({'return_to': self.signed_out_url})}")
        target = escape(self.proxy_url + LOGOUT)
        pages = {
            "/app": (
                f"<h1>Signed in</h1><p>session <code id=session>{escape(session_id)}</code></p>"
                f'<p><a id=sign-out href="{sign_out}">Sign out</a></p>'
                f'<form id=sign-out-form method=post action="{sign_out}">'
                "<button>Sign out</button></form>"
            ),
            "/public/signed-out": "<h1>Signed out</h1>",
            "/attack/link": f'<a id=go href="{target}">A prize</a>',
            "/attack/form": (
                f'<form method=post action="{target}"><button id=go>A prize</button></form>'
            ),
            "/attack/img": f'<p>A prize</p><img src="{target}" alt="">',
        }
        page = pages.get(urlsplit(path).path)
        if page is None:
            return 404, "<h1>Not here</h1>"
        return 200, f"<!doctype html><title>{escape(path)}</title>{page}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _PagesHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status, page = self.server.pages.answer(  # type: ignore[attr-defined]
            self.path, self.headers.get("X-Session-Id", "")
        )
        body = page.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def log_message(self, format: str, *args) -> None:
        pass


class Wire:
    """What Chromium put on the wire and got back, read from its DevTools protocol: the
    request headers as sent (``Sec-Fetch-Site`` and ``Cookie`` are the browser's own) and
    the status even of an answer the page never sees (Chromium blocks JSON as an image).
    A redirect's hops share a request id, so each id keeps its hops in order."""

    def __init__(self, page) -> None:
        self._page = page
        self._hops: dict[str, dict[str, list]] = {}
        session = page.context.new_cdp_session(page)
        session.on("Network.requestWillBeSent", self._request)
        session.on("Network.requestWillBeSentExtraInfo", self._headers)
        session.on("Network.responseReceivedExtraInfo", self._response)
        session.send("Network.enable")

    def _of(self, event: dict, part: str) -> list:
        hops = self._hops.setdefault(event["requestId"], {"path": [], "sent": [], "status": []})
        return hops[part]

    def _request(self, event: dict) -> None:
        self._of(event, "path").append(urlsplit(event["request"]["url"]).path)

    def _headers(self, event: dict) -> None:
        sent = {name.lower(): value for name, value in event["headers"].items()}
        self._of(event, "sent").append(sent)

    def _response(self, event: dict) -> None:
        self._of(event, "status").append(event["statusCode"])

    def exchange(self, path: str) -> tuple[dict[str, str], int]:
        """The one request to ``path`` since the last call: headers sent, status got."""
        deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
        while True:
            done = [
                (hops["sent"][i], hops["status"][i])
                for hops in self._hops.values()
                for i, seen in enumerate(hops["path"])
                if seen == path and i < min(len(hops["sent"]), len(hops["status"]))
            ]
            if done or time.monotonic() > deadline:
                break
            self._page.wait_for_timeout(50)  # lets Playwright deliver the events
        assert len(done) == 1, (f"{len(done)} requests to {path} went out", self._hops)
        self._hops.clear()
        return done[0]


@dataclass
class Stack:
    kind: str
    proxy: RunningProxy
    bridge: BridgeServer  # the one the proxy sends to
    other: BridgeServer  # the same Redis and prefix, asked directly
    pages: Pages

    def through_proxy(self, cookie: str) -> int:
        """What the proxy answers a script that sends ``cookie`` for the app."""
        headers = {**JSON, "Cookie": f"{COOKIE}={cookie}"}
        return httpx.get(self.proxy.url + "/app", headers=headers).status_code


@pytest.fixture(scope="module", params=["nginx", "traefik"])
def stack(
    request: pytest.FixtureRequest, kratos: Kratos, redis_server: RedisServer, workdir: Path
) -> Iterator[Stack]:
    kind = request.param
    home = workdir / f"signout-{kind}"
    proxy_port = free_port()
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    env = bridge_env(
        kratos,
        redis_server.url,
        f"signout{uuid.uuid4().hex[:8]}:",
        BRIDGE_WORKERS="1",  # one process a bridge: each holds its own copy
        BRIDGE_REVALIDATE_AFTER="300",  # a refusal seen here is the sign-out's
        BRIDGE_RULES_FILE=str(ROOT / "config" / "rules.yml"),
        BRIDGE_RETURN_TO_ORIGINS=proxy_url,
        BRIDGE_ADMIN_PORT="0",
    )
    pages = Pages(proxy_url)
    bridges: list[BridgeServer] = []
    try:
        bridges = [BridgeServer(env, workdir) for _ in range(2)]
        addresses = Addresses(bridges[0].url, pages.url, kratos.public_url)
        proxy = start_proxy(kind, addresses, home, port=proxy_port)
        try:
            yield Stack(kind, proxy, bridges[0], bridges[1], pages)
        finally:
            proxy.stop()
    finally:
        for bridge in bridges:
            bridge.stop()
        pages.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium(f"--host-resolver-rules=MAP {OTHER_SITE} 127.0.0.1") as launched:
        yield launched


@pytest.fixture
def context(browser) -> Iterator[object]:
    opened = browser.new_context(viewport={"width": 1000, "height": 600})
    opened.set_default_timeout(STEP_TIMEOUT_MS)
    yield opened
    opened.close()


def log_in(context, kratos: Kratos, user: flows.User) -> str:
    """Kratos's browser login flow over the context's own HTTP client, which shares
    Chromium's cookie jar: Kratos's Set-Cookie lands there as Kratos wrote it. Returns the
    session cookie's value."""
    flow = context.request.get(kratos.public_url + "/self-service/login/browser", headers=JSON)
    assert flow.status == 200, flow.text()
    body = flow.json()
    done = context.request.post(
        body["ui"]["action"],
        headers=JSON,
        data={
            "method": "password",
            "identifier": user.email,
            "password": user.password,
            "csrf_token": flows.csrf_token(body),
        },
    )
    assert done.status == 200, done.text()
    cookie = session_cookie(context)
    assert cookie is not None, context.cookies()
    return cookie


def session_cookie(context) -> str | None:
    return next((c["value"] for c in context.cookies() if c["name"] == COOKIE), None)


def open_app(page, stack: Stack, kratos: Kratos, cookie: str) -> str:
    """The app through the proxy, signed in; returns the session id the app was told."""
    shown = page.goto(stack.proxy.url + "/app")
    assert shown is not None and shown.status == 200, stack.proxy.log()
    session_id = page.locator("#session").inner_text()
    assert session_id == flows.session_of(kratos, cookie=cookie).json()["id"]
    return session_id


@pytest.mark.parametrize("how", ["link", "form"])
def test_signing_out_in_chromium_ends_the_session_everywhere_and_clears_the_cookie(
    stack: Stack, kratos: Kratos, context, how: str, shots: Path
) -> None:
    user = flows.register(kratos, f"signout-{stack.kind}-{how}")
    cookie = log_in(context, kratos, user)
    page = context.new_page()
    open_app(page, stack, kratos, cookie)
    assert cookie_status(stack.other, cookie) == 200  # the second process's own copy

    button = "#sign-out" if how == "link" else "#sign-out-form button"
    with page.expect_response(lambda r: urlsplit(r.url).path == LOGOUT) as answered:
        page.click(button)
    page.wait_for_url(stack.pages.signed_out_url)
    signed_out = answered.value
    assert signed_out.request.method == ("GET" if how == "link" else "POST")
    assert signed_out.status == 303, (signed_out.text(), stack.proxy.log())
    assert page.locator("h1").inner_text() == "Signed out"
    screenshot(page, shots / f"signout-{stack.kind}-{how}.png")

    # Kratos's Set-Cookie that clears its cookie reached Chromium through the proxy.
    assert session_cookie(context) is None, context.cookies()
    assert flows.session_of(kratos, cookie=cookie).status_code == 401
    # The old cookie, sent again: refused by the proxy's bridge and by the other process.
    for name, ask in (
        ("the proxy", lambda: stack.through_proxy(cookie)),
        ("the other bridge", lambda: cookie_status(stack.other, cookie)),
    ):
        wait_until(lambda ask=ask: ask() == 401, AT_ONCE, f"{name} refusing the old cookie")
        assert [ask() for _ in range(5)] == [401] * 5, name


ATTEMPTS = [(site, how) for site in ("cross-site", "same-site") for how in ("link", "form", "img")]


def test_another_sites_page_cannot_sign_the_user_out(
    stack: Stack, kratos: Kratos, context, shots: Path
) -> None:
    user = flows.register(kratos, f"csrf-{stack.kind}")
    cookie = log_in(context, kratos, user)
    page = context.new_page()
    session_id = open_app(page, stack, kratos, cookie)
    assert cookie_status(stack.other, cookie) == 200
    wire = Wire(page)

    for site, how in ATTEMPTS:
        page.goto(f"{stack.pages.origin(site)}/attack/{how}")
        if how != "img":  # the image asks as the page loads
            page.click("#go")
        sent, status = wire.exchange(LOGOUT)
        attempt = (site, how, sent)
        assert sent.get("sec-fetch-site") == site, attempt
        assert status == 403, (*attempt, status, stack.proxy.log())
        if how == "link" or site == "same-site":
            # Chromium sent Kratos's (SameSite=Lax) cookie along: the bridge alone refused.
            assert f"{COOKIE}={cookie}" in sent.get("cookie", ""), attempt
        if how == "form":
            screenshot(page, shots / f"signout-{stack.kind}-{site}-refused.png")

    # Still signed in: in Chromium's jar, in Kratos, on both bridges.
    assert session_cookie(context) == cookie
    assert flows.session_of(kratos, cookie=cookie).status_code == 200
    assert cookie_status(stack.other, cookie) == 200
    assert open_app(page, stack, kratos, cookie) == session_id

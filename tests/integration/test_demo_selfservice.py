"""The demo's self-service pages (compose/demo/selfservice.py) against a real Kratos: a
browser's way through them, as plain HTML forms submitted with a cookie jar. Sign up in
two steps, add TOTP from the QR page's secret, log out, log in again and be asked for the
second factor."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pyotp
import pytest

from tests.support.harness import Kratos, free_port, start_demo, stop_process, wait_until


@dataclass
class Form:
    action: str
    method: str
    group: str
    fields: dict[str, str] = field(default_factory=dict)
    buttons: list[tuple[str, str, str]] = field(default_factory=list)  # name, value, text


class Page(HTMLParser):
    """The forms, links and texts of one page, as a browser without JavaScript sees them."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self.links: dict[str, str] = {}  # text -> href
        self.codes: dict[str, str] = {}  # <code id=...> -> text
        self.images: list[str] = []
        self._button: tuple[str, str] | None = None
        self._link: str | None = None
        self._code: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append(Form(a["action"], a["method"], a.get("data-group", "")))
        elif tag == "input" and self.forms:
            self.forms[-1].fields[a["name"]] = a.get("value", "")
        elif tag == "button":
            self._button = (a.get("name", ""), a.get("value", ""))
        elif tag == "a":
            self._link = a["href"]
        elif tag == "code":
            self._code = a.get("id", "")
        elif tag == "img":
            self.images.append(a["src"])

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self.forms[-1].buttons.append((*self._button, data.strip()))
            self._button = None
        elif self._link is not None:
            self.links[data.strip()] = self._link
            self._link = None
        elif self._code is not None:
            self.codes[self._code] = data.strip()
            self._code = None

    def form(self, group: str) -> Form:
        return next(form for form in self.forms if form.group == group)


@pytest.fixture(scope="module")
def stack(workdir: Path) -> Iterator[tuple[Kratos, str]]:
    """A Kratos that sends every browser flow to the demo's pages, and the demo."""
    port = free_port()
    demo_url = f"http://127.0.0.1:{port}"
    kratos = Kratos(
        workdir,
        required_aal="highest_available",
        extra_config={
            "selfservice": {
                "default_browser_return_url": demo_url + "/",
                "allowed_return_urls": [demo_url],
                "flows": {
                    "error": {"ui_url": demo_url + "/account/error"},
                    "login": {"ui_url": demo_url + "/account/login"},
                    "settings": {"ui_url": demo_url + "/account/settings"},
                    "logout": {
                        "after": {"default_browser_return_url": demo_url + "/account/login"}
                    },
                    "registration": {
                        # The compose stack's Kratos asks for the traits first, then a password.
                        "enable_legacy_one_step": False,
                        "ui_url": demo_url + "/account/registration",
                    },
                },
            }
        },
    )
    demo = start_demo(
        port,
        {
            "DEMO_KRATOS_URL": kratos.public_url,
            "DEMO_KRATOS_BROWSER_URL": kratos.public_url,
        },
        workdir / "selfservice-demo.log",
    )
    try:
        wait_until(lambda: httpx.get(demo_url + "/healthz").status_code == 200, 15, "demo")
        yield kratos, demo_url
    finally:
        stop_process(demo)
        kratos.stop()


def _follow(browser: httpx.Client, response: httpx.Response) -> httpx.Response:
    """Follow redirects the way a browser does, to the page it lands on."""
    while response.is_redirect:
        response = browser.get(response.headers["location"])
    return response


def _submit(browser: httpx.Client, form: Form, button: str, **values: str) -> httpx.Response:
    name, value, _ = next(b for b in form.buttons if b[1] == button)
    data = {**form.fields, **values, name: value}
    assert form.method.upper() == "POST"
    return _follow(browser, browser.post(form.action, data=data))


def _whoami(kratos: Kratos, browser: httpx.Client) -> httpx.Response:
    return browser.get(kratos.public_url + "/sessions/whoami")


def test_sign_up_add_totp_log_out_and_log_in_with_the_second_factor(stack):
    kratos, demo_url = stack
    email, password = "page-user@example.test", "correct-horse-battery-staple-42"
    with httpx.Client(follow_redirects=False, timeout=30) as browser:
        # Sign up: the demo's page starts Kratos's flow and shows its form.
        page = _follow(browser, browser.get(demo_url + "/account/registration"))
        assert page.url.path == "/account/registration" and "flow" in page.url.params
        assert page.headers["Cache-Control"] == "no-store"
        step = Page(page.text).form("profile")
        assert step.action.startswith(kratos.public_url + "/self-service/registration?flow=")
        assert step.fields["csrf_token"], "the CSRF field is a hidden input of the form"
        page = _submit(browser, step, "profile", **{"traits.email": email})
        assert page.url.path == "/account/registration"
        page = _submit(browser, Page(page.text).form("password"), "password", password=password)
        assert page.url == demo_url + "/"
        assert _whoami(kratos, browser).json()["authenticator_assurance_level"] == "aal1"

        # Settings: the TOTP QR code and its secret, then a code from that secret.
        page = _follow(browser, browser.get(demo_url + "/account/settings"))
        settings = Page(page.text)
        assert any(src.startswith("data:image/png;base64,") for src in settings.images)
        secret = settings.codes["totp_secret_key"]
        page = _submit(browser, settings.form("totp"), "totp", totp_code=pyotp.TOTP(secret).now())
        assert page.url.path == "/account/settings"
        assert "totp_unlink" in {
            name for form in Page(page.text).forms for name, *_ in form.buttons
        }
        assert _whoami(kratos, browser).json()["authenticator_assurance_level"] == "aal2"

        # Log out: a link to Kratos's logout, then Kratos sends the browser to log in.
        logout = Page(browser.get(demo_url + "/account/logout").text).links["Log out"]
        page = _follow(browser, browser.get(logout))
        assert page.url.path == "/account/login"
        assert _whoami(kratos, browser).status_code == 401

        # Log in with the password: Kratos asks for the second factor on the demo's page.
        login = Page(page.text).form("password")
        page = _submit(browser, login, "password", identifier=email, password=password)
        assert page.url.path == "/account/login"
        assert "<h1>Second factor</h1>" in page.text
        wrong = _submit(browser, Page(page.text).form("totp"), "totp", totp_code="000000")
        assert "invalid" in wrong.text.lower(), "Kratos's message about the code is shown"
        code = pyotp.TOTP(secret).now()
        page = _submit(browser, Page(wrong.text).form("totp"), "totp", totp_code=code)
        assert page.url == demo_url + "/"
        session = _whoami(kratos, browser).json()
        assert session["authenticator_assurance_level"] == "aal2"
        assert [m["method"] for m in session["authentication_methods"]] == ["password", "totp"]


def test_a_wrong_password_shows_kratoss_message_on_the_page(stack):
    _, demo_url = stack
    with httpx.Client(follow_redirects=False, timeout=30) as browser:
        page = _follow(browser, browser.get(demo_url + "/account/login"))
        login = Page(page.text).form("password")
        page = _submit(
            browser, login, "password", identifier="nobody@example.test", password="<b>x</b>"
        )
        assert page.url.path == "/account/login"
        assert "credentials are invalid" in page.text
        assert "<b>x</b>" not in page.text


def test_an_unknown_or_foreign_flow_starts_a_new_one(stack):
    kratos, demo_url = stack
    with httpx.Client(follow_redirects=False) as other_browser:
        foreign = _follow(other_browser, other_browser.get(demo_url + "/account/login"))
        flow_id = foreign.url.params["flow"]
    with httpx.Client(follow_redirects=False) as browser:
        # Without the other browser's CSRF cookie, Kratos will not show its flow.
        answer = browser.get(demo_url + "/account/login", params={"flow": flow_id})
        assert answer.status_code == 303
        assert answer.headers["location"].startswith(kratos.public_url + "/self-service/login/")
        page = _follow(browser, answer)
        assert page.url.params["flow"] != flow_id
        assert browser.get(demo_url + "/account/recovery").status_code == 404


def test_kratoss_error_page_says_what_went_wrong(stack):
    _, demo_url = stack
    unknown = httpx.get(demo_url + "/account/error", params={"id": "no-such-error"})
    assert "Something went wrong" in unknown.text and "That error is not known." in unknown.text
    # Kratos's own example error (the id its docs give for trying an error page out).
    stub = httpx.get(demo_url + "/account/error", params={"id": "stub:500"})
    assert "This is a stub error." in stub.text

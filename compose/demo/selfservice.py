"""Kratos's self-service pages for the demo: sign up, log in (password, then a second
factor when Kratos asks for ``aal2``), settings (password, TOTP, backup codes), log out and
Kratos's error page. Kratos has no pages of its own; ``config/kratos/kratos.yml`` sends each
browser flow here (``selfservice.flows.*.ui_url``).

Every page is server-rendered from the flow's JSON: the nodes of ``ui.nodes`` (inputs, the
CSRF field, the TOTP QR code and secret), ``ui.messages`` and each node's messages, as
plain HTML forms that post straight to Kratos (``ui.action``). No JavaScript. The flow is
fetched from Kratos on the server side with the browser's own Cookie header, which holds
Kratos's CSRF cookie (and the session cookie, for settings): cookies belong to a host, not
a port, so the browser sends Kratos's cookies for 127.0.0.1 to this app too.

Settings: ``DEMO_KRATOS_URL`` (Kratos's public API as this app reaches it,
``http://kratos:4433``) and ``DEMO_KRATOS_BROWSER_URL`` (as the browser reaches it,
``http://127.0.0.1:4433``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import httpx
from flask import Blueprint, abort, make_response, redirect, render_template_string, request

KRATOS_URL = os.environ.get("DEMO_KRATOS_URL", "http://kratos:4433").rstrip("/")
KRATOS_BROWSER_URL = os.environ.get("DEMO_KRATOS_BROWSER_URL", "http://127.0.0.1:4433").rstrip("/")
# The flows this demo renders; recovery and verification stay off in the demo's Kratos
# (they need a mail courier), so Kratos never sends a browser to them.
FLOW_TITLES = {"login": "Log in", "registration": "Sign up", "settings": "Account settings"}
# What a browser may pass on when it starts a flow here (/account/login?aal=aal2, say).
START_PARAMETERS = ("aal", "refresh", "return_to")

blueprint = Blueprint("selfservice", __name__, url_prefix="/account")
# One client for the process: a short timeout, since a user is waiting on every call.
kratos = httpx.Client(base_url=KRATOS_URL, timeout=10, follow_redirects=False)

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{{ title }} · kratos-session-bridge demo</title>
<style>body{font-family:sans-serif;max-width:36rem;margin:2rem auto}
form{border:1px solid #ccc;border-radius:4px;padding:1rem;margin:1rem 0}
label{display:block;margin:.5rem 0}input:not([type=hidden]){display:block;width:100%;
padding:.3rem;box-sizing:border-box}button{margin:.5rem .5rem 0 0;padding:.3rem 1rem}
.error{color:#a00}.info,.success{color:#060}code{word-break:break-all}</style>
</head>
<body>
<h1>{{ title }}</h1>
{% for message in messages %}<p class="{{ message.type }}">{{ message.text }}</p>{% endfor %}
{% for group, nodes in forms %}
<form method="{{ method }}" action="{{ action }}" data-group="{{ group }}">
{% for node in nodes %}{% set a = node.attributes %}
{% if node.type == "input" and a.type == "hidden" %}
<input type="hidden" name="{{ a.name }}" value="{{ a.value if a.value is not none else '' }}">
{% elif node.type == "input" and a.type in ("submit", "button") %}
<button type="submit" name="{{ a.name }}" value="{{ a.value }}"
{%- if a.disabled %} disabled{% endif %}>{{ node.label or a.value }}</button>
{% elif node.type == "input" %}
<label>{{ node.label or a.name }}
<input type="{{ a.type }}" name="{{ a.name }}"
{%- if a.value is not none and a.type != "password" %} value="{{ a.value }}"{% endif %}
{%- if a.required %} required{% endif %}{% if a.disabled %} disabled{% endif %}
{%- if a.autocomplete %} autocomplete="{{ a.autocomplete }}"{% endif %}
{%- if a.pattern %} pattern="{{ a.pattern }}"{% endif %}></label>
{% elif node.type == "img" %}
<p>{{ node.label }}<br>
<img src="{{ a.src }}" width="{{ a.width }}" height="{{ a.height }}" alt="{{ node.label }}"></p>
{% elif node.type == "text" %}
<p>{{ node.label }}<br><code id="{{ a.id }}">{{ a.text.text }}</code></p>
{% elif node.type == "a" %}
<p><a href="{{ a.href }}">{{ a.title.text }}</a></p>
{% endif %}
{% for message in node.messages %}<p class="{{ message.type }}">{{ message.text }}</p>{% endfor %}
{% endfor %}
</form>
{% endfor %}
{% for href, text in links %}<p><a href="{{ href }}">{{ text }}</a></p>{% endfor %}
</body>
</html>
"""


def _browser_start(kind: str, args: Mapping[str, str]) -> str:
    """Kratos's URL that starts a browser flow; Kratos sends the browser back here."""
    query = httpx.QueryParams({name: args[name] for name in START_PARAMETERS if name in args})
    return f"{KRATOS_BROWSER_URL}/self-service/{kind}/browser" + (f"?{query}" if query else "")


def _cookies() -> dict[str, str]:
    """The browser's Cookie header, as it came: Kratos checks its CSRF cookie against the
    flow, and settings need the session cookie."""
    cookie = request.headers.get("Cookie")
    return {"Cookie": cookie} if cookie else {}


def _page(title: str, flow: Mapping[str, Any] | None, links: list[tuple[str, str]]) -> str:
    ui = (flow or {}).get("ui") or {}
    nodes = [
        {**node, "label": ((node.get("meta") or {}).get("label") or {}).get("text", "")}
        for node in ui.get("nodes") or []
    ]
    shared = [node for node in nodes if node.get("group") == "default"]
    # One form per method (password, totp, ...), each with the shared nodes (the CSRF field,
    # the identifier): a form for one method never trips over another's required fields.
    groups = list(dict.fromkeys(node["group"] for node in nodes if node.get("group") != "default"))
    forms = [
        (group, shared + [node for node in nodes if node.get("group") == group]) for group in groups
    ] or ([("default", shared)] if shared else [])
    return render_template_string(
        PAGE,
        title=title,
        messages=ui.get("messages") or [],
        forms=forms,
        action=ui.get("action", ""),
        method=ui.get("method", "POST"),
        links=links,
    )


def _no_store(body: str, status: int = 200) -> Any:
    response = make_response(body, status)
    # Flows carry a CSRF token and personal data: no shared cache may keep them.
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.get("/<kind>")
def flow_page(kind: str) -> Any:
    if kind not in FLOW_TITLES:
        abort(404)
    flow_id = request.args.get("flow")
    if not flow_id:
        return redirect(_browser_start(kind, request.args), 303)
    answer = kratos.get(f"/self-service/{kind}/flows", params={"id": flow_id}, headers=_cookies())
    if answer.status_code != 200:
        return _restart(kind, answer)
    flow = answer.json()
    # Switching between logging in and signing up keeps where the browser goes after.
    back = f"?{httpx.QueryParams(return_to=flow['return_to'])}" if flow.get("return_to") else ""
    links = {
        "login": [("/account/registration" + back, "No account yet? Sign up")],
        "registration": [("/account/login" + back, "Have an account? Log in")],
        "settings": [("/", "Back to the demo")],
    }[kind]
    if kind == "login" and flow.get("requested_aal") == "aal2":
        title = "Second factor"
        links = [("/account/logout", "Log out instead")]
    else:
        title = FLOW_TITLES[kind]
    return _no_store(_page(title, flow, links))


def _restart(kind: str, answer: httpx.Response) -> Any:
    """A flow Kratos will not show: expired (410), unknown (404), another browser's
    (403, the CSRF cookie does not match), or a settings flow without a session (401) or
    needing a second factor (403). Kratos says where the browser goes, else start anew."""
    try:
        body = answer.json()
    except ValueError:
        body = {}
    error = body.get("error") or {}
    target = body.get("redirect_browser_to") or (error.get("details") or {}).get("redirect_to")
    if target:
        return redirect(target, 303)
    if answer.status_code in (401, 403, 404, 410):
        return redirect(_browser_start(kind, {}), 303)
    return _no_store(_page("Kratos could not show this page", None, [("/", "Home")]), 502)


@blueprint.get("/error")
def error_page() -> Any:
    """Kratos's error page: what went wrong in a flow, by the id Kratos gives."""
    error_id = request.args.get("id", "")
    answer = kratos.get("/self-service/errors", params={"id": error_id})
    error = (answer.json().get("error") or {}) if answer.status_code == 200 else {}
    texts = [error.get("message"), error.get("reason")] if error else ["That error is not known."]
    messages = [{"type": "error", "text": text} for text in dict.fromkeys(texts) if text]
    flow = {"ui": {"messages": messages}}
    return _no_store(_page("Something went wrong", flow, [("/", "Back to the demo")]), 200)


@blueprint.get("/logout")
def logout_page() -> Any:
    """Kratos's logout link for this browser's session: a link, not a redirect, so another
    site cannot log the user out by sending the browser here."""
    answer = kratos.get("/self-service/logout/browser", headers=_cookies())
    if answer.status_code != 200:
        return redirect("/account/login", 303)
    links = [(answer.json()["logout_url"], "Log out"), ("/", "Stay logged in")]
    return _no_store(_page("Log out", None, links))


ACCOUNT_LINKS = (
    ("/account/settings", "account settings: password, second factor (TOTP)"),
    ("/account/logout", "log out"),
)

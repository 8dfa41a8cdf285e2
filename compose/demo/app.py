"""Demo upstream: a small Flask app on bridge.flask, behind the proxy and the bridge.

``flask.session`` here is the app's part of the user's Kratos session, in the bridge's
Redis; who the user is comes from the bridge's signed JWT, checked against its JWKS.
Pages: ``/account/...`` (sign up, log in, settings, log out: ``selfservice.py``),
``/`` (who am I, the identity headers the proxy set, a counter kept in the session
with a CSRF-protected form), ``/aal2`` (``require_aal2``), ``/recent``
(``require_recent_login``, 5 minutes), ``/public/`` (no session needed) and ``/internal``
(shown only if the proxy lets it through: the rules file denies it), ``/live`` (a
server-sent event stream of ticks that ends within a second of the session ending, e.g.
revoked from the dashboard: ``session_ended``). The rules file
(config/rules.yml) guards the same paths at the bridge, which asks Kratos again after a
step-up or a new login; the decorators are the app's own check of the same thing.

Settings are the ``KRATOS_SESSION_*`` environment variables (see ``bridge/flask.py``);
the defaults are the compose stack's. ``DEMO_PORT`` is the port (5000).
"""

import os
import threading
from collections.abc import Iterator
from datetime import timedelta

from flask import Flask, Response, redirect, render_template_string, request, session
from selfservice import ACCOUNT_LINKS
from selfservice import blueprint as selfservice_pages
from werkzeug.middleware.proxy_fix import ProxyFix

from bridge.flask import (
    KratosSession,
    csrf_protect,
    current_identity,
    require_aal2,
    require_recent_login,
    session_ended,
)

PORT = int(os.environ.get("DEMO_PORT", "5000"))
IDENTITY_HEADERS = ("X-User-Id", "X-Session-Id", "X-User-Aal", "X-User-Email", "X-Bridge-Jwt")
LINKS = (
    ("/", "who am I (any session)"),
    ("/aal2", "a second-factor page (rule: aal2; require_aal2)"),
    ("/recent", "a recent-login page (rule: max_age 5m; require_recent_login)"),
    ("/live", "a live stream, closed when the session ends (revoke it from the dashboard)"),
    ("/public/", "a public page (rule: public)"),
    ("/internal", "a closed page (rule: deny)"),
)
ACCOUNT = (("/account/registration", "sign up"), ("/account/login", "log in"))

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>kratos-session-bridge demo</title>
<style>body{font-family:sans-serif;max-width:50rem;margin:2rem auto}
th{text-align:left;padding-right:1rem}td{word-break:break-all}
form{display:inline}</style>
</head>
<body>
<h1>kratos-session-bridge demo: {{ request.path }}</h1>
<ul>{% for href, text in links %}<li><a href="{{ href }}">{{ text }}</a></li>{% endfor %}</ul>
<p>{% for href, text in account %}<a href="{{ href }}">{{ text }}</a>
{%- if not loop.last %} · {% endif %}{% endfor %}</p>
{% if identity %}
<h2>Who am I (the bridge's JWT, the session in Redis)</h2>
<table>
<tr><th>identity</th><td>{{ identity.id }}</td></tr>
<tr><th>traits</th><td>{{ identity.traits | tojson }}</td></tr>
<tr><th>schema</th><td>{{ identity.schema_id }}</td></tr>
<tr><th>AAL</th><td>{{ identity.aal }}</td></tr>
<tr><th>methods</th><td>{{ identity.authentication_methods | join(", ") }}</td></tr>
<tr><th>logged in at</th><td>{{ identity.authenticated_at }}</td></tr>
<tr><th>session</th><td>{{ identity.session_id }}</td></tr>
</table>
<h2>Counter: {{ counter }}</h2>
<p>Kept in the Kratos session: the same in every tab and every replica of this app, gone
when you log out.</p>
<form method="post" action="/counter">
<input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
<button>count</button></form>
<form method="post" action="/forget">
<input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
<button>forget this app's data</button></form>
{% else %}
<p>No Kratos session on this request (a public page, or no hand-off from the proxy).</p>
{% endif %}
<h2>Identity headers set by the proxy</h2>
<table>{% for name, value in headers %}<tr><th>{{ name }}</th><td>{{ value }}</td></tr>{% endfor %}
</table>
</body>
</html>
"""

app = Flask(__name__)
# Behind Traefik, X-Forwarded-Proto and -Host make request.url (a login's return_to) the
# URL the browser asked for.
app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1)
app.config.update(
    KRATOS_SESSION_REDIS_URL="redis://redis:6379/0",
    KRATOS_SESSION_TRUST="jwt",
    KRATOS_SESSION_JWKS_URL="http://bridge:4480/.well-known/jwks.json",
    KRATOS_SESSION_JWT_AUDIENCE="demo",  # BRIDGE_JWT_AUDIENCE in the compose stack
    KRATOS_SESSION_LOGIN_URL="http://127.0.0.1:4433/self-service/login/browser",
)
app.config.update({k: v for k, v in os.environ.items() if k.startswith("KRATOS_SESSION_")})
KratosSession(app)
app.register_blueprint(selfservice_pages)


def page():
    headers = [(name, request.headers.get(name, "(absent)")) for name in IDENTITY_HEADERS]
    response = app.make_response(
        render_template_string(
            PAGE,
            links=LINKS,
            account=ACCOUNT_LINKS if current_identity else ACCOUNT,
            identity=current_identity._get_current_object(),
            counter=session.get("counter", 0),
            headers=headers,
        )
    )
    # The page shows personal data; no shared cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    return response


@app.get("/")
@app.get("/public/")
@app.get("/public/<path:rest>")
@app.get("/internal")
def show(rest: str = ""):
    return page()


@app.get("/aal2")
@require_aal2
def second_factor():
    return page()


@app.get("/recent")
@require_recent_login(timedelta(minutes=5))
def recent_login():
    return page()


@app.post("/counter")
@csrf_protect
def count():
    session["counter"] = session.get("counter", 0) + 1
    return redirect("/", 303)


@app.post("/forget")
@csrf_protect
def forget():
    session.clear()
    return redirect("/", 303)


TICK_SECONDS = 1.0
# The open /live streams of each session: what session_ended closes.
_streams: dict[str, set[threading.Event]] = {}
_streams_lock = threading.Lock()


@session_ended.connect_via(app)
def close_streams(_app: Flask, ended) -> None:
    with _streams_lock:
        for closed in _streams.pop(ended.session_id, ()):
            closed.set()


@app.get("/live")
def live():
    if not current_identity:
        return {"error": "unauthorized", "message": "log in first"}, 401
    session_id = current_identity.session_id
    closed = threading.Event()
    with _streams_lock:
        _streams.setdefault(session_id, set()).add(closed)

    def ticks() -> Iterator[str]:
        try:
            yield f"event: open\ndata: {session_id}\n\n"
            count = 0
            while not closed.wait(TICK_SECONDS):
                count += 1
                yield f"data: tick {count}\n\n"
            yield "event: ended\ndata: the session ended\n\n"
        finally:
            with _streams_lock:
                still_open = _streams.get(session_id, set())
                still_open.discard(closed)
                if not still_open:
                    _streams.pop(session_id, None)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return Response(ticks(), mimetype="text/event-stream", headers=headers)


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


if __name__ == "__main__":
    # Werkzeug's threaded server: enough for a demo (it warns that it is not for production).
    app.run(host="0.0.0.0", port=PORT, threaded=True)  # noqa: S104 (container)

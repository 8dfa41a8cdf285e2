"""Demo upstream: shows what the proxy and the bridge tell an app about its user.

Every path answers with the same page; the rules file (config/rules.yml) decides who may
see which: /aal2 needs a second factor, /recent a login in the last 5 minutes, /public/
no session, and /internal nobody. Standard library only, so the image needs no
dependencies. Everything printed comes from the request or the bridge and is HTML-escaped.
"""

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from html import escape
from http.client import HTTPResponse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("DEMO_PORT", "5000"))
WHOAMI_URL = os.environ.get("DEMO_WHOAMI_URL", "http://bridge:4480/whoami")
IDENTITY_HEADERS = ("X-User-Id", "X-Session-Id", "X-User-Aal", "X-User-Email", "X-Bridge-Jwt")
LINKS = (
    ("/", "who am I (any session)"),
    ("/aal2", "a second-factor page (rule: aal2)"),
    ("/recent", "a recent-login page (rule: max_age 5m)"),
    ("/public/", "a public page (rule: public)"),
    ("/internal", "a closed page (rule: deny)"),
)
if urllib.parse.urlsplit(WHOAMI_URL).scheme not in ("http", "https"):
    raise SystemExit(f"DEMO_WHOAMI_URL must be http(s), got {WHOAMI_URL!r}")

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>kratos-session-bridge demo</title>
<style>body{{font-family:sans-serif;max-width:50rem;margin:2rem auto}}
th{{text-align:left;padding-right:1rem}}pre{{background:#f4f4f4;padding:1rem;overflow:auto}}</style>
</head>
<body>
<h1>kratos-session-bridge demo: {path}</h1>
<ul>{links}</ul>
<h2>Identity headers set by the proxy</h2>
<table>{rows}</table>
<h2>GET {whoami_url} &rarr; {status}</h2>
<pre>{body}</pre>
</body>
</html>
"""


def call_whoami(cookie: str | None) -> tuple[str, str]:
    """Ask the bridge who this is, as the browser; return (status line, body)."""
    headers = {"Accept": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    # The scheme was checked at start-up, so urlopen cannot be steered to file: URLs.
    request = urllib.request.Request(WHOAMI_URL, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=3) as response:  # noqa: S310
            return f"{response.status} {response.reason}", read_text(response)
    except urllib.error.HTTPError as error:
        return f"{error.code} {error.reason}", read_text(error)
    except (urllib.error.URLError, TimeoutError) as error:
        return "unreachable", str(error)


def read_text(response: HTTPResponse | urllib.error.HTTPError) -> str:
    return response.read().decode("utf-8", "replace")


def pretty(body: str) -> str:
    try:
        return json.dumps(json.loads(body), indent=2, sort_keys=True)
    except ValueError:
        return body


class DemoHandler(BaseHTTPRequestHandler):
    server_version = "bridge-demo"

    def do_GET(self) -> None:
        rows = "".join(
            f"<tr><th>{escape(name)}</th><td>{escape(self.headers.get(name, '(absent)'))}</td></tr>"
            for name in IDENTITY_HEADERS
        )
        status, body = call_whoami(self.headers.get("Cookie"))
        links = "".join(f'<li><a href="{href}">{escape(text)}</a></li>' for href, text in LINKS)
        page = PAGE.format(
            path=escape(self.path),
            links=links,
            rows=rows,
            whoami_url=escape(WHOAMI_URL),
            status=escape(status),
            body=escape(pretty(body)),
        ).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        # The page shows personal data; no shared cache may keep it.
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", PORT), DemoHandler).serve_forever()  # noqa: S104 (container)

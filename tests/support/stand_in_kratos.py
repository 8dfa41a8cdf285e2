"""A FAKE Kratos, named as such, for the answers a real Kratos cannot be made to give
(a broken whoami body, a 429, a whoami that hangs while Kratos says it is ready):
``answers[token] = (status, headers, body)``; ``hold`` cleared holds every whoami until it
is set again."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandInKratos:
    """FAKE Kratos: ``answers[token] = (status, headers, body)`` for /sessions/whoami."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.asked: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                token = self.headers.get("X-Session-Token", "")
                if self.path.startswith("/health/"):
                    status, headers, body = 200, {}, b'{"status":"ok"}'
                else:
                    stand_in.asked.append(token)
                    stand_in.hold.wait()
                    status, headers, body = stand_in.answers.get(token, (401, {}, b"{}"))
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.public_url = self.admin_url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.hold.set()
        self._server.shutdown()

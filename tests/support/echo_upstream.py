"""A stand-in app behind the proxies: answers every request with what it received.

Run as ``python tests/support/echo_upstream.py PORT`` (binds 127.0.0.1). For any method and path it
answers 200 with JSON ``{"method", "path", "headers"}``: ``path`` is the raw request target
as the proxy sent it, ``headers`` maps each lower-case header name to the list of its values
in the order received, so a test sees exactly which identity headers reached the app.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the proxies reuse their upstream connections
    server_version = "echo-upstream"

    def __getattr__(self, name: str):
        # http.server dispatches to do_<METHOD>; every method gets the same answer.
        if name.startswith("do_"):
            return self._answer
        raise AttributeError(name)

    def _drain_body(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def _answer(self) -> None:
        self._drain_body()
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        body = json.dumps({"method": self.command, "path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


def main(argv: list[str]) -> None:
    if len(argv) != 2 or not argv[1].isdigit():
        sys.exit("usage: echo_upstream.py PORT")
    server = ThreadingHTTPServer(("127.0.0.1", int(argv[1])), EchoHandler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv)

"""The admin listener: the admin API on its own address, inside a server process.

Granian serves one app on one address, so the admin listener is a small threaded WSGI
server (werkzeug's) on a thread of a server process. Every process tries to bind the
admin port; the one that binds it serves, the others try again every few seconds, so a
process that dies hands the port to another. The admin API works the same from any of
them: what it reads and changes is in the store, and revocations reach every process
through the store's announcements. ``serve`` checks that the port is free before the
processes start, so a second bridge on the same port fails at once, naming the key.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server

log = logging.getLogger(__name__)

RETRY_BIND_SECONDS = 3.0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; ``OSError`` when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


class AdminListener:
    """Serves ``app`` on ``host:port`` from a daemon thread once it can bind the port."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self._app, self._host, self._port = app, host, port
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log of its own
        self._stop = threading.Event()
        self._server: BaseWSGIServer | None = None
        self._thread = threading.Thread(target=self._run, name="admin-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sock = bind(self._host, self._port)
            except OSError:
                self._stop.wait(RETRY_BIND_SECONDS)  # another process serves it, for now
                continue
            server = make_server(self._host, self._port, self._app, threaded=True, fd=sock.fileno())
            server.daemon_threads = True
            self._server = server
            log.info("admin listener on %s:%s", self._host, self._port)
            try:
                server.serve_forever(poll_interval=0.5)
            finally:
                server.server_close()
                sock.close()
            return

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()

"""The admin listener: the admin API on its own address, inside a server process.

Granian serves one app on one address, so the admin listener is a small threaded WSGI
server (werkzeug's) on a thread of a server process. Every process tries to bind the
admin port; the one that binds it serves, the others try again every few seconds, so a
process that dies hands the port to another. The admin API works the same from any of
them: what it reads and changes is in the store, and revocations reach every process
through the store's announcements. ``serve`` checks that the port is free before the
processes start, so a second bridge on the same port fails at once, naming the key.

werkzeug reads a request body only when a route asks for it, but with no time limit; the
listener gives each body ``BRIDGE_BODY_TIMEOUT`` in all from its first read, then the
route gets ``408`` (``BodyDeadline``), so a client that stalls or trickles a form holds
no thread for long.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

from werkzeug.exceptions import RequestTimeout
from werkzeug.serving import BaseWSGIServer, ThreadedWSGIServer, make_server

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


class BodyDeadline:
    """A request's ``wsgi.input`` that must be read within ``timeout`` seconds in all,
    counted from its first read (a route that reads no body never starts the clock).
    When the time is up the connection's read side is shut, which ends a read that is
    waiting or being fed a byte at a time, and the read raises ``RequestTimeout``."""

    def __init__(self, stream: Any, connection: socket.socket, timeout: float) -> None:
        self._stream, self._connection, self._timeout = stream, connection, timeout
        self._timer: threading.Timer | None = None
        self._expired = threading.Event()

    def read(self, *args: Any) -> bytes:
        return self._within(self._stream.read, *args)

    def readline(self, *args: Any) -> bytes:
        return self._within(self._stream.readline, *args)

    def readinto(self, buffer: Any) -> int | None:
        return self._within(self._stream.readinto, buffer)

    def close(self) -> None:
        """The request is over: the clock stops."""
        if self._timer is not None:
            self._timer.cancel()

    def _within(self, read: Callable[..., Any], *args: Any) -> Any:
        if self._timer is None:
            self._timer = threading.Timer(self._timeout, self._expire)
            self._timer.daemon = True
            self._timer.start()
        if self._expired.is_set():
            raise RequestTimeout()
        try:
            data = read(*args)
        except OSError:
            if self._expired.is_set():
                raise RequestTimeout() from None
            raise
        if self._expired.is_set():
            raise RequestTimeout()  # what came before the read side was shut is partial
        return data

    def _expire(self) -> None:
        self._expired.set()
        try:
            self._connection.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already gone


def with_body_deadline(app: Callable[..., Any], timeout: float) -> Callable[..., Any]:
    """``app`` with each request body under a ``BodyDeadline`` (werkzeug's server puts
    the connection in the environ)."""

    def deadline_app(
        environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        connection = environ.get("werkzeug.socket")
        if connection is None:
            return app(environ, start_response)
        body = BodyDeadline(environ["wsgi.input"], connection, timeout)
        environ["wsgi.input"] = body
        try:
            return app(environ, start_response)
        finally:
            body.close()

    return deadline_app


class AdminListener:
    """Serves ``app`` on ``host:port`` from a daemon thread once it can bind the port,
    each request body within ``body_timeout`` seconds."""

    def __init__(self, app: Any, host: str, port: int, body_timeout: float) -> None:
        self._app, self._host, self._port = with_body_deadline(app, body_timeout), host, port
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
            server = cast(  # what make_server returns when threaded
                ThreadedWSGIServer,
                make_server(self._host, self._port, self._app, threaded=True, fd=sock.fileno()),
            )
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

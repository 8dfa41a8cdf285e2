"""The server's front: an ASGI app on Granian's event loop.

Why ASGI: it is the one interface Granian gives raw header bytes (its WSGI and RSGI
interfaces drop a header holding any non-ASCII byte, and with it every cookie of a
browser that also holds another app's UTF-8 cookie), and an event loop lets the
requests that need no I/O never wait behind the ones that do.

- ``/health/alive`` and a forward-auth request (``/auth``, ``/forward-auth``,
  ``/ext-authz/...``) that this process's fresh copy answers are answered on the loop,
  with no I/O.
- Everything else (a forward-auth request that needs the store or Kratos, and the Flask
  routes) runs on a worker thread. A request waits for it at most
  ``BRIDGE_KRATOS_TIMEOUT + 2 * BRIDGE_REDIS_TIMEOUT`` (one Kratos call and the store's
  round trips around it); then it is answered ``503`` and the thread's late result is
  dropped.
- A Flask route is matched before any body is read: only the routes that take one
  (``bridge.web.app.BODY_ENDPOINTS``) wait for it, for at most ``BRIDGE_BODY_TIMEOUT`` in
  all (then ``408``), on the loop, so a client that stalls its body holds no thread.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from typing import Any, Protocol

from flask import Flask

from bridge.config import Settings
from bridge.logs import Throttled, log_unexpected
from bridge.pipeline.dialects import Dialect
from bridge.pipeline.forward_auth import ForwardAuth
from bridge.web import responses
from bridge.web.app import HEADER_VIEW_KEY, takes_body
from bridge.web.request import HeaderView
from bridge.web.responses import Reply

log = logging.getLogger(__name__)
_late = Throttled(log)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY = 1 << 20
_ALIVE = responses.json_reply(200, {"status": "ok"})
_READ_ONLY = ("GET", "HEAD")


class Served(Protocol):
    """What the front uses of the process's parts (``bridge.wiring.Bridge``)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def forward_auth(self) -> ForwardAuth: ...

    def close(self) -> None: ...


class Front:
    def __init__(
        self, bridge: Served, flask_app: Flask, stops: Sequence[Callable[[], None]] = ()
    ) -> None:
        settings = bridge.settings
        self._stops = tuple(stops)  # what else the process serves (the gRPC server)
        self._bridge = bridge
        self._forward_auth = bridge.forward_auth
        self._flask = flask_app
        self._pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="bridge")
        self._budget = settings.request_budget
        self._body_timeout = settings.body_timeout

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        raw = scope.get("raw_path")
        raw_path = raw.decode("latin-1") if raw else path
        dialect = None
        try:
            dialect = self._forward_auth.dialect_for(raw_path)
            if dialect is not None:
                reply = await self._auth(scope, dialect, raw_path)
            elif path == "/health/alive":
                reply = _ALIVE if method in _READ_ONLY else _not_allowed()
            else:
                reply = await self._flask_route(scope, receive)
        except Exception:
            # Flask's routes log their own; what fails here is the dialect's or the plumbing.
            log_unexpected(log, method, dialect.route if dialect is not None else None)
            reply = responses.internal_error()
        await _send(send, reply, head=method == "HEAD")

    async def _auth(self, scope: dict[str, Any], dialect: Dialect, raw_path: str) -> Reply:
        step = self._forward_auth.begin(
            dialect,
            HeaderView.from_asgi(scope["headers"], _peer(scope)),
            scope["method"],
            raw_path,
            scope["query_string"].decode("latin-1"),
        )
        if isinstance(step, Reply):
            return step
        timed_out = partial(self._forward_auth.timed_out, step)
        return await self._off_loop(self._forward_auth.finish, step, on_timeout=timed_out)

    async def _flask_route(self, scope: dict[str, Any], receive: Receive) -> Reply:
        """Routed first: only a route that takes a body waits for one, and for at most
        ``BRIDGE_BODY_TIMEOUT`` in all, so a client that stalls or trickles its body
        holds nothing for long. Any other route gets an empty body."""
        body = b""
        if takes_body(self._flask, scope["method"], scope["path"]):
            try:
                read = await asyncio.wait_for(_read_body(receive), self._body_timeout)
            except TimeoutError:
                return responses.http_error(408, "Request Timeout")
            if read is None:
                return responses.http_error(413, "Request Entity Too Large")
            body = read
        return await self._off_loop(self._call_flask, scope, body)

    async def _off_loop(
        self,
        function: Callable[..., Reply],
        *args: Any,
        on_timeout: Callable[[], Reply] = responses.timed_out,
    ) -> Reply:
        return await off_loop(self._pool, self._budget, function, *args, on_timeout=on_timeout)

    def _call_flask(self, scope: dict[str, Any], body: bytes) -> Reply:
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], *_: Any
        ) -> Callable[[bytes], object]:
            started[:] = [int(status.split(" ", 1)[0]), headers]
            return _no_write

        chunks = self._flask.wsgi_app(_environ(scope, body), start_response)
        try:
            content = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        return Reply(started[0], tuple(started[1]), content)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for stop in self._stops:
                    stop()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._bridge.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def off_loop(
    pool: Executor,
    budget: float,
    function: Callable[..., Reply],
    *args: Any,
    on_timeout: Callable[[], Reply] = responses.timed_out,
) -> Reply:
    """``function(*args)`` on a thread of ``pool``, waited for at most ``budget`` seconds;
    past it ``on_timeout()`` answers, and the thread's late result is dropped (a call still
    queued then is not run at all). An exception ``function`` raises is raised here.

    The event loop's share of a hand-off is kept small, since a busy bridge makes hundreds
    a second and the loop is what answers warm requests: one loop future, settled by the
    thread with one ``call_soon_threadsafe``, and one timer, rather than
    ``run_in_executor``'s future chained to the executor's and ``wait_for``'s waiter."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[Reply] = loop.create_future()

    def run() -> None:
        try:
            reply = function(*args)
        except BaseException as error:
            loop.call_soon_threadsafe(_settle, answer, error)
        else:
            loop.call_soon_threadsafe(_settle, answer, reply)

    work = pool.submit(run)
    timer = loop.call_later(budget, _settle, answer, _Expired())
    try:
        return await answer
    except _Expired:
        _late.warning("a request waited %.2fs for Kratos or Redis", budget)
        return on_timeout()
    finally:
        timer.cancel()
        work.cancel()


class _Expired(Exception):
    """The request budget ran out before the thread answered."""


def _settle(answer: asyncio.Future[Reply], outcome: Reply | BaseException) -> None:
    """The first to come of the thread's outcome and the budget's expiry settles ``answer``."""
    if answer.done():
        return
    if isinstance(outcome, BaseException):
        answer.set_exception(outcome)
    else:
        answer.set_result(outcome)


def _no_write(data: bytes) -> None:
    """The ``write`` WSGI hands an app that streams the old way; Flask returns its body."""
    raise NotImplementedError("write() is not supported: return the body")


def _peer(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _not_allowed() -> Reply:
    return responses.http_error(405, "Method Not Allowed", list(_READ_ONLY))


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or ``None`` when it is larger than ``MAX_BODY``."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _send(send: Send, reply: Reply, *, head: bool) -> None:
    await send(
        {"type": "http.response.start", "status": reply.status, "headers": reply.raw_headers}
    )
    await send({"type": "http.response.body", "body": b"" if head else reply.body})


def _environ(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """A WSGI environ for Flask. Repeated headers are joined the way WSGI servers do."""
    server = scope.get("server") or ("127.0.0.1", 0)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": "",
        # WSGI's PATH_INFO is the decoded path's bytes, one character per byte.
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        # The headers as sent, repeats apart, for the routes that read credentials.
        HEADER_VIEW_KEY: HeaderView.from_asgi(scope["headers"], _peer(scope)),
    }
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name == "content-type":
            key = "CONTENT_TYPE"
        elif name == "content-length":
            key = "CONTENT_LENGTH"
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
        if key in environ:
            value = environ[key] + ("; " if name == "cookie" else ",") + value
        environ[key] = value
    return environ

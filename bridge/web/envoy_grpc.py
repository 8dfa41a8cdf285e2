"""Envoy's gRPC ``ext_authz`` (v3): ``envoy.service.auth.v3.Authorization/Check`` on
``BRIDGE_GRPC_PORT``, beside the HTTP endpoints, answered by the same forward-auth path.

- A ``CheckRequest`` is read as the HTTP front reads a request: its
  ``attributes.request.http`` (method, path with the query, host, scheme, headers) becomes
  the ``EnvoyGrpcDialect``'s method, path and ``HeaderView``, so rules, credentials, the
  decision, the identity headers, the JWT and the browser redirects are those of
  ``/ext-authz``. Header values are seen as bytes, one character per byte, as over HTTP;
  with Envoy's ``encode_raw_headers`` (``header_map``) repeats are kept too.
- ``begin`` runs on this server's event loop, with no I/O: a check this process's fresh
  copy answers never leaves it. ``finish`` runs on a worker thread, bounded by the request
  budget like the HTTP front's (then ``timed_out``: 503, or the anonymous allow of a public
  route).
- The ``Reply`` becomes the ``CheckResponse``. A 200 is ``OK`` with an ``OkHttpResponse``:
  the identity headers and the JWT overwrite the upstream request's (so the client's copies
  never pass), and ``Set-Cookie`` goes to the client's response. Anything else is a
  ``DeniedHttpResponse`` with the status, headers (``Location``, ``Retry-After`` ...) and
  JSON body ``/ext-authz`` answers, and ``status`` ``UNAUTHENTICATED`` for 401 and the login
  redirects, ``PERMISSION_DENIED`` for every other refusal.
- Nothing a check sends becomes a gRPC error: bytes that are not a ``CheckRequest``, or one
  without its http attributes, are a 400 denial, and an unexpected failure is a 500 denial.
  A gRPC error is what Envoy's ``failure_mode_allow: true`` would let through: keep it false.
- Every server process serves the port (``SO_REUSEPORT``), each on a thread and event loop
  of its own, from its own copy of sessions, as Granian's workers share the HTTP port. TLS
  when ``BRIDGE_GRPC_TLS_CERT_FILE`` and ``_KEY_FILE`` are set.
- The standard health service (``grpc.health.v1.Health``, ``ReadinessHealth``) says
  ``SERVING`` only while the bridge is ready as ``/health/ready`` says (Redis and Kratos
  answer), ``NOT_SERVING`` otherwise and once the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import (
    CheckRequest,
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.message import DecodeError
from google.rpc.status_pb2 import Status
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bridge.bounded import BoundedMap
from bridge.config import Settings
from bridge.logs import log_unexpected
from bridge.pipeline.forward_auth import ForwardAuth, Pending
from bridge.web import responses
from bridge.web.asgi import off_loop
from bridge.web.health import PUBLIC_READY_FOR_S
from bridge.web.request import HeaderView, declared
from bridge.web.responses import Reply

log = logging.getLogger(__name__)

SERVICE = "envoy.service.auth.v3.Authorization"
# google.rpc.Code: what a CheckResponse's status says; anything but OK is a denial.
OK, PERMISSION_DENIED, UNAUTHENTICATED = 0, 7, 16
_LOGIN = frozenset((302, 303, 401))
# Said to the proxy about its auth answer, never passed to the upstream app.
_NOT_UPSTREAM = frozenset(("cache-control", "set-cookie"))
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
# A method that could not be one is passed on as "?", which the dialect refuses: the
# decision log names the method, and a check request's could be anything.
_METHOD_LIKE = re.compile(r"[\x21-\x7e]{1,32}")
_PEER = re.compile(r"ipv[46]:\[?([0-9A-Fa-f:.]+)\]?:[0-9]+")
STOP_GRACE_SECONDS = 1.0


class Checks:
    """The ``Check`` method, bytes in and bytes out: a request that does not parse is
    refused like any other malformed one instead of failing the call."""

    def __init__(self, forward_auth: ForwardAuth, pool: ThreadPoolExecutor, budget: float) -> None:
        self._forward_auth = forward_auth
        self._dialect = forward_auth.dialects.ext_authz_grpc
        self._pool, self._budget = pool, budget
        # A warm allow is one reply object, reused until its session changes (and the
        # anonymous allow one for all): its answer is serialized once. Holding the reply
        # keeps its id from being reused meanwhile.
        self._serialized: BoundedMap[int, tuple[Reply, bytes]] = BoundedMap(50_000)

    async def check(self, data: bytes, context: Any) -> bytes:
        try:
            reply = await self._reply(data, _peer(context.peer()))
            memo = self._serialized.get(id(reply))
            if memo is not None and memo[0] is reply:
                return memo[1]
            answer = check_response(reply).SerializeToString()
            if reply.status == 200:  # refusals are built anew for each request
                self._serialized.put(id(reply), (reply, answer))
            return answer
        except Exception:
            log_unexpected(log, "CHECK", self._dialect.route)
            return _INTERNAL

    def begin(self, data: bytes, peer: str | None) -> Reply | Pending:
        """The no-I/O step of a check: its answer, or what ``finish`` must ask."""
        http = _http_attributes(data)
        method = http.method if _METHOD_LIKE.fullmatch(http.method) else "?"
        headers = HeaderView(_header_pairs(http), peer)
        return self._forward_auth.begin(self._dialect, headers, method, http.path, "")

    async def _reply(self, data: bytes, peer: str | None) -> Reply:
        step = self.begin(data, peer)
        if isinstance(step, Reply):
            return step
        timed_out = partial(self._forward_auth.timed_out, step)
        return await off_loop(
            self._pool, self._budget, self._forward_auth.finish, step, on_timeout=timed_out
        )


def check_response(reply: Reply) -> CheckResponse:
    """The ``CheckResponse`` Envoy needs for ``reply``."""
    if reply.status == 200:
        upstream = [(n, v) for n, v in reply.headers if n.lower() not in _NOT_UPSTREAM]
        client = [(n, v) for n, v in reply.headers if n.lower() == "set-cookie"]
        return CheckResponse(
            status=Status(code=OK),
            ok_response=OkHttpResponse(
                headers=_options(upstream), response_headers_to_add=_options(client)
            ),
        )
    denied = DeniedHttpResponse(
        status=HttpStatus(code=reply.status),  # Envoy's StatusCode numbers are HTTP's
        headers=_options(reply.headers),
        body=reply.body.decode("utf-8", "replace"),
    )
    code = UNAUTHENTICATED if reply.status in _LOGIN else PERMISSION_DENIED
    return CheckResponse(status=Status(code=code, message=reply.code or ""), denied_response=denied)


def _options(headers: Any) -> list[HeaderValueOption]:
    """Each header overwrites the request's or response's own; cookies add up."""
    return [
        HeaderValueOption(
            header=HeaderValue(key=name.lower(), value=value),
            append_action=_APPEND if name.lower() == "set-cookie" else _OVERWRITE,
        )
        for name, value in headers
    ]


_INTERNAL = check_response(responses.internal_error()).SerializeToString()
_NO_HTTP = AttributeContext.HttpRequest()


def _http_attributes(data: bytes) -> AttributeContext.HttpRequest:
    """The check request's http attributes; empty ones (which the dialect refuses) when
    the bytes are not a ``CheckRequest`` (a string that is not UTF-8, say)."""
    try:
        request = CheckRequest.FromString(data)
    except DecodeError:
        return _NO_HTTP
    return request.attributes.request.http


def _header_pairs(http: AttributeContext.HttpRequest) -> list[tuple[str, str]]:
    """The headers a stage reads, as the HTTP front sees them (one character per byte),
    with the check request's ``host`` as ``Host`` and its ``scheme`` as
    ``X-Forwarded-Proto`` when Envoy did not send that header."""
    wanted = declared()
    if http.HasField("header_map"):  # encode_raw_headers: each header as sent, repeats kept
        pairs = [
            (key, _as_bytes(h.value) if h.value else h.raw_value.decode("latin-1"))
            for h in http.header_map.headers
            if (key := h.key.lower()) in wanted and key != "host"
        ]
    else:  # Envoy's keys are lower case: look up what is read, not every header sent
        headers = http.headers
        pairs = [
            (name, _as_bytes(headers[name]))
            for name in wanted
            if name != "host" and name in headers
        ]
    if http.host:
        pairs.append(("host", _as_bytes(http.host)))
    if http.scheme and not any(name == "x-forwarded-proto" for name, _ in pairs):
        pairs.append(("x-forwarded-proto", http.scheme))
    return pairs


def _as_bytes(value: str) -> str:
    return value if value.isascii() else value.encode("utf-8").decode("latin-1")


def _peer(peer: str) -> str | None:
    """The address of the proxy that asks (``ipv4:10.0.0.1:5432``), as the HTTP front's."""
    match = _PEER.fullmatch(peer or "")
    return match.group(1) if match else None


_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class ReadinessHealth(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health`` for the server (``""``) and ``SERVICE``: ``SERVING`` while
    ``ready()`` (the bridge's readiness, kept a second) says so, else ``NOT_SERVING``.

    Readiness is asked when someone asks, never on its own: a ``Check`` asks it (on
    ``pool``, a thread kept for it: it does I/O, and must not wait behind the authorization
    checks, or a busy bridge would look unhealthy), and while ``Watch`` streams are open it
    is asked every ``every_s``, each change written to every stream. Asks that come while
    one is under way wait for its answer. A failure to ask is ``NOT_SERVING``."""

    SERVICES = frozenset(("", SERVICE))

    def __init__(self, ready: Callable[[], bool], pool: ThreadPoolExecutor, every_s: float):
        self._ready, self._pool, self._every_s = ready, pool, every_s
        self._status = _NOT_SERVING
        self._changed = asyncio.Condition()
        self._asking: asyncio.Future[int] | None = None
        self._watchers = 0
        self._following: asyncio.Task[None] | None = None
        self._stopped = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        if request.service not in self.SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=await self.now())

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if request.service not in self.SERVICES:  # as the protocol says: kept open
            yield health_pb2.HealthCheckResponse(status=_UNKNOWN)
            await asyncio.Event().wait()
            return
        self._watchers += 1
        if self._following is None:
            self._following = asyncio.create_task(self._follow())
        try:
            status = await self.now()
            while True:
                yield health_pb2.HealthCheckResponse(status=status)
                async with self._changed:
                    while self._status == status:
                        await self._changed.wait()
                    status = self._status
        finally:
            self._watchers -= 1

    async def now(self) -> int:
        """The status after asking readiness (or joining the ask under way)."""
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask())
        return await asyncio.shield(self._asking)

    async def stop(self) -> None:
        """``NOT_SERVING`` from now on, told to every stream."""
        self._stopped = True
        await self._tell(_NOT_SERVING)

    async def _ask(self) -> int:
        try:
            ready = await asyncio.get_running_loop().run_in_executor(self._pool, self._ready)
        except Exception:  # when unsure, not ready
            log_unexpected(log, "HEALTH", "grpc.health.v1.Health")
            ready = False
        finally:
            self._asking = None
        await self._tell(_SERVING if ready and not self._stopped else _NOT_SERVING)
        return self._status

    async def _tell(self, status: int) -> None:
        async with self._changed:
            if status != self._status:
                self._status = status
                self._changed.notify_all()

    async def _follow(self) -> None:
        try:
            while self._watchers:
                await self.now()
                await asyncio.sleep(self._every_s)
        finally:
            self._following = None


class GrpcAuthz:
    """One process's gRPC server: ``start`` it once the process's parts are built; it
    serves from a daemon thread with its own event loop until ``stop``. ``ready``: the
    bridge's readiness, which the health service reports."""

    def __init__(
        self, forward_auth: ForwardAuth, settings: Settings, ready: Callable[[], bool]
    ) -> None:
        self._settings = settings
        self._pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="bridge-grpc")
        # Readiness is asked one at a time (ReadinessHealth joins asks): one thread of its own.
        self._health_pool = ThreadPoolExecutor(1, thread_name_prefix="bridge-grpc-health")
        self._checks = Checks(forward_auth, self._pool, settings.request_budget)
        self._ready = ready
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self.port = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bridge-grpc", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """Stop taking checks, give those under way ``STOP_GRACE_SECONDS``, and end."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass  # its loop is closed: stopped already
        if self._thread is not None:
            self._thread.join(STOP_GRACE_SECONDS + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._health_pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # reported to start(), or logged once serving
            if not self._started.is_set():
                self._failure = error
                self._started.set()
            else:
                log.exception("the gRPC server stopped")

    async def _serve(self) -> None:
        settings = self._settings
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        handler = grpc.unary_unary_rpc_method_handler(self._checks.check)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Check": handler}),)
        )
        health = ReadinessHealth(self._ready, self._health_pool, PUBLIC_READY_FOR_S)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        address = _address(settings.host, settings.grpc_port or 0)
        if settings.grpc_tls_cert_file and settings.grpc_tls_key_file:
            key = Path(settings.grpc_tls_key_file).read_bytes()
            chain = Path(settings.grpc_tls_cert_file).read_bytes()
            credentials = grpc.ssl_server_credentials([(key, chain)])
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        await self._stopping.wait()
        await health.stop()
        await server.stop(STOP_GRACE_SECONDS)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

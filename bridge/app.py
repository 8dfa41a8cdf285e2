"""The bridge's parts wired together, and the Flask app that serves apps and health.

``/auth`` is not a Flask route: it is ``bridge.forward_auth``, served straight by the
ASGI front (``bridge.asgi``) and, for WSGI callers such as Flask's test client, by
the small WSGI wrapper below. Flask serves ``/whoami`` and ``/health/*``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from bridge import responses
from bridge.config import Settings
from bridge.credentials import extract
from bridge.errors import BridgeError, StoreUnavailable
from bridge.forward_auth import ForwardAuth
from bridge.kratos import KratosClient
from bridge.mirror import SessionMirror
from bridge.request import HeaderView, original_url
from bridge.responses import Reply
from bridge.store import Keys, SessionStore

log = logging.getLogger(__name__)

AUTH_PATH = "/auth"
HEADER_VIEW_KEY = "bridge.headers"  # environ key: the ASGI front's view of the raw headers


@dataclass(frozen=True)
class Bridge:
    """One process's parts: each outlives requests, none holds a request's state
    (see README, "What a process shares between requests")."""

    settings: Settings
    store: SessionStore
    kratos: KratosClient
    mirror: SessionMirror
    forward_auth: ForwardAuth


def build_store(settings: Settings) -> SessionStore:
    keys = Keys(settings.key_prefix, settings.aal2_stream)
    if settings.redis_url is None:
        from bridge.store.memory import MemoryStore

        return MemoryStore(keys, settings.aal2_stream_maxlen)
    from bridge.store.connect import RedisTarget, redis_target
    from bridge.store.redis import RedisStore

    def connect() -> RedisTarget:
        return redis_target(
            settings.redis_url, settings.redis_timeout, settings.redis_sentinel_password
        )

    return RedisStore(connect, keys, settings.redis_timeout, settings.aal2_stream_maxlen)


def build_bridge(settings: Settings, store: SessionStore | None = None) -> Bridge:
    store = store if store is not None else build_store(settings)
    kratos = KratosClient(
        settings.kratos_public_url,
        settings.kratos_admin_url,
        settings.session_cookie,
        settings.kratos_timeout,
    )
    mirror = SessionMirror(
        store,
        kratos,
        settings.secret,
        settings.revalidate_after,
        settings.negative_cache_ttl,
        settings.kratos_timeout,
        settings.redis_timeout,
    )
    forward_auth = ForwardAuth(mirror, settings.session_cookie, settings.login_url)
    return Bridge(settings, store, kratos, mirror, forward_auth)


def create_app(settings: Settings, store: SessionStore | None = None) -> Flask:
    """The Flask app with ``/auth`` in front of it, for WSGI callers."""
    app = create_flask_app(build_bridge(settings, store))
    app.wsgi_app = auth_in_front(app.extensions["bridge"].forward_auth, app.wsgi_app)  # type: ignore[method-assign]
    return app


def create_flask_app(bridge: Bridge) -> Flask:
    app = Flask("bridge")
    app.extensions["bridge"] = bridge
    settings, mirror = bridge.settings, bridge.mirror

    @app.get("/whoami", provide_automatic_options=False)
    def whoami() -> Response:
        credential = extract(_headers(request.environ), settings.session_cookie)
        resolved = mirror.resolve(credential, with_app=True)
        return as_flask(responses.session_json(resolved.session, resolved.set_cookies))

    @app.get("/health/alive", provide_automatic_options=False)
    def alive() -> Response:
        return as_flask(responses.json_reply(200, {"status": "ok"}))

    @app.get("/health/ready", provide_automatic_options=False)
    def ready() -> Response:
        problems = {}
        topology: dict[str, object] = {}
        try:
            bridge.store.ping()
            topology = bridge.store.topology()
        except StoreUnavailable as error:
            problems["redis"] = str(error)
        kratos_problem = bridge.kratos.ready()
        if kratos_problem is not None:
            problems["kratos"] = kratos_problem
        if problems:
            return as_flask(
                responses.json_reply(503, {"status": "unavailable", "errors": problems})
            )
        return as_flask(responses.json_reply(200, {"status": "ok", "redis": topology}))

    @app.errorhandler(BridgeError)
    def bridge_error(error: BridgeError) -> Response:
        return_to = original_url(_headers(request.environ))
        return as_flask(responses.failure(error, settings.login_url, return_to, forward_auth=False))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        allowed = error.valid_methods if isinstance(error, MethodNotAllowed) else None
        return as_flask(responses.http_error(error.code or 500, error.name, allowed))

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %r", request.path)
        return as_flask(responses.internal_error())

    return app


def _headers(environ: dict[str, Any]) -> HeaderView:
    return environ.get(HEADER_VIEW_KEY) or HeaderView.from_environ(environ)


def as_flask(reply: Reply) -> Response:
    return Response(reply.body, status=reply.status, headers=list(reply.headers))


def auth_query(path: str, query_string: str) -> str | None:
    """The ``aal`` a route asked for. Envoy's ext_authz appends the original path and
    query to ``/auth/``: that query is the app's, and only a plain ``/auth`` has one of
    its own."""
    if path != AUTH_PATH:
        return None
    values = parse_qs(query_string, keep_blank_values=True).get("aal")
    return values[0] if values else None


def is_auth_path(path: str) -> bool:
    return path == AUTH_PATH or path.startswith(AUTH_PATH + "/")


def auth_in_front(forward_auth: ForwardAuth, wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """WSGI: ``/auth`` (any method, any ``/auth/...`` path) goes to the decision; the
    rest to Flask."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not is_auth_path(path):
            return wsgi_app(environ, start_response)
        reply = forward_auth(
            HeaderView.from_environ(environ), auth_query(path, environ.get("QUERY_STRING", ""))
        )
        start_response(f"{reply.status} {HTTPStatus(reply.status).phrase}", list(reply.headers))
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [reply.body]

    return app

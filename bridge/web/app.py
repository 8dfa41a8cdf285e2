"""The Flask app that serves apps and health: ``/whoami``, Kratos's web hooks,
``/health/*``, the JWKS and the OpenAPI document.

``/auth`` is not a Flask route: it is ``bridge.pipeline.forward_auth``, served straight by the
ASGI front (``bridge.web.asgi``) and, for WSGI callers such as Flask's test client, by
the small WSGI wrapper below. The parts it serves with are built by ``bridge.wiring``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from bridge.config import Settings
from bridge.errors import BridgeError
from bridge.logs import log_unexpected
from bridge.pipeline.credentials import extract
from bridge.pipeline.forward_auth import ForwardAuth
from bridge.sessions import app_data
from bridge.store import SessionStore
from bridge.web import health, openapi, responses
from bridge.web.app_token import APP_TOKEN_HEADER, require_app_token
from bridge.web.hooks import FLOWS, HOOK_KEY_HEADER
from bridge.web.logout import METHODS as LOGOUT_METHODS
from bridge.web.request import HeaderView
from bridge.web.responses import Reply
from bridge.wiring import Bridge, build_bridge, kratos_hooks, sign_out

log = logging.getLogger(__name__)

HEADER_VIEW_KEY = "bridge.headers"  # environ key: the ASGI front's view of the raw headers
# The Flask routes that read a request body; every other route is answered without one
# (the ASGI front reads a body only for these, within BRIDGE_BODY_TIMEOUT).
BODY_ENDPOINTS = frozenset({"patch_app", "kratos_hook"})
_JWKS_TYPE = ("Content-Type", "application/jwk-set+json")
_JWKS_CACHE = ("Cache-Control", "public, max-age=60")


def create_app(settings: Settings, store: SessionStore | None = None) -> Flask:
    """The Flask app with ``/auth`` in front of it, for WSGI callers."""
    bridge = build_bridge(settings, store)
    app = create_flask_app(bridge)
    app.wsgi_app = auth_in_front(bridge.forward_auth, app.wsgi_app)  # type: ignore[method-assign]
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

    @app.patch("/whoami/app", provide_automatic_options=False)
    def patch_app() -> Response:
        """JSON merge patch (RFC 7396) of the session's app section, at the top level: each
        field named is replaced whole, ``null`` deletes it. Only for an app: the app token
        is checked first, before the body or Kratos (``bridge.web.app_token``)."""
        require_app_token(settings.app_token, request.headers.get(APP_TOKEN_HEADER))
        if request.mimetype not in ("application/merge-patch+json", "application/json"):
            return as_flask(responses.http_error(415, "Unsupported Media Type"))
        values, delete = app_data.merge_patch(request.get_data())
        credential = extract(_headers(request.environ), settings.session_cookie)
        resolved = mirror.resolve(credential)
        app_fields = bridge.store.update_app(
            resolved.session.id, values, delete, settings.app_data_max_bytes
        )
        body = {"session_id": resolved.session.id, "app": app_data.decoded(app_fields)}
        return as_flask(responses.json_reply(200, body))

    logout = sign_out(bridge)

    @app.route(
        settings.logout_path,
        methods=list(LOGOUT_METHODS),
        endpoint="logout",
        provide_automatic_options=False,
    )
    def logout_route() -> Response:
        """Sign-out (``bridge.web.logout``): reads no body, ``return_to`` is in the query."""
        query = request.environ.get("QUERY_STRING", "")
        return as_flask(logout(_headers(request.environ), request.method, query))

    hooks = kratos_hooks(bridge)

    @app.post("/hooks/kratos/<flow>", provide_automatic_options=False)
    def kratos_hook(flow: str) -> Response:
        if hooks is None or flow not in FLOWS:
            return as_flask(responses.http_error(404, "Not Found"))
        if not hooks.authentic(request.headers.get(HOOK_KEY_HEADER)):
            return as_flask(responses.http_error(401, "Unauthorized"))
        return as_flask(hooks.handle(flow, request.get_data()))

    @app.get("/health/alive", provide_automatic_options=False)
    def alive() -> Response:
        return as_flask(responses.json_reply(200, {"status": "ok"}))

    @app.get("/health/ready", provide_automatic_options=False)
    def ready() -> Response:
        """Status only, and checked at most once a second: anyone may ask
        (``bridge.web.health``)."""
        return as_flask(health.status_reply(bridge.ready()))

    openapi.add_routes(app)

    @app.get("/.well-known/jwks.json", provide_automatic_options=False)
    def jwks() -> Response:
        if bridge.keyring is None:
            return as_flask(responses.http_error(404, "Not Found"))
        reply = Reply(200, (_JWKS_TYPE, _JWKS_CACHE), bridge.keyring.jwks())
        return as_flask(reply)

    @app.errorhandler(BridgeError)
    def bridge_error(error: BridgeError) -> Response:
        return as_flask(responses.refusal(error, bridge.redirects, None).reply())

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        allowed = None
        if isinstance(error, MethodNotAllowed) and error.valid_methods is not None:
            allowed = list(error.valid_methods)
        return as_flask(responses.http_error(error.code or 500, error.name, allowed))

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        rule = request.url_rule
        log_unexpected(log, request.method, rule.rule if rule is not None else None)
        return as_flask(responses.internal_error())

    return app


def takes_body(app: Flask, method: str, path: str) -> bool:
    """Whether the route ``method path`` leads to reads a request body. A path no route
    matches, or a method the route does not answer, takes none: it gets 404 or 405."""
    try:
        endpoint, _ = app.url_map.bind("bridge").match(path, method)
    except HTTPException:
        return False
    return endpoint in BODY_ENDPOINTS


def _headers(environ: dict[str, Any]) -> HeaderView:
    return environ.get(HEADER_VIEW_KEY) or HeaderView.from_environ(environ)


def as_flask(reply: Reply) -> Response:
    return Response(reply.body, status=reply.status, headers=list(reply.headers))


def raw_path(environ: dict[str, Any]) -> str:
    """The request path as the client sent it (not percent-decoded), from a WSGI environ."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return raw.partition("?")[0]
    return quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/;=,:@!$&'()*+")


def auth_in_front(forward_auth: ForwardAuth, wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """WSGI: the dialect paths (``/auth``, ``/forward-auth``, ``/ext-authz/...``) go to the
    forward-auth path; the rest to Flask."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = raw_path(environ)
        dialect = forward_auth.dialect_for(path)
        if dialect is None:
            return wsgi_app(environ, start_response)
        reply = forward_auth(
            dialect,
            HeaderView.from_environ(environ),
            environ.get("REQUEST_METHOD", "GET"),
            path,
            environ.get("QUERY_STRING", ""),
        )
        start_response(f"{reply.status} {HTTPStatus(reply.status).phrase}", list(reply.headers))
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [reply.body]

    return app

"""The Flask app: forward-auth, whoami for apps, and health.

The request path reads as credential -> session -> decision -> response:
``credentials.extract``, ``SessionMirror.resolve``, ``policy``, and ``responses``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask, Request, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from bridge import policy, responses
from bridge.config import Settings
from bridge.credentials import extract
from bridge.errors import BridgeError, StoreUnavailable
from bridge.kratos import KratosClient
from bridge.mirror import SessionMirror
from bridge.store import Keys, SessionStore

log = logging.getLogger(__name__)

_FORWARDED_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?")
_FORWARDED_URI = re.compile(r"/[\x21-\x7e]{0,2047}")
_ORIGINAL_URL = re.compile(r"https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?(/[\x21-\x7e]{0,2047})?")


def build_store(settings: Settings) -> SessionStore:
    keys = Keys(settings.key_prefix, settings.aal2_stream)
    if settings.redis_url is None:
        from bridge.store.memory import MemoryStore

        return MemoryStore(keys, settings.aal2_stream_maxlen)
    from bridge.store.redis import RedisStore

    return RedisStore(settings.redis_url, keys, settings.redis_timeout, settings.aal2_stream_maxlen)


def create_app(settings: Settings, store: SessionStore | None = None) -> Flask:
    app = Flask("bridge")
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
    )
    app.extensions["bridge"] = {"store": store, "kratos": kratos, "mirror": mirror}
    app.wsgi_app = _every_auth_path_is_auth(app.wsgi_app)  # type: ignore[method-assign]

    @app.get("/auth")
    def auth() -> Response:
        required = policy.required_aal(request.args.get("aal"))
        credential = extract(request.headers, settings.session_cookie)
        resolved = mirror.resolve(credential)
        if not policy.meets_aal(resolved.session, required):
            # The user may have just completed the second factor: ask Kratos, not the copy.
            resolved = mirror.resolve(credential, refresh=True)
        policy.enforce_aal(resolved.session, required)
        return responses.allow(resolved.session, resolved.set_cookies)

    @app.get("/whoami")
    def whoami() -> Response:
        credential = extract(request.headers, settings.session_cookie)
        resolved = mirror.resolve(credential, with_app=True)
        return responses.session_json(resolved.session, resolved.set_cookies)

    @app.get("/health/alive")
    def alive() -> Response:
        return jsonify(status="ok")

    @app.get("/health/ready")
    def ready() -> Response | tuple[Response, int]:
        problems = {}
        try:
            store.ping()
        except StoreUnavailable as error:
            problems["redis"] = str(error)
        kratos_problem = kratos.ready()
        if kratos_problem is not None:
            problems["kratos"] = kratos_problem
        if problems:
            return jsonify(status="unavailable", errors=problems), 503
        return jsonify(status="ok")

    @app.errorhandler(BridgeError)
    def bridge_error(error: BridgeError) -> Response:
        return responses.failure(error, settings.login_url, original_url(request))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        return responses.http_error(error.code or 500, error.name)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %s", request.path)
        return responses.internal_error()

    return app


def _every_auth_path_is_auth(wsgi_app: Any) -> Any:
    """Envoy's ext_authz keeps the original method and appends the original path and
    query (``/auth/``, ``/auth//x``, ``/auth/a%2Fb?q``); the decision depends on none of
    them. Only a plain ``/auth`` has a query of its own (``?aal=``)."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/auth/"):
            environ["PATH_INFO"] = "/auth"
            environ["QUERY_STRING"] = ""
        if environ.get("PATH_INFO") == "/auth" and environ.get("REQUEST_METHOD") != "HEAD":
            environ["REQUEST_METHOD"] = "GET"
        return wsgi_app(environ, start_response)

    return app


def original_url(req: Request) -> str | None:
    """The URL the user asked the proxy for, if the proxy told us and it looks sane."""
    original = req.headers.get("X-Original-URL")
    if original and _ORIGINAL_URL.fullmatch(original):
        return original
    proto = req.headers.get("X-Forwarded-Proto", "")
    host = req.headers.get("X-Forwarded-Host", "")
    uri = req.headers.get("X-Forwarded-Uri", "/")
    if (
        proto in ("http", "https")
        and _FORWARDED_HOST.fullmatch(host)
        and _FORWARDED_URI.fullmatch(uri)
    ):
        return f"{proto}://{host}{uri}"
    return None

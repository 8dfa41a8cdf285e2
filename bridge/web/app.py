"""The bridge's parts wired together, and the Flask app that serves apps and health.

``/auth`` is not a Flask route: it is ``bridge.pipeline.forward_auth``, served straight by the
ASGI front (``bridge.web.asgi``) and, for WSGI callers such as Flask's test client, by
the small WSGI wrapper below. Flask serves ``/whoami`` and ``/health/*``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from bridge.clock import now_ms
from bridge.config import Settings
from bridge.errors import BridgeError
from bridge.kratos.whoami import KratosClient
from bridge.logs import log_unexpected
from bridge.observe import decision_log
from bridge.pipeline.credentials import extract
from bridge.pipeline.devices import DeviceChange, DeviceWatch
from bridge.pipeline.dialects import Dialects
from bridge.pipeline.forward_auth import DecisionWatcher, ForwardAuth
from bridge.pipeline.redirects import BrowserRedirects, Origin, host_origin
from bridge.pipeline.rules import Rules
from bridge.pipeline.upstream_headers import UpstreamHeaders
from bridge.sessions import app_data
from bridge.sessions.mirror import AllOf, SessionEvents, SessionMirror
from bridge.store import Keys, SessionStore
from bridge.web import health, openapi, responses
from bridge.web.app_token import APP_TOKEN_HEADER, require_app_token
from bridge.web.hooks import FLOWS, HOOK_KEY_HEADER, KratosHooks
from bridge.web.request import HeaderView
from bridge.web.responses import Reply

if TYPE_CHECKING:
    from bridge.observe.analytics import Recorder
    from bridge.observe.metrics import Metrics
    from bridge.pipeline.tokens import KeyRing

log = logging.getLogger(__name__)

HEADER_VIEW_KEY = "bridge.headers"  # environ key: the ASGI front's view of the raw headers
# The Flask routes that read a request body; every other route is answered without one
# (the ASGI front reads a body only for these, within BRIDGE_BODY_TIMEOUT).
BODY_ENDPOINTS = frozenset({"patch_app", "kratos_hook"})
_JWKS_TYPE = ("Content-Type", "application/jwk-set+json")
_JWKS_CACHE = ("Cache-Control", "public, max-age=60")


@dataclass(frozen=True)
class Bridge:
    """One process's parts: each outlives requests, none holds a request's state
    (see README, "What a process shares between requests")."""

    settings: Settings
    store: SessionStore
    kratos: KratosClient
    mirror: SessionMirror
    forward_auth: ForwardAuth
    dialects: Dialects
    redirects: BrowserRedirects
    keyring: KeyRing | None  # when JWTs are on: the keys behind /.well-known/jwks.json
    recorder: Recorder | None = None  # when analytics are on
    metrics: Metrics | None = None  # when metrics are on
    events: SessionEvents = field(default_factory=SessionEvents)  # what watches sessions

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        if self.metrics is not None:
            self.metrics.close()
        self.mirror.close()
        self.kratos.close()
        self.store.close()


def build_store(settings: Settings) -> SessionStore:
    keys = Keys(settings.key_prefix, settings.aal2_stream, settings.device_stream)
    if settings.redis_url is None:
        from bridge.store.memory.store import MemoryStore

        return MemoryStore(
            keys,
            settings.aal2_stream_maxlen,
            settings.device_stream_maxlen,
            settings.analytics_retention_days,
        )
    from bridge.store.redis.connection import RedisTarget, redis_target
    from bridge.store.redis.store import RedisStore

    redis_url = settings.redis_url

    def connect() -> RedisTarget:
        return redis_target(redis_url, settings.redis_timeout, settings.redis_sentinel_password)

    return RedisStore(
        connect,
        keys,
        settings.redis_timeout,
        settings.aal2_stream_maxlen,
        settings.device_stream_maxlen,
        settings.analytics_retention_days,
    )


def build_bridge(settings: Settings, store: SessionStore | None = None) -> Bridge:
    store = store if store is not None else build_store(settings)
    metrics = None
    if settings.metrics:
        from bridge.observe.metrics import Metrics

        metrics = Metrics()
        store.error_observer = metrics.redis_error
    kratos = KratosClient(
        settings.kratos_public_url,
        settings.kratos_admin_url,
        settings.session_cookie,
        settings.kratos_timeout,
        observe=metrics.kratos_call if metrics is not None else None,
    )
    recorder = None
    if settings.analytics:
        from bridge.observe.analytics import Recorder

        recorder = Recorder(store.registry)
    session_events = metrics.session_events() if metrics is not None else None
    events = AllOf([w for w in (recorder, session_events) if w is not None])
    mirror = SessionMirror(
        store,
        kratos,
        settings.secret,
        settings.revalidate_after,
        settings.negative_cache_ttl,
        settings.request_budget,
        events=events,
    )
    rules = load_rules(settings)
    redirects = BrowserRedirects(settings.login_url, return_to_origins(settings, rules))
    keyring = minter = None
    if settings.jwt_header is not None and settings.jwt_keys_dir is not None:
        from bridge.pipeline.tokens import (  # cryptography, only when JWTs are on
            KeyRing,
            TokenMinter,
        )

        keyring = KeyRing(Path(settings.jwt_keys_dir))
        minter = TokenMinter(
            keyring,
            settings.jwt_issuer,
            settings.jwt_ttl,
            settings.jwt_audience,
            settings.jwt_traits,
        )
    upstream = UpstreamHeaders(settings.identity_headers, minter, settings.jwt_header)
    devices = DeviceWatch(
        settings.on_device_change, settings.trusted_proxies, device_recorder(store)
    )
    forward_auth = ForwardAuth(
        mirror,
        settings.session_cookie,
        rules,
        redirects,
        upstream,
        devices,
        watchers=decision_watchers(settings, recorder, metrics),
    )
    dialects = Dialects(url_required=rules.configured, host_required=bool(rules.hosts))
    return Bridge(
        settings,
        store,
        kratos,
        mirror,
        forward_auth,
        dialects,
        redirects,
        keyring,
        recorder,
        metrics,
        events,
    )


def decision_watchers(
    settings: Settings, recorder: Recorder | None, metrics: Metrics | None
) -> list[DecisionWatcher]:
    watchers: list[DecisionWatcher] = []
    if settings.log_decisions:
        watchers.append(decision_log.record)
    if recorder is not None:
        watchers.append(recorder.watch)
    if metrics is not None:
        watchers.append(metrics.decision_watcher())
    return watchers


def device_recorder(store: SessionStore) -> Callable[[DeviceChange], None]:
    def record(change: DeviceChange) -> None:
        store.record_device_change(
            change.change_id, change.fields(now_ms()), max(change.expires_at_ms, now_ms())
        )

    return record


def load_rules(settings: Settings) -> Rules:
    if settings.rules_file is None:
        return Rules.everything_authenticated()
    return Rules.load(settings.rules_file)


def return_to_origins(settings: Settings, rules: Rules) -> tuple[Origin, ...]:
    """``BRIDGE_RETURN_TO_ORIGINS``, else every host the rules file names."""
    if settings.return_to_origins is not None:
        return settings.return_to_origins
    return tuple(host_origin(host) for host in rules.hosts)


def create_app(settings: Settings, store: SessionStore | None = None) -> Flask:
    """The Flask app with ``/auth`` in front of it, for WSGI callers."""
    app = create_flask_app(build_bridge(settings, store))
    app.wsgi_app = auth_in_front(app.extensions["bridge"], app.wsgi_app)  # type: ignore[method-assign]
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

    ready_now = health.KeptStatus(
        lambda: health.check(bridge.store, bridge.kratos, with_topology=False).ready,
        health.PUBLIC_READY_FOR_S,
    )

    @app.get("/health/ready", provide_automatic_options=False)
    def ready() -> Response:
        """Status only, and checked at most once a second: anyone may ask
        (``bridge.web.health``)."""
        return as_flask(health.status_reply(ready_now()))

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


def kratos_hooks(bridge: Bridge) -> KratosHooks | None:
    """The web hook endpoint's handler, when ``BRIDGE_HOOK_SECRET`` turns it on."""
    settings = bridge.settings
    if settings.hook_secret is None:
        return None
    return KratosHooks(
        settings.hook_secret,
        bridge.store,
        settings.kratos_admin_url,
        settings.kratos_timeout,
        events=bridge.events,
    )


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


def auth_in_front(bridge: Bridge, wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """WSGI: the dialect paths (``/auth``, ``/forward-auth``, ``/ext-authz/...``) go to the
    forward-auth path; the rest to Flask."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = raw_path(environ)
        dialect = bridge.dialects.for_path(path)
        if dialect is None:
            return wsgi_app(environ, start_response)
        reply = bridge.forward_auth(
            dialect,
            HeaderView.from_environ(environ),
            environ.get("REQUEST_METHOD", "GET"),
            path,
            environ.get("QUERY_STRING", ""),
        )
        start_response(f"{reply.status} {HTTPStatus(reply.status).phrase}", list(reply.headers))
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [reply.body]

    return app

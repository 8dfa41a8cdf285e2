"""The admin API: sessions as the bridge saw them, revocation through Kratos, AAL2
events, statistics and metrics; served by the admin listener only, with the dashboard
(``bridge.admin.ui``) beside it.

Every route needs the bearer token when ``BRIDGE_ADMIN_TOKEN`` is set (compared in
constant time). Without one the listener is only ever on a loopback address, and it
answers only requests that name a loopback host and come from no other site, so a web
page cannot reach it through the browser (DNS rebinding, cross-site forms). Answers and
errors are JSON (``{"error", "message"}``); lists are paged by ``page_size`` and an opaque
``page_token``. What the routes do is ``bridge.admin.sessions``.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from bridge.admin import statuses
from bridge.admin.gate import Gate, canonical_uuid, local_and_same_site
from bridge.admin.sessions import AdminParts, SessionAdmin
from bridge.clock import now_ms, parse_timestamp_ms
from bridge.errors import BadRequest, BridgeError, NotFound
from bridge.kratos.admin import KratosAdmin
from bridge.logs import log_unexpected
from bridge.web import health, openapi, responses
from bridge.web.cpu_budget import WorkerCount, worker_count
from bridge.web.responses import Reply

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
DEFAULT_EVENTS_WINDOW = "24h"
DEFAULT_STATS_WINDOW = "7d"
MAX_WINDOW_DAYS = 366
_DURATION = re.compile(r"([1-9][0-9]{0,5})([mhd])")
_UNIT_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}
_STREAM_ID = re.compile(r"[0-9]{1,15}-[0-9]{1,10}")
_PAGE_SIZE = re.compile(r"[0-9]{1,3}")


def create_admin_app(
    bridge: AdminParts,
    kratos_admin: KratosAdmin | None = None,
    workers: WorkerCount | None = None,
) -> Flask:
    """``workers``: the server processes ``serve`` started, and why (by default, what it
    would start with these settings), for ``/health/ready``."""
    from bridge.admin.ui import create_ui  # Jinja and the templates: only with a listener

    settings = bridge.settings
    if workers is None:
        workers = worker_count(settings)
    admin = SessionAdmin(bridge, kratos_admin)
    gate = Gate(settings.admin_token, settings.secret)
    app = Flask("bridge.admin", static_folder=None)
    app.extensions["session_admin"] = admin
    app.register_blueprint(create_ui(bridge, admin, gate))

    @app.before_request
    def authenticate() -> Response | None:
        if not gate.token_required:
            if local_and_same_site():
                return None
            reply = _error(
                403,
                "forbidden",
                "without BRIDGE_ADMIN_TOKEN the admin listener answers only requests to a "
                "loopback host name that come from no other site",
            )
            return _flask(reply)
        if request.blueprint == "ui":
            return None  # the dashboard's own gate: a login form and a cookie (bridge.admin.ui)
        if gate.bearer_ok():
            return None
        reply = _error(401, "unauthorized", "a valid admin bearer token is required")
        return _flask(reply, extra=(("WWW-Authenticate", 'Bearer realm="kratos-bridge admin"'),))

    @app.get("/admin/sessions", provide_automatic_options=False)
    def list_sessions() -> Response:
        listing = admin.page(_page_size(), _page_token())
        return _json({"sessions": listing.sessions, "next_page_token": listing.next_page_token})

    @app.get("/admin/identities/<identity_id>/sessions", provide_automatic_options=False)
    def identity_sessions(identity_id: str) -> Response:
        identity_id = _uuid(identity_id, "identity_id")
        listing = admin.of_identity(identity_id, _page_size(), _page_token())
        return _json({"sessions": listing.sessions, "next_page_token": listing.next_page_token})

    @app.get("/admin/sessions/<session_id>", provide_automatic_options=False)
    def show_session(session_id: str) -> Response:
        return _json(admin.show(_uuid(session_id, "session_id")))

    @app.delete("/admin/sessions/<session_id>", provide_automatic_options=False)
    def revoke_session(session_id: str) -> Response:
        return _json({"revoked": admin.revoke(_uuid(session_id, "session_id"))})

    @app.delete("/admin/identities/<identity_id>/sessions", provide_automatic_options=False)
    def revoke_identity(identity_id: str) -> Response:
        identity_id = _uuid(identity_id, "identity_id")
        spared = request.args.get("except")
        spared = _uuid(spared, "except") if spared is not None else None
        return _json({"revoked": admin.revoke_identity(identity_id, spared)})

    @app.get("/admin/events/aal2", provide_automatic_options=False)
    def aal2_events() -> Response:
        now = now_ms()
        since = _moment(request.args.get("since", DEFAULT_EVENTS_WINDOW), now, "since")
        until = _moment(request.args.get("until"), now, "until")
        if since > until:
            raise BadRequest("since is after until")
        identity_id = request.args.get("identity_id")
        if identity_id is not None:
            identity_id = _uuid(identity_id, "identity_id")
        after = request.args.get("page_token")
        if after is not None and not _STREAM_ID.fullmatch(after):
            raise BadRequest("page_token is not one this API gave out")
        found = admin.aal2_events(since, until, _page_size(), after, identity_id)
        return _json({"events": found.events, "next_page_token": found.next_page_token})

    @app.get("/admin/stats", provide_automatic_options=False)
    def stats() -> Response:
        now = now_ms()
        since = _moment(request.args.get("since", DEFAULT_STATS_WINDOW), now, "since")
        if now - since > MAX_WINDOW_DAYS * _UNIT_MS["d"]:
            raise BadRequest(f"since reaches back more than {MAX_WINDOW_DAYS} days")
        return _json(admin.stats(since, now))

    @app.get("/metrics", provide_automatic_options=False)
    def metrics_route() -> Response:
        if bridge.metrics is None:
            raise NotFound("metrics are off (BRIDGE_METRICS=false)")
        # The registry knows the active sessions only when analytics are on.
        active = admin.active_sessions if bridge.recorder is not None else None
        body, content_type = bridge.metrics.exposition(active)
        return Response(body, status=200, content_type=content_type)

    @app.get("/health/alive", provide_automatic_options=False)
    def alive() -> Response:
        return _json({"status": "ok"})

    @app.get("/health/ready", provide_automatic_options=False)
    def ready() -> Response:
        """The full answer, checked now: the topology, or what failed and why."""
        return _flask(health.check(bridge.store, bridge.kratos).full_reply(workers))

    openapi.add_routes(app)

    @app.errorhandler(BridgeError)
    def bridge_error(error: BridgeError) -> Response:
        return _flask(_error(*statuses.answer(error)))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        extra: tuple[tuple[str, str], ...] = ()
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            extra = (("Allow", ", ".join(error.valid_methods)),)
        return _flask(_error(error.code or 500, code, error.description or code), extra=extra)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        rule = request.url_rule
        log_unexpected(app.logger, request.method, rule.rule if rule is not None else None)
        return _flask(_error(500, "internal_error", "the request could not be handled"))

    return app


def _page_size() -> int:
    text = request.args.get("page_size")
    if text is None:
        return DEFAULT_PAGE_SIZE
    if not _PAGE_SIZE.fullmatch(text) or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise BadRequest(f"page_size must be 1..{MAX_PAGE_SIZE}")
    return int(text)


def _page_token() -> str | None:
    return request.args.get("page_token") or None


def _uuid(value: str, name: str) -> str:
    canonical = canonical_uuid(value)
    if canonical is None:
        raise BadRequest(f"{name} is not a UUID")
    return canonical


def _moment(text: str | None, now: int, name: str) -> int:
    """An RFC 3339 time, or a duration back from now (``15m``, ``24h``, ``7d``), between
    the Unix epoch and now."""
    if text is None:
        return now
    relative = _DURATION.fullmatch(text)
    if relative is not None:
        moment = now - int(relative[1]) * _UNIT_MS[relative[2]]
    else:
        try:
            moment = parse_timestamp_ms(text.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"{name} is neither an RFC 3339 time nor a duration like 7d") from None
    if not 0 <= moment <= now:
        raise BadRequest(f"{name} is before 1970 or in the future")
    return moment


def _error(status: int, code: str, message: str) -> Reply:
    return responses.json_reply(status, {"error": code, "message": message})


def _json(body: dict[str, Any]) -> Response:
    return _flask(responses.json_reply(200, body))


def _flask(reply: Reply, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(reply.body, status=reply.status, headers=[*reply.headers, *extra])

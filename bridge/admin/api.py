"""The admin API: sessions as the bridge saw them, revocation through Kratos, AAL2
events, statistics and metrics; served by the admin listener only.

Every route needs the bearer token when ``BRIDGE_ADMIN_TOKEN`` is set (compared in
constant time); without one the listener is only ever on a loopback address. Answers
and errors are JSON (``{"error", "message"}``); lists are paged by ``page_size`` and an
opaque ``page_token``.

A revocation is Kratos's first: the session is disabled through Kratos's admin API, and
only once Kratos said so is the mirror dropped, with an announcement that makes every
bridge process drop its own copy at once (``SessionStore.end_session``). A Kratos failure
is answered ``502`` and changes nothing here.
"""

from __future__ import annotations

import hmac
import re
import uuid
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from bridge import openapi, responses
from bridge.admin.analytics import statistics
from bridge.admin.kratos_admin import KratosAdmin
from bridge.errors import BadRequest, BridgeError, KratosUnavailable, StoreUnavailable
from bridge.kratos import parse_timestamp_ms
from bridge.mirror import now_ms
from bridge.responses import Reply
from bridge.session import iso
from bridge.store.registry import after_token, days_between, page_token, read_page_token

if TYPE_CHECKING:
    from bridge.admin.analytics import Recorder
    from bridge.app import Bridge


DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
DEFAULT_EVENTS_WINDOW = "24h"
DEFAULT_STATS_WINDOW = "7d"
MAX_WINDOW_DAYS = 366
_DURATION = re.compile(r"([1-9][0-9]{0,5})([mhd])")
_UNIT_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}
_STREAM_ID = re.compile(r"[0-9]{1,15}-[0-9]{1,10}")


class AdminError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def create_admin_app(bridge: Bridge, kratos_admin: KratosAdmin | None = None) -> Flask:
    settings, store = bridge.settings, bridge.store
    recorder: Recorder | None = bridge.recorder
    kratos = kratos_admin or KratosAdmin(settings.kratos_admin_url, settings.kratos_timeout)
    token = settings.admin_token.encode() if settings.admin_token is not None else None
    # A save asked of Kratos before the revocation may still be under way this long.
    keep_ms = int((settings.kratos_timeout + 2 * settings.redis_timeout) * 1000) + 60_000
    app = Flask("bridge.admin")
    app.extensions["kratos_admin"] = kratos

    @app.before_request
    def authenticate() -> Response | None:
        if token is None:
            return None
        scheme, _, presented = (request.headers.get("Authorization") or "").partition(" ")
        given = presented.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() == "bearer" and hmac.compare_digest(given, token):
            return None
        reply = _error(401, "unauthorized", "a valid admin bearer token is required")
        return _flask(reply, extra=(("WWW-Authenticate", 'Bearer realm="kratos-bridge admin"'),))

    @app.get("/admin/sessions", provide_automatic_options=False)
    def list_sessions() -> Response:
        page = store.registry.page(_page_size(), _page_token())
        sessions = [_session(r) for r in page.records]
        return _json({"sessions": sessions, "next_page_token": page.next_token})

    @app.get("/admin/identities/<identity_id>/sessions", provide_automatic_options=False)
    def identity_sessions(identity_id: str) -> Response:
        identity_id = _uuid(identity_id, "identity_id")
        size, token_ = _page_size(), _page_token()
        ids = store.identity_session_ids(identity_id, now_ms())
        records = sorted(
            store.registry.records(ids),
            key=lambda r: (r["started_at"], r["session_id"]),
            reverse=True,
        )
        if token_ is not None:
            ranked = [(r["session_id"], r["started_at"]) for r in records]
            keep = set(after_token(ranked, read_page_token(token_)))
            records = [r for r in records if r["session_id"] in keep]
        page, more = records[:size], len(records) > size
        return _json(
            {
                "sessions": [_session(r) for r in page],
                "next_page_token": page_token(page[-1]) if more and page else None,
            }
        )

    @app.get("/admin/sessions/<session_id>", provide_automatic_options=False)
    def show_session(session_id: str) -> Response:
        session_id = _uuid(session_id, "session_id")
        found = store.registry.records([session_id])
        in_kratos = kratos.session(session_id)
        if not found and in_kratos is None:
            raise AdminError(404, "not_found", "neither the bridge nor Kratos knows this session")
        mirrored = store.load(session_id, with_app=True)
        return _json(
            {
                "session": _session(found[0]) if found else _from_kratos(in_kratos),
                "active_in_kratos": bool(in_kratos and in_kratos.get("active")),
                "unified": mirrored.to_json() if mirrored is not None else None,
                "app_keys": sorted(mirrored.app) if mirrored is not None else [],
            }
        )

    @app.delete("/admin/sessions/<session_id>", provide_automatic_options=False)
    def revoke_session(session_id: str) -> Response:
        session_id = _uuid(session_id, "session_id")
        if not kratos.revoke(session_id):
            raise AdminError(404, "not_found", "Kratos knows no such session")
        end(session_id)
        return _json({"revoked": [session_id]})

    @app.delete("/admin/identities/<identity_id>/sessions", provide_automatic_options=False)
    def revoke_identity(identity_id: str) -> Response:
        identity_id = _uuid(identity_id, "identity_id")
        spared = request.args.get("except")
        spared = _uuid(spared, "except") if spared is not None else None
        in_kratos = kratos.active_session_ids(identity_id)
        if in_kratos is None:
            raise AdminError(404, "not_found", "Kratos knows no such identity")
        known = store.identity_session_ids(identity_id, now_ms())
        doomed = [sid for sid in dict.fromkeys([*in_kratos, *known]) if sid != spared]
        if spared is None:
            kratos.revoke_identity(identity_id)
        else:
            for sid in in_kratos:
                if sid != spared:
                    kratos.revoke(sid)
        for sid in doomed:
            end(sid)
        return _json({"revoked": doomed})

    def end(session_id: str) -> None:
        at = now_ms()
        store.end_session(session_id, at, keep_ms)
        if recorder is not None:
            recorder.ended(session_id, "revoked", at)

    @app.get("/admin/events/aal2", provide_automatic_options=False)
    def aal2_events() -> Response:
        now = now_ms()
        since = _moment(request.args.get("since", DEFAULT_EVENTS_WINDOW), now, "since")
        until = _moment(request.args.get("until"), now, "until")
        identity_id = request.args.get("identity_id")
        if identity_id is not None:
            identity_id = _uuid(identity_id, "identity_id")
        size, after = _page_size(), request.args.get("page_token")
        if after is not None and not _STREAM_ID.fullmatch(after):
            raise AdminError(400, "bad_request", "page_token is not one this API gave out")
        events: list[dict[str, str]] = []
        last = after
        while len(events) < size:
            batch = store.aal2_event_range(last, since, until, size)
            for entry_id, fields in batch:
                last = entry_id
                if identity_id is None or fields.get("identity_id") == identity_id:
                    at = iso(int(entry_id.split("-")[0]))
                    events.append({"id": entry_id, "at": at, **fields})
                    if len(events) == size:
                        break
            if len(batch) < size:
                last = None if len(events) < size else last
                break
        return _json({"events": events, "next_page_token": last if len(events) == size else None})

    @app.get("/admin/stats", provide_automatic_options=False)
    def stats() -> Response:
        now = now_ms()
        since = _moment(request.args.get("since", DEFAULT_STATS_WINDOW), now, "since")
        if now - since > MAX_WINDOW_DAYS * _UNIT_MS["d"]:
            raise AdminError(
                400, "bad_request", f"since reaches back more than {MAX_WINDOW_DAYS} days"
            )
        if recorder is not None:
            recorder.flush()  # this process's own counts, up to now
        store.registry.sweep(now)  # sessions that expired are counted as ended by now
        return _json(statistics(store.registry, since, now, settings.analytics_retention_days))

    def active_sessions() -> int:
        now = now_ms()
        return store.registry.counts(days_between(now, now), now, now).active

    @app.get("/metrics", provide_automatic_options=False)
    def metrics_route() -> Response:
        if bridge.metrics is None:
            raise AdminError(404, "not_found", "metrics are off (BRIDGE_METRICS=false)")
        # The registry knows the active sessions only when analytics are on.
        active = active_sessions if bridge.recorder is not None else None
        body, content_type = bridge.metrics.exposition(active)
        return Response(body, status=200, content_type=content_type)

    @app.get("/health/alive", provide_automatic_options=False)
    def alive() -> Response:
        return _json({"status": "ok"})

    openapi.add_routes(app)

    @app.errorhandler(AdminError)
    def admin_error(error: AdminError) -> Response:
        return _flask(_error(error.status, error.code, error.message))

    @app.errorhandler(BadRequest)
    def bad_request(error: BadRequest) -> Response:
        return _flask(_error(400, "bad_request", str(error)))

    @app.errorhandler(KratosUnavailable)
    def kratos_down(error: KratosUnavailable) -> Response:
        return _flask(_error(502, "kratos_unavailable", str(error)))

    @app.errorhandler(StoreUnavailable)
    def store_down(error: StoreUnavailable) -> Response:
        return _flask(_error(503, "store_unavailable", str(error)))

    @app.errorhandler(BridgeError)
    def bridge_error(error: BridgeError) -> Response:
        return _flask(_error(500, "internal_error", "the request could not be handled"))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        extra = ()
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            extra = (("Allow", ", ".join(error.valid_methods)),)
        return _flask(_error(error.code or 500, code, error.description or code), extra=extra)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        app.logger.exception("unexpected error on %r", request.path)
        return _flask(_error(500, "internal_error", "the request could not be handled"))

    return app


def _session(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "session_id": record["session_id"],
        "identity_id": record["identity_id"],
        "label": record.get("label"),
        "aal": record["aal"],
        "methods": record["methods"],
        "device": record["device"],
        "started_at": iso(record["started_at"]),
        "expires_at": iso(record["expires_at"]),
        "first_seen_at": iso(record["first_seen"]),
        "last_seen_at": iso(record["last_seen"]),
        "requests": record["requests"],
    }


def _from_kratos(found: dict[str, Any] | None) -> dict[str, Any]:
    """A session the bridge never saw, as Kratos describes it."""
    assert found is not None
    identity = found.get("identity") or {}
    traits = identity.get("traits") or {}
    devices = found.get("devices") or [{}]
    device = devices[0] or {}
    return {
        "session_id": found.get("id"),
        "identity_id": identity.get("id"),
        "label": traits.get("email") if isinstance(traits.get("email"), str) else None,
        "aal": found.get("authenticator_assurance_level"),
        "methods": [m.get("method") for m in found.get("authentication_methods") or []],
        "device": {
            "ip_address": device.get("ip_address") or "",
            "user_agent": device.get("user_agent") or "",
            "location": device.get("location") or "",
        },
        "started_at": _text_time(found.get("issued_at")),
        "expires_at": _text_time(found.get("expires_at")),
        "first_seen_at": None,
        "last_seen_at": None,
        "requests": 0,
    }


def _text_time(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z") if hasattr(value, "isoformat") else str(value)


def _page_size() -> int:
    text = request.args.get("page_size")
    if text is None:
        return DEFAULT_PAGE_SIZE
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise AdminError(400, "bad_request", f"page_size must be 1..{MAX_PAGE_SIZE}")
    return int(text)


def _page_token() -> str | None:
    return request.args.get("page_token") or None


def _uuid(value: str, name: str) -> str:
    try:
        parsed = uuid.UUID(value) if len(value) == 36 else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise AdminError(400, "bad_request", f"{name} is not a UUID")
    return str(parsed)


def _moment(text: str | None, now: int, name: str) -> int:
    """An RFC 3339 time, or a duration back from now (``15m``, ``24h``, ``7d``)."""
    if text is None:
        return now
    relative = _DURATION.fullmatch(text)
    if relative is not None:
        return now - int(relative[1]) * _UNIT_MS[relative[2]]
    try:
        return parse_timestamp_ms(text.replace("Z", "+00:00"))
    except ValueError:
        raise AdminError(
            400, "bad_request", f"{name} is neither an RFC 3339 time nor a duration like 7d"
        ) from None


def _error(status: int, code: str, message: str) -> Reply:
    return responses.json_reply(status, {"error": code, "message": message})


def _json(body: dict[str, Any]) -> Response:
    return _flask(responses.json_reply(200, body))


def _flask(reply: Reply, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(reply.body, status=reply.status, headers=[*reply.headers, *extra])

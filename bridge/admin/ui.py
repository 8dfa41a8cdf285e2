"""The admin dashboard: server-rendered pages under ``/admin/ui/`` on the admin listener.

Why this shape (README, "Dashboard"): Jinja2 comes with Flask, the charts are SVG drawn
on the server (``bridge.admin.charts``), and the one script (``static/ui.js``, no
library) only refreshes the page in place. Nothing is built, nothing comes from a CDN,
and every page works without script.

Security:

- With ``BRIDGE_ADMIN_TOKEN`` set, a login form takes the token and sets an ``HttpOnly``,
  ``SameSite=Strict`` cookie scoped to ``/admin/ui``. The cookie is not the token: it is a
  timestamp and its HMAC under the token, valid ``SIGNED_IN_FOR``; changing the token
  signs everyone out. The API's bearer header is accepted too.
- Every state-changing request (revoke, sign out) carries a CSRF token (an HMAC of the
  cookie, or of a per-deployment value without a token) and must not come from another
  site (``Origin`` / ``Sec-Fetch-Site``).
- Every answer has a Content-Security-Policy without inline script or style, and is
  neither framed nor cached.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, redirect, render_template, request, url_for
from prometheus_client.parser import text_string_to_metric_families

from bridge.admin.analytics import DURATION_BUCKETS
from bridge.admin.charts import bar_chart
from bridge.admin.sessions import NotFound, SessionAdmin
from bridge.errors import BadRequest, KratosUnavailable, StoreUnavailable
from bridge.kratos import parse_timestamp_ms
from bridge.mirror import now_ms
from bridge.session import iso

if TYPE_CHECKING:
    from bridge.app import Bridge

log = logging.getLogger(__name__)

PREFIX = "/admin/ui"
COOKIE = "bridge_admin_ui"
SIGNED_IN_FOR = 12 * 3600
REFRESH_SECONDS = 15
MAX_EVENTS = 1000
PAGE_SIZE = 50
AAL2_METHODS = ("totp", "webauthn", "passkey", "lookup_secret", "code")
SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),  # "no-referrer" makes form posts say Origin: null
    ("Cache-Control", "no-store"),
)
NOTHING = "\N{EN DASH}"  # a figure not known (yet)
_METHOD = re.compile(r"[a-z_]{1,32}")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


class Gate:
    """Who may see the dashboard, and the CSRF token of their session."""

    def __init__(self, token: str | None, fallback_key: bytes) -> None:
        self.token_required = token is not None
        self._token = token.encode() if token is not None else None
        self._key = self._token if self._token is not None else fallback_key

    def check_token(self, presented: str) -> bool:
        given = presented.encode("utf-8", "surrogateescape")
        return self._token is not None and hmac.compare_digest(given, self._token)

    def new_cookie(self) -> str:
        issued = str(int(time.time()))
        return f"{issued}.{self._mac('signed-in|' + issued)}"

    def signed_in(self) -> bool:
        if not self.token_required:
            return True
        scheme, _, presented = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and self.check_token(presented.strip()):
            return True
        issued, _, mac = (request.cookies.get(COOKIE) or "").partition(".")
        if not issued.isdigit() or time.time() - int(issued) > SIGNED_IN_FOR:
            return False
        return hmac.compare_digest(mac.encode(), self._mac("signed-in|" + issued).encode())

    def csrf_token(self) -> str:
        return self._mac("csrf|" + (request.cookies.get(COOKIE) or ""))

    def csrf_problem(self) -> str | None:
        """Why a state-changing request may not go ahead, or ``None``."""
        site = request.headers.get("Sec-Fetch-Site", "same-origin")
        if site not in ("same-origin", "none"):
            return f"sent from another site (Sec-Fetch-Site: {site})"
        origin = request.headers.get("Origin")
        if origin is not None and origin != request.host_url.rstrip("/"):
            return "sent from another origin"
        given = (request.form.get("csrf_token") or "").encode()
        if not hmac.compare_digest(given, self.csrf_token().encode()):
            return "CSRF token missing or wrong"
        return None

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()


class DecisionRate:
    """Decisions per second and latency percentiles, from the metrics this bridge serves;
    the rate is the change since the previous look (this process remembers one)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def __call__(self, exposition: Callable[[], tuple[bytes, str]] | None) -> dict[str, str]:
        if exposition is None:
            return {"rate": NOTHING, "p50": NOTHING, "p99": NOTHING}
        body, _ = exposition()
        total, buckets = 0.0, {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "bridge_decisions_total":
                    total += sample.value
                elif sample.name == "bridge_decision_duration_seconds_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
        now = time.monotonic()
        rate = NOTHING
        if self._last is not None and now > self._last[0]:
            rate = f"{max(0.0, total - self._last[1]) / (now - self._last[0]):.1f}"
        self._last = (now, total)
        return {"rate": rate, "p50": _quantile(buckets, 0.5), "p99": _quantile(buckets, 0.99)}


def _quantile(buckets: dict[float, float], share: float) -> str:
    """The upper bound of the histogram bucket holding the ``share`` quantile."""
    ordered = sorted(buckets.items())
    count = ordered[-1][1] if ordered else 0
    if not count:
        return NOTHING
    for bound, cumulative in ordered:
        if cumulative >= share * count:
            return "> 10 s" if bound == float("inf") else f"≤ {bound * 1000:g} ms"
    return NOTHING


def create_ui(bridge: Bridge, admin: SessionAdmin) -> Blueprint:
    settings = bridge.settings
    gate = Gate(settings.admin_token, settings.secret)
    rate = DecisionRate()
    ui = Blueprint(
        "ui",
        __name__,
        url_prefix=PREFIX,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )

    @ui.app_template_filter("short")
    def short(value: str | None) -> str:
        return (value or "")[:16].replace("T", " ")

    @ui.before_request
    def only_signed_in() -> Response | None:
        if request.endpoint in ("ui.login", "ui.static"):
            return None
        if not gate.signed_in():
            if request.method in ("GET", "HEAD"):
                return redirect(url_for("ui.login"), 303)
            return page(401, "error.html", heading="Signed out", message="Sign in again.")
        problem = gate.csrf_problem() if request.method == "POST" else None
        if problem is not None:
            log.warning("dashboard: refused %s %s: %s", request.method, request.path, problem)
            return page(
                403,
                "error.html",
                heading="Refused",
                message="The form's CSRF token is missing "
                "or wrong, or it came from another site. Reload the page and try again.",
            )
        return None

    @ui.after_request
    def secure(response: Response) -> Response:
        for name, value in SECURITY_HEADERS:
            response.headers[name] = value
        return response

    def page(status: int, template: str, **context: Any) -> Response:
        context.setdefault("refresh", None)
        body = render_template(
            template,
            signed_in=gate.signed_in(),
            token_required=gate.token_required,
            csrf_token=gate.csrf_token(),
            generated_at=iso(now_ms()),
            **context,
        )
        return Response(body, status=status, content_type="text/html; charset=utf-8")

    @ui.route("/login", methods=["GET", "POST"], provide_automatic_options=False)
    def login() -> Response:
        if not gate.token_required:
            return redirect(url_for("ui.overview"), 303)
        if request.method == "GET":
            return page(200, "login.html", error=None)
        if not gate.check_token(request.form.get("token") or ""):
            return page(401, "login.html", error="That is not the admin token.")
        response = redirect(url_for("ui.overview"), 303)
        response.set_cookie(
            COOKIE,
            gate.new_cookie(),
            max_age=SIGNED_IN_FOR,
            path=PREFIX,
            httponly=True,
            samesite="Strict",
            secure=request.is_secure,
        )
        return response

    @ui.post("/logout", provide_automatic_options=False)
    def logout() -> Response:
        response = redirect(url_for("ui.login"), 303)
        response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="Strict")
        return response

    @ui.get("/", provide_automatic_options=False)
    def overview() -> Response:
        days = 30 if request.args.get("days") == "30" else 7
        now = now_ms()
        since = now - (days - 1) * 86_400_000
        stats = admin.stats(since, now)
        labels = [d["day"][5:] for d in stats["days"]]
        methods = sorted(stats["aal2_events_by_method"]) or ["aal2 events"]
        metrics = bridge.metrics
        active = admin.active_sessions if bridge.recorder is not None else None
        decisions = rate((lambda: metrics.exposition(active)) if metrics is not None else None)
        return page(
            200,
            "overview.html",
            refresh=REFRESH_SECONDS,
            days=days,
            stats=stats,
            today=stats["days"][-1],
            approximate=bridge.settings.redis_url is not None,
            decisions=decisions,
            health=health(bridge),
            started_chart=bar_chart(
                "Sessions started per day",
                labels,
                {"sessions": [d["sessions_started"] for d in stats["days"]]},
            ),
            aal2_chart=bar_chart(
                "AAL2 events per method per day",
                labels,
                {m: [d["aal2_events"].get(m, 0) for d in stats["days"]] for m in methods},
            ),
            hours_chart=bar_chart(
                "Sessions started by hour of day (UTC)",
                [f"{h:02d}" for h in range(24)],
                {"sessions": stats["sessions_started_by_hour"]},
            ),
            duration_chart=bar_chart(
                "Duration of ended sessions",
                [name for name, _ in DURATION_BUCKETS],
                {"sessions": stats["session_duration_histogram"]},
            ),
        )

    @ui.get("/sessions", provide_automatic_options=False)
    def sessions() -> Response:
        query = (request.args.get("q") or "").strip()[:200]
        next_token = None
        if query:
            rows = admin.search(query, PAGE_SIZE)
            if _is_uuid(query):
                known = {r["session_id"] for r in rows}
                rows += [
                    r
                    for r in admin.of_identity(query.lower(), PAGE_SIZE, None).sessions
                    if r["session_id"] not in known
                ]
            caption = f"{len(rows)} session{'s' if len(rows) != 1 else ''} matching “{query}”"
        else:
            listing = admin.page(PAGE_SIZE, request.args.get("page_token") or None)
            rows, next_token = listing.sessions, listing.next_page_token
            caption = "Active sessions, newest first"
        return page(
            200,
            "sessions.html",
            refresh=REFRESH_SECONDS,
            rows=rows,
            query=query,
            caption=caption,
            next_page_token=next_token,
        )

    @ui.get("/sessions/<session_id>", provide_automatic_options=False)
    def session(session_id: str) -> Response:
        sid = _uuid_or_404(session_id)
        shown = admin.show(sid)
        started = shown["session"].get("started_at")
        since = parse_timestamp_ms(started) - 60_000 if started else 0
        return page(
            200,
            "session.html",
            sid=sid,
            shown=shown,
            values=admin.app_values(sid) if request.args.get("values") == "1" else None,
            aal2=admin.aal2_events(since, now_ms(), 10, session_id=sid).events,
            changes=admin.device_changes(sid),
        )

    @ui.get("/sessions/<session_id>/revoke", provide_automatic_options=False)
    def confirm_revoke(session_id: str) -> Response:
        sid = _uuid_or_404(session_id)
        return page(
            200,
            "confirm.html",
            heading="Revoke this session?",
            question=f"Session {sid} will be revoked in Kratos and refused by every bridge "
            "process at once. The user has to log in again.",
            action=url_for("ui.revoke", session_id=sid),
            back=url_for("ui.session", session_id=sid),
        )

    @ui.post("/sessions/<session_id>/revoke", provide_automatic_options=False)
    def revoke(session_id: str) -> Response:
        return page(200, "done.html", revoked=admin.revoke(_uuid_or_404(session_id)))

    @ui.get("/identities/<identity_id>/revoke", provide_automatic_options=False)
    def confirm_revoke_identity(identity_id: str) -> Response:
        iid = _uuid_or_404(identity_id)
        return page(
            200,
            "confirm.html",
            heading="Revoke every session of this identity?",
            question=f"Every session of identity {iid} will be revoked in Kratos and refused "
            "by every bridge process at once.",
            action=url_for("ui.revoke_identity", identity_id=iid),
            back=url_for("ui.sessions", q=iid),
        )

    @ui.post("/identities/<identity_id>/revoke", provide_automatic_options=False)
    def revoke_identity(identity_id: str) -> Response:
        return page(200, "done.html", revoked=admin.revoke_identity(_uuid_or_404(identity_id)))

    def event_filters() -> tuple[dict[str, Any], list[dict[str, str]], bool]:
        identity_id = (request.args.get("identity_id") or "").strip() or None
        if identity_id is not None and not _is_uuid(identity_id):
            raise BadRequest("identity_id is not a UUID")
        method = request.args.get("method") or None
        if method is not None and not _METHOD.fullmatch(method):
            raise BadRequest("method is not a method name")
        days = {"1": 1, "30": 30}.get(request.args.get("days", ""), 7)
        now = now_ms()
        found = admin.aal2_events(
            now - days * 86_400_000,
            now,
            MAX_EVENTS,
            identity_id=identity_id.lower() if identity_id else None,
            method=method,
        )
        filters = {"identity_id": identity_id or "", "method": method or "", "days": days}
        return filters, found.events, found.next_page_token is not None

    @ui.get("/events", provide_automatic_options=False)
    def events() -> Response:
        filters, found, truncated = event_filters()
        days = filters["days"]
        now = now_ms()
        labels = [iso(now - (days - 1 - i) * 86_400_000)[:10] for i in range(days)]
        methods = sorted({m for e in found for m in (e.get("methods") or "").split(",") if m})
        per_day = {m: [0] * days for m in methods or ["events"]}
        for event in found:
            day = event["at"][:10]
            if day in labels:
                for m in (event.get("methods") or "events").split(",")[:1]:
                    per_day.setdefault(m, [0] * days)[labels.index(day)] += 1
        return page(
            200,
            "events.html",
            refresh=REFRESH_SECONDS,
            events=found,
            truncated=truncated,
            filters=filters,
            identity_id=filters["identity_id"],
            method=filters["method"],
            days=days,
            methods=sorted({*AAL2_METHODS, *methods}),
            events_chart=bar_chart("AAL2 events per day", [d[5:] for d in labels], per_day),
        )

    @ui.get("/events.csv", provide_automatic_options=False)
    def events_csv() -> Response:
        _, found, _ = event_filters()
        columns = (
            "at",
            "id",
            "session_id",
            "identity_id",
            "methods",
            "ip_address",
            "user_agent",
            "upgrade_id",
        )
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for event in found:
            writer.writerow([_cell(event.get(column, "")) for column in columns])
        response = Response(out.getvalue(), content_type="text/csv; charset=utf-8")
        response.headers["Content-Disposition"] = 'attachment; filename="aal2-events.csv"'
        return response

    @ui.errorhandler(NotFound)
    def not_found(error: NotFound) -> Response:
        return page(404, "error.html", heading="Not found", message=str(error))

    @ui.errorhandler(BadRequest)
    def bad_request(error: BadRequest) -> Response:
        return page(400, "error.html", heading="Bad request", message=str(error))

    @ui.errorhandler(KratosUnavailable)
    def kratos_down(error: KratosUnavailable) -> Response:
        return page(502, "error.html", heading="Kratos did not answer", message=str(error))

    @ui.errorhandler(StoreUnavailable)
    def store_down(error: StoreUnavailable) -> Response:
        return page(503, "error.html", heading="Redis did not answer", message=str(error))

    return ui


def health(bridge: Bridge) -> dict[str, str]:
    try:
        bridge.store.ping()
        redis, kind = "ok", str(bridge.store.topology().get("kind", "store"))
    except StoreUnavailable:
        redis, kind = "unavailable", "Redis"
    return {"redis": redis, "store_kind": kind, "kratos": bridge.kratos.ready() or "ok"}


def _cell(value: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula (a user agent is user input)."""
    return "'" + value if value.startswith(_FORMULA) else value


def _is_uuid(value: str) -> bool:
    try:
        return len(value) == 36 and bool(uuid.UUID(value))
    except ValueError:
        return False


def _uuid_or_404(value: str) -> str:
    if not _is_uuid(value):
        raise NotFound("no such id")
    return value.lower()

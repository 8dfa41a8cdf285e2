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
import io
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from bridge.admin import statuses
from bridge.admin.charts import bar_chart
from bridge.admin.gate import COOKIE, SIGNED_IN_FOR, Gate, canonical_uuid
from bridge.admin.sessions import AdminParts, Latest, SessionAdmin
from bridge.clock import iso, now_ms, parse_timestamp_ms
from bridge.errors import (
    BadRequest,
    BridgeError,
    KratosUnavailable,
    NotFound,
    StoreUnavailable,
)
from bridge.observe.analytics import DURATION_BUCKETS
from bridge.store.registry import days_between
from bridge.web.health import check

if TYPE_CHECKING:
    from bridge.observe.metrics import Metrics

log = logging.getLogger(__name__)

PREFIX = "/admin/ui"
REFRESH_SECONDS = 15
MAX_EVENTS = 1000  # shown on the timeline: the newest
CSV_MAX_EVENTS = 50_000
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
# The page's heading for each error the listener names (its status: bridge.admin.statuses).
HEADINGS: dict[type[BridgeError], str] = {
    NotFound: "Not found",
    BadRequest: "Bad request",
    KratosUnavailable: "Kratos did not answer",
    StoreUnavailable: "Redis did not answer",
}
NOTHING = "\N{EN DASH}"  # a figure not known (yet)
_METHOD = re.compile(r"[a-z_]{1,32}")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


class DecisionRate:
    """Decisions per second and latency percentiles, from the metrics this bridge serves;
    the rate is the change since the previous look (this process remembers one)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def __call__(self, metrics: Metrics | None) -> dict[str, str]:
        if metrics is None:
            return {"rate": NOTHING, "p50": NOTHING, "p99": NOTHING}
        total = 0.0
        buckets: dict[float, float] = {}
        for family in metrics.families():
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
            if bound == float("inf"):
                return f"> {ordered[-2][0]:g} s" if len(ordered) > 1 else NOTHING
            return f"≤ {bound * 1000:g} ms"
    return NOTHING


def _identity_rows(admin: SessionAdmin, identity_id: str) -> list[dict[str, Any]]:
    """The identity's sessions from Kratos, joined with the bridge's view; none when the
    id is not an identity's (it may be a session's)."""
    try:
        return admin.of_identity(identity_id, PAGE_SIZE, None).sessions
    except NotFound:
        return []


def create_ui(bridge: AdminParts, admin: SessionAdmin, gate: Gate) -> Blueprint:
    rate = DecisionRate()
    ui = Blueprint(
        "ui",
        __name__,
        url_prefix=PREFIX,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )

    @ui.app_template_filter("pretty")
    def pretty(value: Any) -> str:
        """Indented JSON, escaped by the template like any text."""
        return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)

    @ui.app_template_filter("short")
    def short(value: str | None) -> str:
        return (value or "")[:16].replace("T", " ")

    @ui.before_request
    def only_signed_in() -> BaseResponse | None:
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
        context.setdefault("problem", None)
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
    def login() -> BaseResponse:
        if not gate.token_required:
            return redirect(url_for("ui.overview"), 303)
        if request.method == "GET":
            return page(200, "login.html", error=None)
        if not gate.is_token(request.form.get("token") or ""):
            return page(401, "login.html", error="That is not the admin token.")
        response = redirect(url_for("ui.overview"), 303)
        response.set_cookie(
            COOKIE,
            gate.new_cookie(),
            max_age=SIGNED_IN_FOR,
            path=PREFIX,
            httponly=True,
            samesite="Strict",
            # Behind a proxy that ends TLS the listener sees plain HTTP: the proxy says so.
            secure=request.is_secure or request.headers.get("X-Forwarded-Proto") == "https",
        )
        return response

    @ui.post("/logout", provide_automatic_options=False)
    def logout() -> BaseResponse:
        response = redirect(url_for("ui.login"), 303)
        response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="Strict")
        return response

    @ui.get("/", provide_automatic_options=False)
    def overview() -> Response:
        days = 30 if request.args.get("days") == "30" else 7
        now = now_ms()
        status = health(bridge)  # first: shown also when the statistics cannot be read
        decisions = rate(bridge.metrics)
        try:
            stats = admin.stats(first_of_days(now, days), now)
        except StoreUnavailable as error:
            return page(
                statuses.answer(error)[0],
                "overview.html",
                refresh=REFRESH_SECONDS,
                days=days,
                stats=None,
                health=status,
                problem=str(error),
            )
        labels = [d["day"][5:] for d in stats["days"]]
        methods = sorted(stats["aal2_events_by_method"]) or ["aal2 events"]
        return page(
            200,
            "overview.html",
            refresh=REFRESH_SECONDS,
            days=days,
            stats=stats,
            today=stats["days"][-1],
            approximate=bridge.settings.redis_url is not None,
            decisions=decisions,
            health=status,
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
            if canonical_uuid(query) is not None:  # an identity's sessions, as Kratos has them
                of_identity = _identity_rows(admin, query.lower())
                known = {r["session_id"]: r for r in of_identity}
                rows = of_identity + [r for r in rows if r["session_id"] not in known]
            caption = f"{len(rows)} session{'s' if len(rows) != 1 else ''} matching “{query}”"
            if len(rows) >= PAGE_SIZE:
                caption += f" (the newest {PAGE_SIZE}: be more precise)"
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
        shown = admin.show(sid, app_values=request.args.get("values") == "1")
        started = shown["session"].get("started_at")
        since = parse_timestamp_ms(started) - 60_000 if started else 0
        return page(
            200,
            "session.html",
            sid=sid,
            shown=shown,
            values=shown.get("app"),
            aal2=admin.aal2_events(since, now_ms(), 10, session_id=sid).events,
        )

    def confirm(heading: str, question: str, action: str, back: str) -> Response:
        """The page that asks before a revocation; its form posts to ``action``."""
        return page(
            200, "confirm.html", heading=heading, question=question, action=action, back=back
        )

    @ui.get("/sessions/<session_id>/revoke", provide_automatic_options=False)
    def confirm_revoke(session_id: str) -> Response:
        sid = _uuid_or_404(session_id)
        return confirm(
            "Revoke this session?",
            f"Session {sid} will be revoked in Kratos and refused by every bridge process at "
            "once. The user has to log in again.",
            url_for("ui.revoke", session_id=sid),
            url_for("ui.session", session_id=sid),
        )

    @ui.post("/sessions/<session_id>/revoke", provide_automatic_options=False)
    def revoke(session_id: str) -> Response:
        return page(200, "done.html", revoked=admin.revoke(_uuid_or_404(session_id)))

    @ui.get("/identities/<identity_id>/revoke", provide_automatic_options=False)
    def confirm_revoke_identity(identity_id: str) -> Response:
        iid = _uuid_or_404(identity_id)
        return confirm(
            "Revoke every session of this identity?",
            f"Every session of identity {iid} will be revoked in Kratos and refused by every "
            "bridge process at once.",
            url_for("ui.revoke_identity", identity_id=iid),
            url_for("ui.sessions", q=iid),
        )

    @ui.post("/identities/<identity_id>/revoke", provide_automatic_options=False)
    def revoke_identity(identity_id: str) -> Response:
        return page(200, "done.html", revoked=admin.revoke_identity(_uuid_or_404(identity_id)))

    def event_filters() -> tuple[dict[str, Any], int]:
        identity_id = (request.args.get("identity_id") or "").strip() or None
        canonical = canonical_uuid(identity_id) if identity_id is not None else None
        if identity_id is not None and canonical is None:
            raise BadRequest("identity_id is not a UUID")
        method = request.args.get("method") or None
        if method is not None and not _METHOD.fullmatch(method):
            raise BadRequest("method is not a method name")
        days = {"1": 1, "30": 30}.get(request.args.get("days", ""), 7)
        filters = {"identity_id": canonical or "", "method": method or "", "days": days}
        return filters, first_of_days(now_ms(), days)

    def matching(filters: dict[str, Any], since: int, limit: int) -> Latest:
        return admin.latest_aal2_events(
            since,
            now_ms(),
            limit,
            identity_id=filters["identity_id"] or None,
            method=filters["method"] or None,
        )

    @ui.get("/events", provide_automatic_options=False)
    def events() -> Response:
        filters, since = event_filters()
        found = matching(filters, since, MAX_EVENTS)
        labels = days_between(since, now_ms())
        per_day: dict[str, list[int]] = {}
        for day, methods in found.per_day.items():
            for name, count in methods.items():
                per_day.setdefault(name, [0] * len(labels))[labels.index(day)] += count
        return page(
            200,
            "events.html",
            refresh=REFRESH_SECONDS,
            events=found.events,
            total=found.total,
            scan_limited=found.scan_limited,
            filters=filters,
            identity_id=filters["identity_id"],
            method=filters["method"],
            days=filters["days"],
            methods=sorted({*AAL2_METHODS, *per_day}),
            events_chart=bar_chart(
                "AAL2 events per day", [d[5:] for d in labels], per_day or {"events": []}
            ),
        )

    @ui.get("/events.csv", provide_automatic_options=False)
    def events_csv() -> Response:
        filters, since = event_filters()
        found = matching(filters, since, CSV_MAX_EVENTS)
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
        for event in reversed(found.events):  # oldest first, as a log reads
            writer.writerow([_cell(event.get(column, "")) for column in columns])
        response = Response(out.getvalue(), content_type="text/csv; charset=utf-8")
        response.headers["Content-Disposition"] = 'attachment; filename="aal2-events.csv"'
        if found.total > len(found.events) or found.scan_limited:
            response.headers["X-Bridge-Truncated"] = "true"  # the newest ones are in it
        return response

    def error_page(error: BridgeError) -> Response:
        status, _, message = statuses.answer(error)
        return page(status, "error.html", heading=HEADINGS[statuses.named(error)], message=message)

    for kind in statuses.NAMED:  # any other error: the listener's JSON answer (bridge.admin.api)
        ui.register_error_handler(kind, error_page)

    return ui


def first_of_days(now: int, days: int) -> int:
    """The start (UTC) of the first of the last ``days`` days, today included."""
    return now - now % 86_400_000 - (days - 1) * 86_400_000


def health(bridge: AdminParts) -> dict[str, str]:
    """The overview's health line, from the admin listener's readiness check."""
    readiness = check(bridge.store, bridge.kratos)
    problems = readiness.problems
    if "redis" in problems:
        redis, kind = "unavailable", "Redis"
    else:
        redis, kind = "ok", str(readiness.topology.get("kind", "store"))
    return {"redis": redis, "store_kind": kind, "kratos": problems.get("kratos", "ok")}


def _cell(value: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula (a user agent is user input)."""
    return "'" + value if value.startswith(_FORMULA) else value


def _uuid_or_404(value: str) -> str:
    canonical = canonical_uuid(value)
    if canonical is None:
        raise NotFound("no such id")
    return canonical

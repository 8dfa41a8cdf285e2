"""``kratos-bridge sessions|events|stats``: the admin API from a terminal.

Each command is one or a few HTTP calls to the admin listener (``bridge.admin.api``), so
the CLI needs only its URL and token, which it takes from the bridge's own settings
(``--admin-url`` overrides the URL). People get tables; ``--json`` prints the API's JSON
for scripts. Exit 1 when the API refuses or cannot be reached, with one line on stderr
saying why; the token is never printed.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from bridge.config import Settings
from bridge.hosts import host_port

if TYPE_CHECKING:  # httpx and rich are imported when a command runs, not by ``serve``
    from rich.console import Console
    from rich.table import Table

COMMANDS = ("sessions", "events", "stats")
EXIT_FAILED = 1
EXIT_CONFIG = 2
FOLLOW_INTERVAL = 2.0
MAX_PAGE_SIZE = 500
DEFAULT_LIST_LIMIT = 100
REQUEST_TIMEOUT = 30.0
PIPED_WIDTH = 1000
# A wildcard address is where the listener binds, not where a client connects.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - mapped away, not bound


class AdminCommandFailed(Exception):
    """The admin API refused, failed or could not be reached; the message says why."""


@dataclass(frozen=True)
class AdminTarget:
    url: str
    token: str | None

    def __repr__(self) -> str:
        return f"AdminTarget(url={self.url!r})"


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``sessions``, ``events`` and ``stats`` on the ``kratos-bridge`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin-url",
        help="the admin listener, e.g. http://127.0.0.1:4481 (default: from "
        "BRIDGE_ADMIN_HOST and BRIDGE_ADMIN_PORT)",
    )
    common.add_argument("--config", help="YAML file of settings; BRIDGE_* variables win")
    common.add_argument("--json", action="store_true", help="print the API's JSON")

    sessions = commands.add_parser("sessions", help="list, show and revoke sessions")
    actions = sessions.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="sessions, newest first")
    listing.add_argument("--identity", metavar="ID", help="only this identity's sessions")
    listing.add_argument(
        "--limit",
        type=_count,
        default=DEFAULT_LIST_LIMIT,
        metavar="N",
        help=f"at most N sessions (default {DEFAULT_LIST_LIMIT}; 0: all)",
    )
    show = actions.add_parser("show", parents=[common], help="one session in full")
    show.add_argument("session_id", metavar="SID")
    revoke = actions.add_parser(
        "revoke",
        parents=[common],
        help="revoke a session, or every session of an identity (in Kratos, then the mirror)",
    )
    revoke.add_argument("session_id", metavar="SID", nargs="?")
    revoke.add_argument("--identity", metavar="ID", help="revoke this identity's sessions")
    revoke.add_argument(
        "--except", dest="keep", metavar="SID", help="with --identity: keep this session"
    )

    events = commands.add_parser("events", help="AAL2 events (second factors reached)")
    event_actions = events.add_subparsers(dest="action", required=True)
    tail = event_actions.add_parser(
        "tail",
        parents=[common],
        help="the events since a time, oldest first; --follow keeps printing new ones",
    )
    tail.add_argument(
        "--since", default="24h", help="RFC 3339 time or a duration ago: 15m, 24h, 7d"
    )
    tail.add_argument("--identity", metavar="ID", help="only this identity's events")
    tail.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help=f"poll every {FOLLOW_INTERVAL:g}s until Ctrl-C (--json: one event per line)",
    )

    stats = commands.add_parser("stats", parents=[common], help="session analytics")
    stats.add_argument("--since", default="7d", help="the window: 1d to 365d (default 7d)")


def target(settings: Settings, admin_url: str | None) -> AdminTarget:
    """Where the admin API is, and its token. ``AdminCommandFailed`` when it is off."""
    if admin_url:
        return AdminTarget(admin_url.rstrip("/"), settings.admin_token)
    if not settings.admin_port:
        raise AdminCommandFailed(
            "the admin listener is off (BRIDGE_ADMIN_PORT=0); set it, or pass --admin-url"
        )
    host = _WILDCARDS.get(settings.admin_host, settings.admin_host)
    return AdminTarget(f"http://{host_port(host, settings.admin_port)}", settings.admin_token)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run a parsed admin command; its exit status."""
    try:
        where = target(settings, args.admin_url)
    except AdminCommandFailed as error:
        print(f"kratos-bridge: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "sessions" and args.action == "revoke":
        problem = _revoke_arguments_problem(args)
        if problem is not None:
            print(f"kratos-bridge sessions revoke: {problem}", file=sys.stderr)
            return EXIT_CONFIG
    output = Output(args.json)
    try:
        with AdminClient(where) as client:
            if args.command == "sessions":
                command = {"list": sessions_list, "show": sessions_show, "revoke": sessions_revoke}
                return command[args.action](client, args, output)
            if args.command == "events":
                return events_tail(client, args, output)
            return stats(client, args, output)
    except AdminCommandFailed as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return EXIT_FAILED


class AdminClient:
    """The admin API over HTTP: JSON in, JSON out, every failure an ``AdminCommandFailed``."""

    def __init__(self, where: AdminTarget, timeout: float = REQUEST_TIMEOUT) -> None:
        import httpx

        self._url = where.url
        self._token_given = where.token is not None
        headers = {"Accept": "application/json", "User-Agent": "kratos-bridge-cli"}
        if where.token is not None:
            headers["Authorization"] = f"Bearer {where.token}"
        self._http = httpx.Client(base_url=where.url, headers=headers, timeout=timeout)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._call("GET", path, params)

    def delete(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._call("DELETE", path, params)

    def listing(
        self, path: str, items: str, params: dict[str, Any], limit: int | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A list route's items, page after page, at most ``limit`` of them; and the token
        of the page after the last one read (``None`` when there is none)."""
        found: list[dict[str, Any]] = []
        token = None
        while limit is None or len(found) < limit:
            size = MAX_PAGE_SIZE if limit is None else min(limit - len(found), MAX_PAGE_SIZE)
            page = self.get(path, {**params, "page_size": size, "page_token": token})
            found.extend(page.get(items) or ())
            token = page.get("next_page_token")
            if not token:
                break
        return (found if limit is None else found[:limit]), token

    def _call(self, method: str, path: str, params: dict[str, Any] | None) -> dict[str, Any]:
        import httpx

        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            answer = self._http.request(method, path, params=query)
        except httpx.TimeoutException:
            raise AdminCommandFailed(
                f"the admin API at {self._url} did not answer within {REQUEST_TIMEOUT:g}s"
            ) from None
        except httpx.TransportError as error:
            raise AdminCommandFailed(
                f"cannot reach the admin API at {self._url} ({error or type(error).__name__}); "
                "is the bridge running with its admin listener (BRIDGE_ADMIN_PORT)?"
            ) from None
        if answer.status_code == 401:
            if self._token_given:
                raise AdminCommandFailed(
                    f"the admin API at {self._url} refused the token: BRIDGE_ADMIN_TOKEN "
                    "(or BRIDGE_ADMIN_TOKEN_FILE) is not the bridge's"
                )
            raise AdminCommandFailed(
                f"the admin API at {self._url} needs a token: set BRIDGE_ADMIN_TOKEN "
                "(or BRIDGE_ADMIN_TOKEN_FILE) to the bridge's"
            )
        try:
            body = orjson.loads(answer.content)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise AdminCommandFailed(
                f"the admin API at {self._url} answered {method} {path} with "
                f"{answer.status_code} and no JSON object; is that the admin listener?"
            )
        if answer.status_code >= 400:
            message = body.get("message") or body.get("error") or f"HTTP {answer.status_code}"
            raise AdminCommandFailed(str(message))
        return body


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(thing: Any) -> Any:
    """Text a terminal shows as it is: control characters (escapes) replaced."""
    return _CONTROL.sub("\ufffd", thing) if isinstance(thing, str) else thing


class Output:
    """Tables for people, the API's JSON for scripts; always to stdout."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._console: Console | None = None

    def json(self, value: Any) -> None:
        sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
        sys.stdout.flush()

    def json_line(self, value: Any) -> None:
        sys.stdout.write(orjson.dumps(value).decode() + "\n")
        sys.stdout.flush()

    def table(self, *columns: str, title: str | None = None, header: bool = True) -> Table:
        """A table whose id and time columns are never wrapped (the others give way)."""
        from rich import box
        from rich.table import Table

        table = Table(
            title=title,
            box=box.SIMPLE_HEAD,
            show_header=header,
            show_edge=False,
            title_justify="left",
        )
        for name in columns:
            width = _WHOLE_COLUMNS.get(name)
            table.add_column(name, overflow="fold", no_wrap=width is not None, min_width=width)
        add_row = table.add_row
        # Labels, user agents and locations come from users: never markup, never controls.
        table.add_row = lambda *cells, **kw: add_row(*map(printable, cells), **kw)  # type: ignore[method-assign]
        return table

    def print(self, *things: Any) -> None:
        self.console.print(*map(printable, things))

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            # Piped output (grep, a script, a pager) is not cut at 80 columns: a row is a line.
            width = None if sys.stdout.isatty() else PIPED_WIDTH
            self._console = Console(
                width=width, highlight=False, soft_wrap=False, markup=False, emoji=False
            )
        return self._console


_SESSION_COLUMNS = ("session", "identity", "aal", "device", "started", "last seen", "requests")
_DAY_COLUMNS = (
    *("day", "sessions", "identities", "aal2 events", "requests"),
    *("expired", "revoked", "logged out"),
)
EVENTS_PATH = "/admin/events/aal2"
_WHOLE_COLUMNS = {"session": 36, "time": 19, "started": 16, "last seen": 16, "day": 10}


def sessions_list(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    path = (
        f"/admin/identities/{_segment(args.identity)}/sessions"
        if args.identity
        else "/admin/sessions"
    )
    found, token = client.listing(path, "sessions", {}, args.limit or None)
    if out.as_json:
        out.json({"sessions": found, "next_page_token": token})
        return 0
    table = out.table(*_SESSION_COLUMNS)
    for session in found:
        device = session.get("device") or {}
        methods = ", ".join(session.get("methods") or ())
        table.add_row(
            session.get("session_id"),
            session.get("label") or session.get("identity_id"),
            f"{session.get('aal')} ({methods})" if methods else session.get("aal"),
            "\n".join(p for p in (_device_label(device), device.get("ip_address")) if p),
            _time(session.get("started_at"), seconds=False),
            _time(session.get("last_seen_at"), seconds=False),
            str(session.get("requests", "")),
        )
    out.print(table)
    more = " (more: raise --limit)" if token else ""
    whose = f" of identity {args.identity}" if args.identity else ""
    out.print(f"{_plural(len(found), 'session')}{whose}{more}")
    return 0


def sessions_show(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    detail = client.get(f"/admin/sessions/{_segment(args.session_id)}")
    if out.as_json:
        out.json(detail)
        return 0
    session = detail.get("session") or {}
    device = session.get("device") or {}
    unified = detail.get("unified") or {}
    in_kratos = detail.get("kratos") or {}
    identity = in_kratos.get("identity") or unified.get("identity") or {}
    rows = [
        ("session", session.get("session_id")),
        ("identity", session.get("identity_id")),
        ("label", session.get("label")),
        ("aal", session.get("aal")),
        ("methods", ", ".join(session.get("methods") or ())),
        ("active in kratos", "yes" if detail.get("active_in_kratos") else "no"),
        ("seen by bridge", "yes" if session.get("seen_by_bridge") else "no"),
        ("started", _time(session.get("started_at"))),
        ("authenticated", _time(in_kratos.get("authenticated_at"))),
        ("first seen", _time(session.get("first_seen_at"))),
        ("last seen", _time(session.get("last_seen_at"))),
        ("expires", _time(session.get("expires_at"))),
        ("requests", session.get("requests")),
        ("device", _device_label(device)),
        ("ip address", device.get("ip_address")),
        ("user agent", device.get("user_agent")),
        ("location", device.get("location")),
        ("device changes", len(detail.get("device_changes") or ())),
        ("schema", identity.get("schema_id")),
        ("state", identity.get("state")),
        ("traits", orjson.dumps(identity.get("traits") or {}).decode()),
        ("mirrored", "yes" if detail.get("unified") else "no"),
    ]
    if unified:
        rows.append(("validated", _time(unified.get("validated_at"))))
    rows.append(("app keys", ", ".join(detail.get("app_keys") or ()) or "none"))
    table = out.table("field", "value", header=False)
    for name, value in rows:
        table.add_row(name, "" if value is None else str(value))
    out.print(table)
    return 0


def sessions_revoke(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    if args.identity:
        path = f"/admin/identities/{_segment(args.identity)}/sessions"
        answer = client.delete(path, {"except": args.keep})
    else:
        answer = client.delete(f"/admin/sessions/{_segment(args.session_id)}")
    if out.as_json:
        out.json(answer)
        return 0
    revoked = answer.get("revoked") or []
    if args.identity and not revoked:
        kept = f" (kept {args.keep})" if args.keep else ""
        out.print(f"identity {args.identity} had no sessions to revoke{kept}")
        return 0
    whose = f" of identity {args.identity}" if args.identity else ""
    kept = f", kept {args.keep}" if args.keep else ""
    out.print(f"revoked {_plural(len(revoked), 'session')}{whose}{kept}:")
    for session_id in revoked:
        out.print(f"  {session_id}")
    return 0


def events_tail(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    """The events since ``--since``; with ``--follow``, then every new one as it comes.

    A follow-up poll asks from the last event's time and skips what it has printed (the
    stream ids at that time), so an event is printed once even if the API's ``since`` is
    inclusive."""
    params = {"since": args.since, "identity_id": args.identity}
    events, _ = client.listing(EVENTS_PATH, "events", params)
    if not args.follow:
        if out.as_json:
            out.json({"events": events, "next_page_token": None})
        else:
            _print_events(out, events, header=True)
            out.print(_plural(len(events), "event"))
        return 0
    shown = _Printed()
    try:
        _print_new(out, shown, events, header=True)
        while True:
            time.sleep(FOLLOW_INTERVAL)
            params["since"] = shown.since or args.since
            new, _ = client.listing(EVENTS_PATH, "events", params)
            _print_new(out, shown, new, header=False)
    except KeyboardInterrupt:
        return 0


class _Printed:
    """What ``events tail --follow`` has printed: the last event's time, and the ids
    printed at that time."""

    def __init__(self) -> None:
        self.since: str | None = None
        self.ids_at_since: set[str] = set()

    def fresh(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if str(e.get("id")) not in self.ids_at_since]

    def remember(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        last_at = events[-1].get("at")
        if last_at != self.since:
            self.since, self.ids_at_since = last_at, set()
        self.ids_at_since.update(str(e.get("id")) for e in events if e.get("at") == last_at)


def _print_new(out: Output, shown: _Printed, events: list[dict[str, Any]], header: bool) -> None:
    fresh = shown.fresh(events)
    if out.as_json:
        for event in fresh:
            out.json_line(event)
    elif fresh or header:
        _print_events(out, fresh, header)
    shown.remember(fresh)


_EVENT_COLUMNS = (("time", 19), ("identity", 36), ("session", 36), ("method", 8), ("ip", 15))


def _print_events(out: Output, events: list[dict[str, Any]], header: bool) -> None:
    if not events and not header:
        return
    table = out.table(*(name for name, _ in _EVENT_COLUMNS), "user agent", header=header)
    for column, (_, width) in zip(table.columns, _EVENT_COLUMNS, strict=False):
        column.min_width = column.max_width = width  # the same columns, poll after poll
    for event in events:
        table.add_row(
            _time(event.get("at")),
            event.get("identity_id") or "",
            event.get("session_id") or "",
            event.get("method") or event.get("methods") or "",
            event.get("ip_address") or "",
            event.get("user_agent") or "",
        )
    out.print(table)


def stats(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    report = client.get("/admin/stats", {"since": args.since})
    if out.as_json:
        out.json(report)
        return 0
    share = report.get("aal2_share")
    durations = report.get("session_duration_seconds") or {}
    per_session = report.get("requests_per_session") or {}
    window = f"{_time(report.get('since'))} to {_time(report.get('until'))} UTC"
    summary = out.table("", "", header=False, title=window)
    summary.add_row("active sessions", str(report.get("active_sessions")))
    summary.add_row(
        "active at aal2",
        f"{report.get('active_aal2_sessions')}"
        + (f" ({share:.0%})" if isinstance(share, int | float) else ""),
    )
    summary.add_row("unique identities", f"~{report.get('unique_identities')}")
    summary.add_row(
        "session duration",
        f"p50 {_seconds(durations.get('p50'))}, p90 {_seconds(durations.get('p90'))}, "
        f"p99 {_seconds(durations.get('p99'))} (of {durations.get('count', 0)} ended)",
    )
    summary.add_row(
        "requests per session",
        f"mean {_number(per_session.get('mean'))}, p50 {_number(per_session.get('p50'))}, "
        f"p90 {_number(per_session.get('p90'))}",
    )
    summary.add_row("aal2 events", _counts(report.get("aal2_events_by_method")))
    summary.add_row(
        "browsers",
        ", ".join(f"{u['family']} {u['sessions']}" for u in report.get("user_agents") or ())
        or "none",
    )
    summary.add_row(
        "devices",
        ", ".join(f"{d['kind']} {d['sessions']}" for d in report.get("devices") or ()) or "none",
    )
    summary.add_row("sessions by hour", _hours(report.get("sessions_started_by_hour") or []))
    summary.add_row("retention", f"{report.get('retention_days')} days")
    out.print(summary)
    days = out.table(*_DAY_COLUMNS)
    for day in report.get("days") or ():
        ended = day.get("ended") or {}
        days.add_row(
            str(day.get("day")),
            str(day.get("sessions_started", 0)),
            f"~{day.get('unique_identities', 0)}",
            _counts(day.get("aal2_events")),
            str(day.get("requests", 0)),
            str(ended.get("expired", 0)),
            str(ended.get("revoked", 0)),
            str(ended.get("logged_out", 0)),
        )
    out.print(days)
    return 0


def _revoke_arguments_problem(args: argparse.Namespace) -> str | None:
    if (args.session_id is None) == (args.identity is None):
        return "give a session id, or --identity ID (not both)"
    if args.keep is not None and args.identity is None:
        return "--except needs --identity"
    return None


def _segment(value: str) -> str:
    """An id as one path segment: whatever it holds, it cannot reach another route."""
    return quote(value, safe="")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _time(value: object, seconds: bool = True) -> str:
    """An RFC 3339 UTC time as ``2026-11-24 22:28:28`` (the API's times are UTC)."""
    if not isinstance(value, str) or not value:
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def _device_label(device: dict[str, Any]) -> str:
    parts = [device.get("user_agent_family"), device.get("device_kind")]
    return " / ".join(str(p) for p in parts if p)


def _counts(counts: object) -> str:
    if not isinstance(counts, dict) or not counts:
        return "none"
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _seconds(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else "-"


_BARS = " ▁▂▃▄▅▆▇█"


def _hours(counts: list[int]) -> str:
    """24 counts as a bar per UTC hour, with the busiest hour named."""
    if not counts or not any(counts):
        return "none"
    top = max(counts)
    bars = "".join(_BARS[round(n / top * (len(_BARS) - 1))] for n in counts)
    return f"{bars}  (00-23 UTC; busiest {counts.index(top):02d}:00, {top})"


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"

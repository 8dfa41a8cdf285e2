"""The forward-auth path: dialect -> rule -> credential -> session -> decision -> response.

- ``bridge.pipeline.dialects`` reads the original request the way each proxy sends it, and
  shapes refusals the way that proxy needs them;
- ``bridge.pipeline.rules`` says what the route needs (public, authenticated, aal2, deny, and
  ``max_age`` / ``when``);
- ``bridge.pipeline.credentials`` and ``bridge.sessions.mirror`` find the session;
- ``bridge.pipeline.decision`` says whether it may pass, and ``bridge.pipeline.devices``
  whether it comes from the device its session began on;
- ``bridge.pipeline.upstream_headers`` and ``bridge.web.responses`` build the answer.

It runs in two steps so that the server can answer most requests without leaving its
event loop: ``begin`` does no I/O (it reads the request and this process's fresh copy
of sessions) and either answers or hands back what it found; ``finish`` asks the store
and Kratos, and runs on a worker thread. A slow Kratos or Redis can then hold up only
the requests that need them; what a request gets when ``finish`` takes too long is
``timed_out``.

Every entry point runs the same path: the ASGI front (``bridge.web.asgi``), the WSGI
wrapper (``bridge.web.app``) and ``kratos-bridge check --url`` (``bridge.cli``) each turn
their request into a dialect (``dialect_for`` its path), a ``HeaderView``, the method,
the path as sent and the query, and send back the ``Reply``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bridge.bounded import BoundedMap, TokenBuckets
from bridge.clock import now_ms
from bridge.errors import (
    BadRequest,
    BridgeError,
    CredentialMissing,
    DeviceChanged,
    Forbidden,
    SessionInvalid,
)
from bridge.observe.decision_log import Trace
from bridge.pipeline import decision
from bridge.pipeline.credentials import Credential, extract
from bridge.pipeline.devices import DeviceWatch
from bridge.pipeline.dialects import Dialect, Dialects
from bridge.pipeline.redirects import BrowserRedirects
from bridge.pipeline.rules import Access, Rule, Rules
from bridge.pipeline.upstream_headers import UpstreamHeaders
from bridge.sessions.mirror import Resolved, SessionMirror
from bridge.sessions.session import MirroredSession
from bridge.web import responses
from bridge.web.request import HeaderView, OriginalRequest
from bridge.web.responses import Reply

ASK_AGAIN_BURST = 3
ASK_AGAIN_EVERY_MS = 1000

DecisionWatcher = Callable[[str, str, HeaderView, Reply, Trace], None]
"""Told of every decision once it is made: ``(dialect, method, headers, reply, trace)``.
A refusal's reply says its ``code`` and ``cause`` (the error's class): watchers read
those, never the body. The decision log, the metrics and the analytics are watchers;
with none, no trace is kept and the path does no extra work."""


@dataclass(frozen=True, slots=True)
class Pending:
    """A well-formed request the process's copy cannot answer."""

    dialect: Dialect
    headers: HeaderView
    original: OriginalRequest | None
    rule: Rule
    aal: str | None
    credential: Credential
    started_ms: int
    trace: Trace | None = None  # when someone watches decisions

    @property
    def public(self) -> bool:
        return self.rule.access is Access.PUBLIC and self.aal is None


class ForwardAuth:
    def __init__(
        self,
        dialects: Dialects,
        mirror: SessionMirror,
        cookie_name: str,
        rules: Rules,
        redirects: BrowserRedirects,
        upstream: UpstreamHeaders,
        devices: DeviceWatch | None = None,
        watchers: Sequence[DecisionWatcher] = (),
    ) -> None:
        self.dialects = dialects
        self._watchers = tuple(watchers)
        self._mirror = mirror
        self._cookie_name = cookie_name
        self._rules = rules
        self._redirects = redirects
        self._upstream = upstream
        self._devices = devices if devices is not None and devices.enabled else None
        self._anonymous = responses.allow(upstream.anonymous, ())
        # The allow for a copy and a JWT audience, built once per validation (a copy is one
        # object from one Kratos answer to the next) and reused until its JWT is due to be
        # re-minted. Holding the session keeps its id from being reused while the entry lives.
        self._allows: BoundedMap[tuple[int, str | None], tuple[MirroredSession, Reply, int]] = (
            BoundedMap(50_000)
        )
        # How often Kratos may be asked again about a session whose known AAL or login age
        # falls short of a route: a client refused once or twice that then steps up (or logs
        # in again), however fast, is let in on its next request; a page hammering such a
        # route costs Kratos about one call a second per session and process.
        self._ask_again = TokenBuckets(ASK_AGAIN_BURST, ASK_AGAIN_EVERY_MS)

    @property
    def anonymous(self) -> Reply:
        """The allow of a ``public`` route for a request without a (usable) session."""
        return self._anonymous

    def dialect_for(self, raw_path: str) -> Dialect | None:
        """The dialect of the proxy that asks on ``raw_path`` (as sent, not decoded), or
        ``None``: the path is not the forward-auth path's."""
        return self.dialects.for_path(raw_path)

    def __call__(
        self, dialect: Dialect, headers: HeaderView, method: str, path: str, query: str
    ) -> Reply:
        step = self.begin(dialect, headers, method, path, query)
        return step if isinstance(step, Reply) else self.finish(step)

    def begin(
        self, dialect: Dialect, headers: HeaderView, method: str, path: str, query: str
    ) -> Reply | Pending:
        if not self._watchers:
            return self._begin(dialect, headers, method, path, query, None)
        trace = Trace(time.perf_counter_ns())
        step = self._begin(dialect, headers, method, path, query, trace)
        if isinstance(step, Reply):
            self._tell(dialect.name, method, headers, step, trace)
        return step

    def finish(self, pending: Pending) -> Reply:
        reply = self._finish(pending)
        if pending.trace is not None:
            method = pending.original.method if pending.original is not None else "GET"
            self._tell(pending.dialect.name, method, pending.headers, reply, pending.trace)
        return reply

    def timed_out(self, pending: Pending) -> Reply:
        """What ``pending`` gets when ``finish`` takes longer than the request may wait:
        a public route needs no session, so it goes without; any other is ``503``."""
        return self._anonymous if pending.public else responses.timed_out()

    def _tell(
        self, dialect: str, method: str, headers: HeaderView, reply: Reply, trace: Trace
    ) -> None:
        trace.finished_ns = time.perf_counter_ns()
        for watcher in self._watchers:
            watcher(dialect, method, headers, reply, trace)

    def _begin(
        self,
        dialect: Dialect,
        headers: HeaderView,
        method: str,
        path: str,
        query: str,
        trace: Trace | None,
    ) -> Reply | Pending:
        original = None
        try:
            original = dialect.original(headers, method, path, query)
            rule = self._rule(original)
            if trace is not None:
                trace.rule = rule.label
            aal = decision.required_aal(rule, dialect.asked_aal(query))
            if rule.access is Access.DENY:
                raise Forbidden(f"{rule.label} denies this request")
            public = rule.access is Access.PUBLIC and aal is None
            try:
                credential = extract(headers, self._cookie_name)
                known = self._mirror.from_memory(credential)
            except (CredentialMissing, SessionInvalid):
                if public:
                    return self._anonymous
                raise
        except BridgeError as error:
            return self._refuse(dialect, error, headers, original)
        started = now_ms()
        if known is not None:
            if trace is not None:
                trace.session, trace.tier = known.session, "process"
            problem = decision.problem(rule, aal, known.session, started)
            if problem is None:
                problem = self._device_refusal(known.session, headers)
            if problem is None:
                return self._allow(known, started, rule)
            if not decision.worth_asking_again(problem):
                return self._refuse(dialect, problem, headers, original)
        return Pending(dialect, headers, original, rule, aal, credential, started, trace)

    def _finish(self, pending: Pending) -> Reply:
        try:
            resolved = self._mirror.resolve(pending.credential)
            if pending.trace is not None:
                asked = resolved.session.validated_at_ms >= pending.started_ms
                pending.trace.session = resolved.session
                pending.trace.tier = "kratos" if asked else "redis"
            problem = decision.problem(pending.rule, pending.aal, resolved.session, now_ms())
            if decision.worth_asking_again(problem) and self._may_ask_again(
                resolved.session, pending.started_ms
            ):
                # The user may have just added a second factor or logged in again: ask
                # Kratos, not the copy (unless Kratos was just asked, for this very request).
                resolved = self._mirror.resolve(pending.credential, refresh=True)
                if pending.trace is not None:
                    pending.trace.session, pending.trace.tier = resolved.session, "kratos"
                problem = decision.problem(pending.rule, pending.aal, resolved.session, now_ms())
            if problem is None:
                problem = self._device_refusal(resolved.session, pending.headers)
            if problem is not None:
                raise problem
        except BridgeError as error:
            if pending.public and not isinstance(error, BadRequest):
                return self._anonymous  # a public route needs no session, nor Kratos
            return self._refuse(pending.dialect, error, pending.headers, pending.original)
        return self._allow(resolved, now_ms(), pending.rule)

    def _device_refusal(self, session: MirroredSession, headers: HeaderView) -> BridgeError | None:
        if self._devices is not None and self._devices.refuses(session, headers):
            return DeviceChanged("this session is used from another device than it began on")
        return None

    def _may_ask_again(self, session: MirroredSession, started_ms: int) -> bool:
        if session.validated_at_ms >= started_ms:
            return False  # Kratos was asked for this very request
        return self._ask_again.take(session.id, now_ms())

    def _rule(self, original: OriginalRequest | None) -> Rule:
        if original is None:
            return self._rules.default  # no rules file, and the proxy sent no URL
        return self._rules.match(original.method, original.host, original.target)

    def _allow(self, resolved: Resolved, now: int, rule: Rule) -> Reply:
        session, audience = resolved.session, rule.jwt_audience
        if resolved.set_cookies:
            headers, _ = self._upstream.for_session(session, audience)
            return responses.allow(headers, resolved.set_cookies)
        memo = self._allows.get((id(session), audience))
        if memo is not None and memo[0] is session and now < memo[2]:
            return memo[1]
        headers, valid_until = self._upstream.for_session(session, audience)
        reply = responses.allow(headers, ())
        self._allows.put((id(session), audience), (session, reply, valid_until))
        return reply

    def _refuse(
        self,
        dialect: Dialect,
        error: BridgeError,
        headers: HeaderView,
        original: OriginalRequest | None,
    ) -> Reply:
        return dialect.refuse(
            responses.refusal(error, self._redirects, original), headers, original
        )

"""The process's parts, built once from the settings and wired together (``Bridge``).

Each entry point takes what it needs from here: the ASGI front and the Flask routes
(``bridge.web``), the admin listener (``bridge.admin``), ``kratos-bridge check``
(``bridge.cli``). Nothing here serves a request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.clock import now_ms
from bridge.config import Settings
from bridge.kratos.admin_session import AdminSession
from bridge.kratos.logout import KratosLogout
from bridge.kratos.whoami import KratosClient
from bridge.observe import decision_log
from bridge.pipeline.devices import DeviceChange, DeviceWatch
from bridge.pipeline.dialects import Dialects
from bridge.pipeline.forward_auth import DecisionWatcher, ForwardAuth
from bridge.pipeline.redirects import BrowserRedirects, Origin, host_origin
from bridge.pipeline.rules import Rules
from bridge.pipeline.upstream_headers import UpstreamHeaders
from bridge.sessions.activity import SessionActivity
from bridge.sessions.ending import SessionEnder
from bridge.sessions.mirror import AllOf, SessionEvents, SessionMirror
from bridge.sessions.rejection import RejectionCheck
from bridge.store import Keys, SessionStore
from bridge.web import health
from bridge.web.hooks import KratosHooks
from bridge.web.logout import SignOut

if TYPE_CHECKING:
    from bridge.observe.analytics import Recorder
    from bridge.observe.metrics import Metrics
    from bridge.pipeline.tokens import KeyRing


@dataclass(frozen=True)
class Bridge:
    """One process's parts: each outlives requests, none holds a request's state
    (see README, "What a process shares between requests")."""

    settings: Settings
    store: SessionStore
    kratos: KratosClient
    mirror: SessionMirror
    forward_auth: ForwardAuth  # with the dialects: which paths it serves
    redirects: BrowserRedirects
    keyring: KeyRing | None  # when JWTs are on: the keys behind /.well-known/jwks.json
    # Whether Redis and Kratos answer, asked at most once a second per process: the public
    # /health/ready and the gRPC health service both answer from it.
    ready: Callable[[], bool]
    recorder: Recorder | None = None  # when analytics are on
    metrics: Metrics | None = None  # when metrics are on
    events: SessionEvents = field(default_factory=SessionEvents)  # what watches sessions
    # The process's reader of Kratos's admin API, with its rate-limit state, which every
    # admin client of the bridge's (the 401 check, sliding sessions, the web hooks) shares.
    admin_reads: AdminSession | None = None

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
    # Owned by the 401 check (the mirror closes it); the others borrow it.
    admin_reads = AdminSession(settings.kratos_admin_url, settings.kratos_admin_token)
    activity = session_activity(settings, store, recorder, admin_reads)
    mirror = SessionMirror(
        store,
        kratos,
        settings.secret,
        settings.revalidate_after,
        settings.negative_cache_ttl,
        settings.request_budget,
        events=events,
        activity=activity,
        rejections=RejectionCheck(admin_reads, settings.kratos_timeout),
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
        Dialects(url_required=rules.configured, host_required=bool(rules.hosts)),
        mirror,
        settings.session_cookie,
        rules,
        redirects,
        upstream,
        devices,
        watchers=decision_watchers(settings, recorder, metrics),
    )
    return Bridge(
        settings,
        store,
        kratos,
        mirror,
        forward_auth,
        redirects,
        keyring,
        health.kept_readiness(store, kratos),
        recorder,
        metrics,
        events,
        admin_reads,
    )


def session_activity(
    settings: Settings,
    store: SessionStore,
    recorder: Recorder | None,
    admin_reads: AdminSession | None = None,
) -> SessionActivity | None:
    """Sliding sessions and the idle timeout, when either is on."""
    if not (settings.session_extend or settings.idle_timeout):
        return None
    from bridge.kratos.admin import KratosAdmin  # the Ory SDK: slow to import, so only now

    return SessionActivity(
        store,
        KratosAdmin.of(settings, admin_reads),
        SessionEnder(store, recorder, settings.request_budget),
        settings.session_extend,
        settings.idle_timeout,
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


def kratos_hooks(bridge: Bridge) -> KratosHooks | None:
    """The web hook endpoint's handler, when ``BRIDGE_HOOK_SECRET`` turns it on."""
    settings = bridge.settings
    if settings.hook_secret is None:
        return None
    from bridge.kratos.admin import KratosAdmin  # the Ory SDK: slow to import, so only now

    return KratosHooks(
        settings.hook_secret,
        bridge.store,
        KratosAdmin.of(settings, bridge.admin_reads),
        settings.kratos_timeout,
        events=bridge.events,
    )


def sign_out(bridge: Bridge) -> SignOut:
    """The sign-out endpoint's handler (``BRIDGE_LOGOUT_PATH``)."""
    settings = bridge.settings
    return SignOut(
        bridge.mirror,
        KratosLogout(bridge.kratos.public, settings.session_cookie, settings.kratos_timeout),
        SessionEnder(bridge.store, bridge.recorder, settings.request_budget),
        bridge.redirects,
        settings.session_cookie,
    )

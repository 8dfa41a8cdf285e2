"""The session as an app behind the bridge sees it, read and written without Kratos.

The proxy vouches for a request and passes its session id (``X-Session-Id``); with it, any
Python app (no web framework needed) reads the mirrored session and keeps data of its
own in it::

    sessions = SessionClient("redis://redis:6379/0")     # any BRIDGE_REDIS_URL form
    session = sessions.session(session_id)                # None: ended or unknown
    sessions.set(session_id, {"cart": ["sku-1"], "step": 2})
    sessions.delete(session_id, "step")

- The Kratos part (identity, AAL, methods, device, times) is read-only: it is handed out as
  read-only mappings and tuples, and nothing here writes it.
- The app part is one field per name (1-128 of ``A-Z a-z 0-9 _ . : -``), each value JSON:
  ``str``, ``int``, ``float``, ``bool``, ``None``, ``list`` and ``dict`` come back as
  themselves; anything else is refused with ``TypeError`` before anything is written. A
  field some other writer stored as plain text (not JSON) reads as that text.
- Each write changes only the fields it names, in one step in Redis, so apps and
  processes writing different fields of one session never undo each other, and a write
  to a session that has ended raises ``SessionEnded`` and writes nothing.
- Size cap: a session's app data holds at most ``max_bytes`` (default 64 KiB), counted as
  the UTF-8 bytes of every field's name and stored JSON. A write past it raises
  ``AppDataTooLarge`` and writes nothing; a write that shrinks the data always goes
  through. Give every writer the same cap as the bridge (``BRIDGE_APP_DATA_MAX_BYTES``).
- App data lives exactly as long as the session: it expires with it and is deleted when
  Kratos revokes it or the user logs out.
- Each session has a CSRF token, made with its mirror; check a form's or header's token
  with ``csrf_valid`` (constant time).
- Every session that ends (revoked, logged out, expired, idle, refused by Kratos) comes
  out of ``follow_ended()`` once, e.g. to close a WebSocket or an SSE stream that
  outlives the request the proxy checked::

      for ended in sessions.follow_ended():                  # blocks; one thread for it
          close_connections_of(ended.session_id)

  It reads the bridge's stream ``<key_prefix>events:ended`` from its end (``after``: an
  entry id to resume from, ``"0"`` for all it holds); every reader gets every event. With
  ``group`` (a Redis consumer group, made at the stream's end if new) each event goes
  to one reader of the group, and is acknowledged when the loop asks for the next one.
  The loop ends when ``stop`` is set or the client is closed (noticed within ``timeout``);
  Redis unreachable raises ``StoreUnavailable``.

One client per process is enough; it is safe to share between threads.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from bridge.config.options import OPTIONS
from bridge.errors import StoreUnavailable
from bridge.sessions.app_data import checked_name, decoded, encoded
from bridge.sessions.session import MirroredSession
from bridge.store.base import AppDataStore, Keys
from bridge.store.redis.url import parse_redis_url

DEFAULT_MAX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class UnifiedSession:
    """A session as Kratos last vouched for it (read-only), with the app's data."""

    session_id: str
    identity: Mapping[str, Any]  # id, schema_id, state, traits, metadata_public, addresses
    aal: str
    authentication_methods: tuple[Mapping[str, Any], ...]
    authenticated_at: str | None
    expires_at: str
    device: Mapping[str, Any] | None
    app: dict[str, Any]
    csrf_token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class EndedSession:
    """A session that ended, as the ended stream tells it (README, "Ended sessions")."""

    entry_id: str  # the stream entry's id: where to resume from
    session_id: str  # one event per session: de-duplicate on it
    identity_id: str  # "" when the bridge had no mirror of the session
    reason: str  # revoked, logged_out, expired, idle or rejected
    at: str  # RFC 3339
    by: str  # admin, user, kratos or bridge

    @classmethod
    def of(cls, entry_id: str, fields: Mapping[str, str]) -> EndedSession:
        return cls(
            entry_id,
            fields.get("session_id", ""),
            fields.get("identity_id", ""),
            fields.get("reason", ""),
            fields.get("at", ""),
            fields.get("by", ""),
        )


class SessionClient:
    """Reads sessions the bridge mirrors and writes their app-owned fields.

    Either ``redis_url`` (what ``BRIDGE_REDIS_URL`` accepts, with the bridge's
    ``key_prefix``) or ``store``: the bridge's own store in this process (its embedded
    store, for tests and single-process use; its ``key_prefix`` is the store's).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        key_prefix: str = "bridge:",
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = 0.5,
        sentinel_password: str | None = None,
        store: AppDataStore | None = None,
    ) -> None:
        if (redis_url is None) == (store is None):
            raise ValueError("give either redis_url or store")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes: {max_bytes!r} is not a positive whole number")
        self.max_bytes = max_bytes
        self._owns_store = store is None
        if store is None:
            assert redis_url is not None
            store = _redis_store(redis_url, key_prefix, timeout, sentinel_password)
        self._store = store
        # A blocking read must come back before Redis's socket times out.
        self._block_ms = max(1, int(timeout * 1000 / 2))
        self._closed = threading.Event()

    def session(self, session_id: str) -> UnifiedSession | None:
        """The session with its app data, or ``None`` when it has ended or is unknown."""
        mirrored = self._store.load(session_id, with_app=True)
        return _unified(mirrored) if mirrored is not None else None

    def app(self, session_id: str) -> dict[str, Any]:
        """The session's app data; ``SessionEnded`` when the session has ended."""
        return decoded(self._store.load_app(session_id))

    def set(self, session_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Set these fields (others stay as they are); the whole app data afterwards."""
        return self.update(session_id, values, ())

    def delete(self, session_id: str, *names: str) -> dict[str, Any]:
        """Remove these fields (absent ones are no error); the whole app data afterwards."""
        return self.update(session_id, {}, names)

    def update(
        self, session_id: str, values: Mapping[str, Any], delete: Iterable[str]
    ) -> dict[str, Any]:
        """Set ``values`` and remove ``delete`` in one step; the whole app data afterwards."""
        fields = {checked_name(name): encoded(name, value) for name, value in values.items()}
        removed = [checked_name(name) for name in delete]
        return decoded(self._store.update_app(session_id, fields, removed, self.max_bytes))

    def last_ended_id(self) -> str:
        """Where the ended stream is now: an ``after`` for ``follow_ended`` that misses
        nothing from here on (keep it across a lost connection)."""
        return self._store.last_ended_id()

    def follow_ended(
        self,
        *,
        after: str = "$",
        group: str | None = None,
        consumer: str | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[EndedSession]:
        """Each session that ends, as it ends (see the module's notes). ``after``: an entry
        id, ``"0"`` or ``"$"`` (from now on). ``group``: share the events among the
        group's readers, each named by ``consumer`` (default: host, process and thread)."""
        stop = stop if stop is not None else threading.Event()
        name = consumer or f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
        last = self.last_ended_id() if after == "$" and group is None else after
        while not (stop.is_set() or self.closed):
            try:
                if group is None:
                    entries = self._store.read_ended(last, 100, self._block_ms)
                else:
                    entries = self._store.read_ended_group(group, name, 100, self._block_ms)
            except StoreUnavailable:
                if self.closed:
                    return  # closed under a waiting read: its connection went away
                raise
            for entry_id, fields in entries:
                yield EndedSession.of(entry_id, fields)
                if group is not None:
                    self._store.ack_ended(group, [entry_id])
                last = entry_id

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Let go of Redis; a store handed in belongs to its bridge and stays open. A
        ``follow_ended`` loop ends."""
        self._closed.set()
        if self._owns_store:
            self._store.close()

    def __enter__(self) -> SessionClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def csrf_valid(session: UnifiedSession | None, token: str | None) -> bool:
    """Whether ``token`` is the session's CSRF token, compared in constant time; never for
    a missing session or an empty token."""
    if session is None or not session.csrf_token or not isinstance(token, str) or not token:
        return False
    return hmac.compare_digest(session.csrf_token.encode(), token.encode())


def _redis_store(
    redis_url: str, key_prefix: str, timeout: float, sentinel_password: str | None
) -> AppDataStore:
    from bridge.store.redis.connection import RedisTarget, redis_target
    from bridge.store.redis.store import RedisStore

    parse_redis_url(redis_url)  # a bad URL fails here, naming what is wrong
    _setting("key_prefix", key_prefix)
    if not timeout > 0:
        raise ValueError(f"timeout: {timeout!r} is not a positive number of seconds")

    def connect() -> RedisTarget:
        return redis_target(redis_url, timeout, sentinel_password)

    # The stream is the bridge's default one; a client appends no events to it.
    keys = Keys(key_prefix, key_prefix + "events:aal2")
    return RedisStore(connect, keys, timeout, stream_maxlen=1)


def _setting(name: str, value: str) -> None:
    """Check ``value`` as the bridge checks its own setting ``name``."""
    option = next(option for option in OPTIONS if option.name == name)
    try:
        option.parse(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _unified(mirrored: MirroredSession) -> UnifiedSession:
    view = mirrored.kratos
    return UnifiedSession(
        session_id=mirrored.id,
        identity=_read_only(view["identity"]),
        aal=view["aal"],
        authentication_methods=_read_only(view["authentication_methods"]),
        authenticated_at=view.get("authenticated_at"),
        expires_at=view["expires_at"],
        device=_read_only(view.get("device")),
        app=decoded(mirrored.app),
        csrf_token=mirrored.csrf_token,
    )


def _read_only(value: Any) -> Any:
    """A copy of a JSON value that cannot be changed: mappings and tuples all the way down."""
    if isinstance(value, dict):
        return MappingProxyType({name: _read_only(item) for name, item in value.items()})
    if isinstance(value, list):
        return tuple(_read_only(item) for item in value)
    return value

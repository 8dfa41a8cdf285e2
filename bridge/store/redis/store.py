"""The Redis session store: standalone, Sentinel or Cluster, one key layout for all three.

Each script touches the keys of one hash slot (see ``bridge.store.base`` for the layout and
the invariants). Steps that do not depend on each other go out in one pipeline (one
round trip) on a standalone Redis or Sentinel's master, one by one on a cluster, whose
client pipelines no scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisClusterException

from bridge.bounded import BoundedMap
from bridge.errors import AppDataTooLarge, SessionEnded, StoreUnavailable, TooManyAppFields
from bridge.sessions.session import MirroredSession, new_csrf_token
from bridge.store.base import (
    AAL2_MARKER_GRACE_MS,
    MAX_APP_FIELDS,
    MAX_DEVICE_CHANGES_PER_SESSION,
    CredentialEntry,
    EndedListener,
    Idle,
    Keys,
    Lock,
    Lookup,
    Rejection,
    SaveResult,
    StreamEntry,
)
from bridge.store.redis import scripts
from bridge.store.redis.calls import (
    failure_log,
    unavailable_on_error,
    unavailable_on_error_async,
)
from bridge.store.redis.connection import RedisTarget
from bridge.store.redis.registry import RedisRegistry

MIN_REDIS_MAJOR = 7
_PUBSUB_PING_SECONDS = 5.0  # a quiet subscription is pinged this often
_PUBSUB_PONG_SECONDS = 3.0  # and dropped when the answer takes longer
_PUBSUB_RETRY_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class _Call:
    """One script call, to run alone or in a pipeline."""

    script: Script
    keys: Sequence[str]
    args: Sequence[Any]


class RedisStore:
    """Session mirror in Redis 7.0+: standalone, behind Sentinel, or a Cluster."""

    error_observer: Callable[[str], None] | None = None
    """Told the name of each operation Redis failed (``bridge.observe.metrics``)."""

    def __init__(
        self,
        connect: Callable[[], RedisTarget],
        keys: Keys,
        timeout: float,
        stream_maxlen: int,
        device_stream_maxlen: int = 100_000,
        retention_days: int = 90,
    ) -> None:
        self.keys = keys
        self.registry = RedisRegistry(self, retention_days)
        self._closed = threading.Event()
        self._stream_maxlen = stream_maxlen
        self._device_stream_maxlen = device_stream_maxlen
        # WAIT must answer before the socket times out.
        self._wait_ms = max(1, int(timeout * 1000 / 2))
        # Which session a credential belongs to never changes: read once per process.
        self._pointers: BoundedMap[str, str] = BoundedMap(50_000)
        self._version_checked = False
        self._new_target = connect
        self._connecting = threading.Lock()
        self._refreshing = threading.Lock()
        self._target: RedisTarget | None = None
        # Redis or RedisCluster, as the target's kind says, replying bytes (responses are not
        # decoded). redis-py's hints follow neither (a union of both clients, bytes | str),
        # so what it answers is read as the code below expects.
        self._redis: Any
        try:
            self._connect()
        except redis.RedisError as error:
            # A cluster client asks its seeds at once: if none answers now, the next call
            # tries again (and is answered 503 until one does).
            failure_log.warning("redis not reachable yet: %s", type(error).__name__)

    def _connect(self) -> None:
        with self._connecting:
            if self._target is not None:
                return
            target = self._new_target()
            self._redis = target.client
            register = self._redis.register_script
            self._lookup = register(scripts.LOOKUP)
            self._pointer_save = register(scripts.POINTER_SAVE)
            self._session_save = register(scripts.SESSION_SAVE)
            self._identity_add = register(scripts.IDENTITY_ADD)
            self._publish = register(scripts.PUBLISH)
            self._pointer_forget = register(scripts.POINTER_FORGET)
            self._session_forget = register(scripts.SESSION_FORGET)
            self._session_end = register(scripts.SESSION_END)
            self._release = register(scripts.RELEASE)
            self._update_app = register(scripts.UPDATE_APP)
            self._load_app = register(scripts.LOAD_APP)
            self._mark = register(scripts.MARK)
            self._device_change = register(scripts.DEVICE_CHANGE)
            self._record_ended = register(scripts.RECORD_ENDED)
            self._use = register(scripts.USE)
            self._target = target

    def client(self) -> Any:
        """The connected client, connecting first if need be: for ``unavailable_on_error``
        and the session registry beside this store."""
        if self._target is None:
            self._connect()
        return self._redis

    @property
    def clustered(self) -> bool:
        return self._target is not None and self._target.kind == "cluster"

    @unavailable_on_error
    def find_credential(self, fingerprint: str) -> CredentialEntry | Rejection | None:
        pointer = _entry(self._redis.get(self.keys.credential(fingerprint)))
        if not isinstance(pointer, CredentialEntry):
            return pointer
        value = self._redis.hget(self.keys.credentials(pointer.session_id), fingerprint)
        return _credential(pointer.session_id, value)

    @unavailable_on_error
    def load(self, session_id: str, *, with_app: bool = False) -> MirroredSession | None:
        if with_app:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(self.keys.session(session_id))
            pipe.hgetall(self.keys.app(session_id))
            fields, app = pipe.execute()
        else:
            fields, app = self._redis.hgetall(self.keys.session(session_id)), {}
        return _session(fields, app) if fields else None

    @unavailable_on_error
    def lookup(
        self,
        fingerprint: str,
        now_ms: int,
        fresh_for_ms: int,
        lock_ms: int,
        *,
        with_app: bool,
        idle_ms: int = 0,
    ) -> Lookup:
        sid: str | Lookup | None = self._pointers.get(fingerprint)
        if sid is None:
            sid = self._pointer(fingerprint, self._redis.get(self.keys.credential(fingerprint)))
        if isinstance(sid, Lookup):
            return sid
        call, token = self._lookup_call(
            fingerprint, sid, now_ms, fresh_for_ms, lock_ms, with_app, idle_ms
        )
        return _lookup_result(sid, token, call.script(keys=call.keys, args=call.args))

    def _pointer(self, fingerprint: str, raw: bytes | None) -> str | Lookup:
        """The session a credential's pointer names (kept: it never changes), or the
        lookup's answer when there is none (unknown, or a rejection)."""
        pointer = _entry(raw)
        if not isinstance(pointer, CredentialEntry):
            return Lookup(pointer)
        self._pointers.put(fingerprint, pointer.session_id)
        return pointer.session_id

    def _lookup_call(
        self,
        fingerprint: str,
        sid: str,
        now_ms: int,
        fresh_for_ms: int,
        lock_ms: int,
        with_app: bool,
        idle_ms: int,
    ) -> tuple[_Call, str]:
        """The lookup script's call, and the token of the lock it may take."""
        token = os.urandom(12).hex() if lock_ms else ""
        keys = [
            self.keys.session(sid),
            self.keys.app(sid),
            self.keys.credentials(sid),
            self.keys.revalidating(sid),
            self.keys.last_use(sid),
        ]
        args: list[str | int] = [
            fingerprint,
            now_ms,
            fresh_for_ms,
            lock_ms,
            token,
            "1" if with_app else "0",
            idle_ms,
        ]
        return _Call(self._lookup, keys, args), token

    @unavailable_on_error
    def save(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
        release: Lock | None = None,
    ) -> SaveResult:
        calls = self._save_calls(fingerprint, session, aal2_event, now_ms, release)
        return self._saved(fingerprint, session, aal2_event, now_ms, self._pipeline(calls))

    def _save_calls(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
        release: Lock | None,
    ) -> list[_Call]:
        """The save's one round trip: pointer, session (letting go of its own lock),
        identity, and the release of a lock on another session."""
        sid, expires_at = session.id, session.expires_at_ms
        own_lock = release is not None and release.session_id == sid
        calls = [
            _Call(
                self._pointer_save,
                [self.keys.credential(fingerprint)],
                [sid, session.validated_at_ms, expires_at],
            ),
            _Call(
                self._session_save,
                [
                    self.keys.session(sid),
                    self.keys.app(sid),
                    self.keys.credentials(sid),
                    self.keys.aal2_marker(sid),
                    self.keys.revalidating(sid),
                ],
                [
                    session.encode(),
                    session.validated_at_ms,
                    expires_at,
                    fingerprint,
                    release.token if release is not None and own_lock else "",
                    expires_at + AAL2_MARKER_GRACE_MS,
                    "1" if aal2_event else "0",
                    new_csrf_token(),
                ],
            ),
            _Call(
                self._identity_add,
                [self.keys.identity_sessions(session.identity_id)],
                [sid, expires_at, now_ms],
            ),
        ]
        if release is not None and not own_lock:
            calls.append(self._release_call(release))
        return calls

    def _saved(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
        results: list[Any],
    ) -> SaveResult:
        """What the save's round trip answered, with the follow-ups it calls for (blocking,
        and rare: ``_save_follows_up``)."""
        sid, expires_at = session.id, session.expires_at_ms
        pointer, (state, follow, session_expires_at, csrf_token), *_ = results
        self._pointers.put(fingerprint, sid)
        if pointer != 0:
            # A newer rejection of this credential that the session's slot may not know
            # yet: carry it there, so the mirror just written does not outlive it.
            rejected_at, keep_ms = pointer
            self._pipeline(
                [self._session_forget_call(sid, fingerprint, rejected_at, now_ms + max(keep_ms, 1))]
            )
            return SaveResult(False, None)
        if state == -1:
            return SaveResult(False, None)
        if follow:
            self._follow_expiry(follow, expires_at)
        event_id = None
        if state == 1 and aal2_event is not None:
            # The session's expiry, which a newer answer may have moved past this one's.
            keep_until = max(expires_at, session_expires_at) + AAL2_MARKER_GRACE_MS
            event_id = self._record_upgrade(sid, aal2_event, keep_until)
        return SaveResult(True, event_id, csrf_token.decode())

    def _follow_expiry(self, names: list[bytes], expires_at: int) -> None:
        """Kratos extended a session: its other credentials' pointers (a re-issued cookie
        leaves the old one behind) and its upgrade key live as long as it now does, so
        a rejection of an old cookie still finds the session, and a lost marker still
        finds the upgrade recorded."""
        pipe = self._redis.pipeline(transaction=False)
        for name in (n.decode() for n in names):
            if name.startswith("="):
                upgrade_key = self.keys.aal2_upgrade(name[1:])
                pipe.pexpireat(upgrade_key, expires_at + AAL2_MARKER_GRACE_MS, gt=True)
            else:
                pipe.pexpireat(self.keys.credential(name), expires_at, gt=True)
        try:
            pipe.execute()
        except (redis.RedisError, RedisClusterException) as error:
            # The session is saved; these keys keep their old expiry until the next extend.
            failure_log.warning("redis extend follow-up failed: %s", type(error).__name__)

    def _record_upgrade(self, sid: str, event: dict[str, str], keep_until: int) -> str | None:
        """Append the event unless the stream has it, then mark the session: the marker
        comes last, so a crash between the two means a harmless retry."""
        upgrade = event["upgrade_id"]
        keys = [self.keys.aal2_stream, self.keys.aal2_upgrade(upgrade)]
        args: list[Any] = [self._stream_maxlen, keep_until]
        for name, value in event.items():
            args += [name, value]
        try:
            entry_id, appended, acknowledged = self._publish_durably(keys, args)
            if not acknowledged:
                failure_log.warning("aal2 event %s: no replica acknowledged it yet", upgrade)
                return None
            self._mark(keys=[self.keys.aal2_marker(sid)], args=[upgrade, keep_until])
        except (redis.RedisError, RedisClusterException) as error:
            # The session is saved; only the event waits. Not marked: the next save of
            # the session tries again, so a stream shard in trouble costs no login.
            failure_log.warning("aal2 event %s not recorded yet: %s", upgrade, type(error).__name__)
            return None
        return entry_id.decode() if appended else None

    def _publish_durably(self, keys: list[str], args: list[Any]) -> tuple[bytes, int, bool]:
        """Run the stream step and, on a master with replicas, wait until one has it
        (WAIT counts only this connection's writes, so both go on one connection).
        Acknowledged ``False``: no replica had it in time."""
        connection = pool = None
        try:
            pool = self._node_client(keys[0]).connection_pool
            connection = pool.get_connection()
            call = ("EVALSHA", self._publish.sha, len(keys), *keys, *args)
            try:
                entry_id, appended, replicas = _command(connection, *call)
            except NoScriptError:
                _command(connection, "SCRIPT", "LOAD", scripts.PUBLISH)
                entry_id, appended, replicas = _command(connection, *call)
            acknowledged = replicas == 0 or _command(connection, "WAIT", 1, self._wait_ms) >= 1
        except BaseException:
            if connection is not None:
                connection.disconnect()
            if self._target is not None and self._target.kind == "cluster":
                self._refresh_slots()
            raise
        finally:
            if pool is not None and connection is not None:
                pool.release(connection)
        return entry_id, appended, acknowledged

    def _refresh_slots(self) -> None:
        """The stream's slot may have moved: have the cluster client re-read the slot map,
        off the request path (it asks the nodes one by one)."""
        if not self._refreshing.acquire(blocking=False):
            return

        def refresh() -> None:
            try:
                self._redis.nodes_manager.initialize()
            except (redis.RedisError, RedisClusterException):
                pass  # the client's own next command tries again
            finally:
                self._refreshing.release()

        threading.Thread(target=refresh, name="redis-slots", daemon=True).start()

    def _node_client(self, key: str) -> redis.Redis:
        """The client of the node that holds ``key`` (the store's own one off a cluster)."""
        assert self._target is not None  # the caller is connected
        if self._target.kind != "cluster":
            return self._redis
        return self._redis.get_redis_connection(self._redis.get_node_from_key(key))

    @unavailable_on_error
    def forget(
        self,
        fingerprint: str,
        seen: MirroredSession | None,
        rejection: Rejection,
        release: Lock | None = None,
    ) -> None:
        steps = self._forget_steps(fingerprint, seen, rejection, release)
        try:
            calls = next(steps)
            while True:
                calls = steps.send(self._pipeline(calls))
        except StopIteration:
            return

    def _forget_steps(
        self,
        fingerprint: str,
        seen: MirroredSession | None,
        rejection: Rejection,
        release: Lock | None,
    ) -> Generator[list[_Call], list[Any], None]:
        """The round trips of ``forget``: each yields its calls and is sent their results.
        One, or two when the session is not known here (the pointer names it)."""
        keep_ms = max(rejection.keep_ms, 1)
        pointer = _Call(
            self._pointer_forget,
            [self.keys.credential(fingerprint)],
            [rejection.rejected_at_ms, keep_ms],
        )
        sid = seen.id if seen is not None else self._pointers.get(fingerprint)
        calls = [pointer]
        if sid is None:
            _, named = (yield calls)[0]
            sid = named.decode() if named else None
            calls = []
        if sid is not None:
            own_lock = release is not None and release.session_id == sid
            rejected_at = rejection.rejected_at_ms
            token = release.token if release is not None and own_lock else ""
            calls.append(
                self._session_forget_call(
                    sid, fingerprint, rejected_at, rejected_at + keep_ms, token
                )
            )
            if release is not None and not own_lock:
                calls.append(self._release_call(release))
        elif release is not None:
            calls.append(self._release_call(release))
        if calls:
            yield calls

    @unavailable_on_error
    def end_session(self, session_id: str, ended_at_ms: int, keep_ms: int) -> bool:
        keys = [
            self.keys.session(session_id),
            self.keys.app(session_id),
            self.keys.credentials(session_id),
        ]
        existed = self._session_end(keys=keys, args=[ended_at_ms, ended_at_ms + keep_ms])
        self._redis.publish(self.keys.ended_channel, f"{session_id} {ended_at_ms}")
        return bool(existed)

    def follow_ended(self, listener: EndedListener) -> None:
        threading.Thread(
            target=self._follow, args=(listener,), name="redis-ended", daemon=True
        ).start()

    def _follow(self, listener: EndedListener) -> None:
        """Listen for ended sessions for as long as the store is open; after each
        (re)subscription, tell the listener it may have missed some."""
        while not self._closed.is_set():
            pubsub = None
            try:
                pubsub = self.client().pubsub()
                pubsub.subscribe(self.keys.ended_channel)
                quiet_since, ping_sent = time.monotonic(), 0.0
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    now = time.monotonic()
                    if message is None:
                        if ping_sent and now - ping_sent > _PUBSUB_PONG_SECONDS:
                            # No answer: a connection dropped without a word (a NAT, say).
                            raise redis.ConnectionError("no pong on the subscription")
                        if not ping_sent and now - quiet_since > _PUBSUB_PING_SECONDS:
                            pubsub.ping()
                            ping_sent = now
                        continue
                    quiet_since, ping_sent = now, 0.0
                    if message["type"] == "subscribe":
                        listener(None, 0)
                    elif message["type"] == "message":
                        sid, _, ended_at = message["data"].decode().partition(" ")
                        if ended_at.isdigit():
                            listener(sid, int(ended_at))
            except Exception as error:  # whatever breaks, the listener must come back
                if self._closed.is_set():
                    return  # closed under it: its connection went away
                failure_log.warning("redis subscription lost: %s", type(error).__name__)
                self._closed.wait(_PUBSUB_RETRY_SECONDS)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()

    def _session_forget_call(
        self, sid: str, fingerprint: str, rejected_at: int, keep_until: int, token: str = ""
    ) -> _Call:
        keys = [
            self.keys.session(sid),
            self.keys.app(sid),
            self.keys.credentials(sid),
            self.keys.revalidating(sid),
        ]
        return _Call(self._session_forget, keys, [fingerprint, rejected_at, keep_until, token])

    def _release_call(self, lock: Lock) -> _Call:
        return _Call(self._release, [self.keys.revalidating(lock.session_id)], [lock.token])

    def _pipeline(self, calls: list[_Call]) -> list[Any]:
        """Run independent script calls in one pipeline; load the scripts once if a
        (new, or restarted) Redis has not seen them, and run them again: each is
        idempotent."""
        assert self._target is not None  # the caller is connected
        if len(calls) == 1 or self._target.kind == "cluster":
            # A cluster client pipelines no scripts (its nodes may differ): one by one,
            # each routed, retried and followed through slot moves by the client.
            return [call.script(keys=call.keys, args=call.args) for call in calls]
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            for call in calls:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            results = pipe.execute(raise_on_error=False)
            if _scripts_missing(results, attempt):
                for script in {call.script.script for call in calls}:
                    self._redis.script_load(script)
                continue
            return results
        raise AssertionError("unreachable")

    def on_loop(self) -> RedisStoreOnLoop:
        """The steps of a miss as coroutines, for the event loop that calls this."""
        return RedisStoreOnLoop(self)

    @unavailable_on_error
    def update_app(
        self, session_id: str, values: Mapping[str, str], delete: Iterable[str], max_bytes: int
    ) -> dict[str, str]:
        keys = [self.keys.session(session_id), self.keys.app(session_id)]
        args: list[str | int] = [
            max_bytes,
            len(values),
            MAX_APP_FIELDS,
            *(part for item in values.items() for part in item),
        ]
        state, *rest = self._update_app(keys=keys, args=[*args, *delete])
        if state == 0:
            raise SessionEnded()
        if state == -1:
            raise AppDataTooLarge(max_bytes, rest[0])
        if state == -2:
            raise TooManyAppFields(MAX_APP_FIELDS, rest[0])
        return _text_pairs(rest[0])

    @unavailable_on_error
    def load_app(self, session_id: str) -> dict[str, str]:
        keys = [self.keys.session(session_id), self.keys.app(session_id)]
        app = self._load_app(keys=keys)
        if app is None:
            raise SessionEnded()
        return _text_pairs(app)

    @unavailable_on_error
    def use(self, session_id: str, at_ms: int, idle_ms: int) -> Idle | None:
        (state,) = self._pipeline([self._use_call(session_id, at_ms, idle_ms)])
        return Idle(session_id, state == 1) if state else None

    @unavailable_on_error
    def record_uses(self, uses: Mapping[str, int]) -> None:
        if uses:
            self._pipeline([self._use_call(sid, at, 0) for sid, at in uses.items()])

    def _use_call(self, session_id: str, at_ms: int, idle_ms: int) -> _Call:
        keys = [self.keys.last_use(session_id), self.keys.session(session_id)]
        return _Call(self._use, keys, [at_ms, idle_ms])

    @unavailable_on_error
    def claim_extension(self, session_id: str, expires_at_ms: int) -> bool:
        key = self.keys.extension(session_id, expires_at_ms)
        return bool(self._redis.set(key, "1", nx=True, pxat=expires_at_ms))

    @unavailable_on_error
    def claim_revalidation(self, session_id: str, ttl_ms: int) -> Lock | None:
        lock = Lock(session_id, os.urandom(12).hex())
        key = self.keys.revalidating(session_id)
        return lock if self._redis.set(key, lock.token, nx=True, px=ttl_ms) else None

    @unavailable_on_error
    def release_revalidation(self, lock: Lock) -> None:
        self._release(keys=[self.keys.revalidating(lock.session_id)], args=[lock.token])

    @unavailable_on_error
    def revalidation_pending(self, session_id: str) -> bool:
        return bool(self._redis.exists(self.keys.revalidating(session_id)))

    @unavailable_on_error
    def identity_session_ids(self, identity_id: str, now_ms: int) -> list[str]:
        key = self.keys.identity_sessions(identity_id)
        members = [m.decode() for m in self._redis.zrangebyscore(key, f"({now_ms}", "+inf")]
        if not members:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for sid in members:
            pipe.exists(self.keys.session(sid))
        return [sid for sid, live in zip(members, pipe.execute(), strict=True) if live]

    @unavailable_on_error
    def aal2_events(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        entries = self._redis.xrange(self.keys.aal2_stream, count=count)
        return [
            (eid.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for eid, fields in entries
        ]

    @unavailable_on_error
    def aal2_event_range(
        self, after_id: str | None, since_ms: int, until_ms: int, count: int
    ) -> list[tuple[str, dict[str, str]]]:
        start = f"({after_id}" if after_id is not None else str(since_ms)
        entries = self._redis.xrange(self.keys.aal2_stream, start, str(until_ms), count=count)
        return [
            (eid.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for eid, fields in entries
        ]

    @unavailable_on_error
    def record_device_change(
        self, change_id: str, fields: dict[str, str], keep_until_ms: int
    ) -> bool:
        keys = [
            self.keys.device_change(change_id),
            self.keys.device_stream,
            self.keys.device_session_count(fields.get("session_id", "")),
        ]
        args: list[Any] = [
            keep_until_ms,
            self._device_stream_maxlen,
            MAX_DEVICE_CHANGES_PER_SESSION,
        ]
        args += [part for item in fields.items() for part in item]
        return bool(self._device_change(keys=keys, args=args))

    @unavailable_on_error
    def device_changes(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        entries = self._redis.xrange(self.keys.device_stream, count=count)
        return [
            (eid.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for eid, fields in entries
        ]

    @unavailable_on_error
    def record_ended(
        self, session_id: str, fields: dict[str, str], keep_until_ms: int
    ) -> str | None:
        keys = [self.keys.ended_stream, self.keys.session_ended(session_id)]
        args: list[Any] = [self._stream_maxlen, keep_until_ms]
        args += [part for item in fields.items() for part in item]
        entry_id = self._record_ended(keys=keys, args=args)
        return entry_id.decode() if entry_id else None

    @unavailable_on_error
    def last_ended_id(self) -> str:
        newest = self._redis.xrevrange(self.keys.ended_stream, count=1)
        return newest[0][0].decode() if newest else "0-0"

    @unavailable_on_error
    def read_ended(self, after_id: str, count: int, block_ms: int) -> list[StreamEntry]:
        found = self._redis.xread({self.keys.ended_stream: after_id}, count, block_ms)
        return _stream_entries(found)

    @unavailable_on_error
    def read_ended_group(
        self, group: str, consumer: str, count: int, block_ms: int
    ) -> list[StreamEntry]:
        stream = self.keys.ended_stream
        try:
            found = self._redis.xreadgroup(group, consumer, {stream: ">"}, count, block_ms)
        except redis.ResponseError as error:
            if not str(error).startswith("NOGROUP"):
                raise
            with contextlib.suppress(redis.ResponseError):  # made meanwhile by another reader
                self._redis.xgroup_create(stream, group, "$", mkstream=True)
            return []
        return _stream_entries(found)

    @unavailable_on_error
    def ack_ended(self, group: str, entry_ids: list[str]) -> None:
        if entry_ids:
            self._redis.xack(self.keys.ended_stream, group, *entry_ids)

    @unavailable_on_error
    def ping(self) -> None:
        """Reachable, and new enough for the scripts (PEXPIRETIME, PEXPIREAT GT: 7.0)."""
        if self._version_checked:
            self._redis.ping()
            return
        for version in _versions(self._redis.info("server")):
            major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
            if major < MIN_REDIS_MAJOR:
                raise StoreUnavailable(f"Redis {version} is too old: the bridge needs 7.0 or later")
        self._version_checked = True

    @unavailable_on_error
    def topology(self) -> dict[str, object]:
        assert self._target is not None  # unavailable_on_error connected first
        return self._target.topology()

    def close(self) -> None:
        self._closed.set()
        if self._target is not None:
            self._target.close()


def _command(connection: redis.connection.AbstractConnection, *args: Any) -> Any:
    connection.send_command(*args)
    return connection.read_response()


def _stream_entries(found: Any) -> list[StreamEntry]:
    """What XREAD and XREADGROUP answer for one stream, as text, in whichever shape the
    client's protocol gives (``[[stream, entries]]``, ``{stream: entries}``, or
    ``{stream: [entries]}``); an entry trimmed away while pending has no fields: skipped."""
    if isinstance(found, dict):
        batches = list(found.values())
    else:
        batches = [entries for _, entries in found or []]
    return [
        (eid.decode(), {k.decode(): v.decode() for k, v in fields.items()})
        for entries in batches
        for eid, fields in (entries[0] if entries and isinstance(entries[0], list) else entries)
        if fields
    ]


def _versions(info: dict[str, Any]) -> list[str]:
    """``redis_version`` of each node an INFO reached (a cluster answers per node)."""
    if "redis_version" in info:
        return [str(info["redis_version"])]
    return [str(node.get("redis_version", "0")) for node in info.values()] or ["0"]


def _scripts_missing(results: list[Any], attempt: int) -> bool:
    """Whether a pipeline's scripts must be loaded and the pipeline run again (a new or
    restarted Redis, first attempt); raises the first other error it answered."""
    if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
        return True
    for result in results:
        if isinstance(result, Exception):
            raise result
    return False


def _lookup_result(sid: str, token: str, result: list[Any]) -> Lookup:
    """What the lookup script answered about session ``sid`` (``token``: of the lock it
    was asked to take)."""
    raw_entry, *rest = result
    if raw_entry == b"idle":
        return Lookup(None, idle=Idle(sid, rest[0] == 1))
    entry = _credential(sid, raw_entry)
    if not isinstance(entry, CredentialEntry) or not rest or not rest[0]:
        return Lookup(entry)
    fields, app, lock_state = _pairs(rest[0]), _pairs(rest[1] or []), rest[2]
    session = replace(_session(fields, app), validated_at_ms=entry.validated_at_ms)
    return Lookup(
        entry,
        session,
        lock=Lock(sid, token) if lock_state == 1 else None,
        peer_busy=lock_state == 0,
    )


def _save_follows_up(results: list[Any], aal2_event: dict[str, str] | None) -> bool:
    """Whether the save's answer calls for more round trips (a rejection to carry to the
    session's slot, an extend to follow, an upgrade event to record): rare, and blocking."""
    pointer, (state, follow, _, _), *_ = results
    return pointer != 0 or (state != -1 and (bool(follow) or (state == 1 and bool(aal2_event))))


def _entry(value: bytes | None) -> CredentialEntry | Rejection | None:
    """A credential's pointer: ``<sid> <validated_at>`` or ``-<rejected_at>``."""
    if value is None:
        return None
    text = value.decode()
    return _rejection(text) or CredentialEntry.decode(text)


def _credential(session_id: str, value: bytes | None) -> CredentialEntry | Rejection | None:
    """A credential's field in its session's ``credentials`` hash."""
    if value is None:
        return None
    text = value.decode()
    if text.isdigit():
        return CredentialEntry(session_id, int(text))
    return _rejection(text)


def _rejection(text: str) -> Rejection | None:
    return Rejection(int(text[1:])) if text.startswith("-") and text[1:].isdigit() else None


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A Lua script's HGETALL reply (a flat list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _text_pairs(flat: list[bytes]) -> dict[str, str]:
    """An app hash as a Lua script returns it, as text."""
    return _text(_pairs(flat))


def _text(app: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in app.items()}


def _session(fields: dict[bytes, bytes], app: dict[bytes, bytes]) -> MirroredSession:
    return MirroredSession(
        kratos=orjson.loads(fields[b"kratos"]),
        validated_at_ms=int(fields[b"validated_at"]),
        expires_at_ms=int(fields[b"expires_at"]),
        app=_text(app),
        csrf_token=fields.get(b"csrf", b"").decode(),
    )


class RedisStoreOnLoop:
    """What a miss asks of the Redis store (``lookup``, ``save``, ``forget``, letting go of
    the lock, ``revalidation_pending``, ``use``), as coroutines on one event loop, through
    ``redis.asyncio`` on the store's topology. The same scripts, the same calls and the
    same reading of their answers as ``RedisStore``'s (whose builders it uses), so the
    two may serve the same keys side by side. The rare follow-ups of a save (a newer
    rejection to carry, an extend to follow, an AAL2 event to record durably with
    ``WAIT`` on one connection) run as ``RedisStore`` runs them, on a thread."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.error_observer = store.error_observer
        self._client: Any = None

    def _connected(self) -> Any:
        """The client on this loop; the first call connects the store itself first (a
        cluster client asks its seeds), blocking once."""
        if self._client is None:
            self.store.client()
            assert self.store._target is not None
            self._client = self.store._target.on_loop()
        return self._client

    @unavailable_on_error_async
    async def lookup(
        self,
        fingerprint: str,
        now_ms: int,
        fresh_for_ms: int,
        lock_ms: int,
        *,
        with_app: bool,
        idle_ms: int = 0,
    ) -> Lookup:
        """As ``RedisStore.lookup``."""
        store, client = self.store, self._connected()
        sid: str | Lookup | None = store._pointers.get(fingerprint)
        if sid is None:
            sid = store._pointer(fingerprint, await client.get(store.keys.credential(fingerprint)))
        if isinstance(sid, Lookup):
            return sid
        call, token = store._lookup_call(
            fingerprint, sid, now_ms, fresh_for_ms, lock_ms, with_app, idle_ms
        )
        (result,) = await self._run([call])
        return _lookup_result(sid, token, result)

    @unavailable_on_error_async
    async def save(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
        release: Lock | None = None,
    ) -> SaveResult:
        """As ``RedisStore.save``: one round trip on the loop, and rarely more on a thread."""
        store = self.store
        calls = store._save_calls(fingerprint, session, aal2_event, now_ms, release)
        results = await self._run(calls)
        if _save_follows_up(results, aal2_event):
            return await asyncio.to_thread(
                store._saved, fingerprint, session, aal2_event, now_ms, results
            )
        return store._saved(fingerprint, session, aal2_event, now_ms, results)

    @unavailable_on_error_async
    async def forget(
        self,
        fingerprint: str,
        seen: MirroredSession | None,
        rejection: Rejection,
        release: Lock | None = None,
    ) -> None:
        """As ``RedisStore.forget``."""
        steps = self.store._forget_steps(fingerprint, seen, rejection, release)
        try:
            calls = next(steps)
            while True:
                calls = steps.send(await self._run(calls))
        except StopIteration:
            return

    @unavailable_on_error_async
    async def release_revalidation(self, lock: Lock) -> None:
        await self._run([self.store._release_call(lock)])

    @unavailable_on_error_async
    async def revalidation_pending(self, session_id: str) -> bool:
        key = self.store.keys.revalidating(session_id)
        return bool(await self._connected().exists(key))

    @unavailable_on_error_async
    async def use(self, session_id: str, at_ms: int, idle_ms: int) -> Idle | None:
        (state,) = await self._run([self.store._use_call(session_id, at_ms, idle_ms)])
        return Idle(session_id, state == 1) if state else None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self, calls: list[_Call]) -> list[Any]:
        """As ``RedisStore._pipeline``."""
        client = self._connected()
        if len(calls) == 1 or self.store.clustered:
            return [await _evalsha(client, call) for call in calls]
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            for call in calls:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            results = await pipe.execute(raise_on_error=False)
            if _scripts_missing(results, attempt):
                for script in {call.script.script for call in calls}:
                    await client.script_load(script)
                continue
            return list(results)
        raise AssertionError("unreachable")


async def _evalsha(client: Any, call: _Call) -> Any:
    """One script call; loaded first if this Redis (new, or restarted) lacks it."""
    try:
        return await client.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
    except NoScriptError:
        await client.script_load(call.script.script)
        return await client.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)

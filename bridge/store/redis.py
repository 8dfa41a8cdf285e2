"""The Redis session store: every multi-key change is one Lua script, hence atomic."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import orjson
import redis

from bridge.errors import StoreUnavailable
from bridge.logs import Throttled
from bridge.session import MirroredSession
from bridge.store import (
    AAL2_MARKER_GRACE_MS,
    CredentialEntry,
    Keys,
    Lock,
    Lookup,
    Rejection,
    SaveResult,
)

T = TypeVar("T")
_failures = Throttled(logging.getLogger(__name__))
MIN_REDIS_MAJOR = 7

# Releasing a lock the caller holds (KEYS[n] = the lock, ARGV[m] = its token, '' for none).
_RELEASE_FIRST = """
if ARGV[{token}] ~= '' and redis.call('GET', KEYS[{lock}]) == ARGV[{token}] then
  redis.call('DEL', KEYS[{lock}])
end
"""

# KEYS: session, app, aal2 marker, credential, identity index, stream, lock to release
# ARGV: kratos json, validated_at, expires_at, session id, now, stream maxlen,
#       aal2 marker expires_at, lock token, event fields...
_SAVE = (
    _RELEASE_FIRST.format(lock=7, token=8)
    + """
local validated_at = tonumber(ARGV[2])
local expires_at = ARGV[3]
local credential = redis.call('GET', KEYS[4])
local known = nil
if credential and string.sub(credential, 1, 1) == '-' then
  if validated_at < tonumber(string.sub(credential, 2)) then return {0, false} end
elseif credential then
  known = tonumber(string.match(credential, ' (%d+)$'))
end
if not known or known <= validated_at then
  redis.call('SET', KEYS[4], ARGV[4] .. ' ' .. ARGV[2], 'PXAT', expires_at)
end
local stored = tonumber(redis.call('HGET', KEYS[1], 'validated_at'))
if not stored or stored <= validated_at then
  redis.call('HSET', KEYS[1], 'kratos', ARGV[1], 'validated_at', ARGV[2],
             'expires_at', expires_at)
  redis.call('PEXPIREAT', KEYS[1], expires_at)
  redis.call('PEXPIREAT', KEYS[2], expires_at)
end
redis.call('ZADD', KEYS[5], 'GT', expires_at, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[5])
local last = redis.call('ZRANGE', KEYS[5], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[5], last[2]) end
if #ARGV <= 8 then return {1, false} end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('PEXPIREAT', KEYS[3], ARGV[7], 'GT')
  return {1, false}
end
local id = redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, 9))
redis.call('SET', KEYS[3], id, 'PXAT', ARGV[7])
return {1, id}
"""
)

# KEYS: session, credential, identity index, lock to release
# ARGV: session id, rejected_at, keep ms, lock token
_FORGET = (
    _RELEASE_FIRST.format(lock=4, token=4)
    + """
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '-' .. ARGV[2], 'PX', ARGV[3])
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[3], ARGV[1]) end
return 1
"""
)

# One round trip for a request the process's copy cannot answer. The session's keys are
# derived from the credential entry inside the script, so this needs a standalone Redis
# (a Redis Cluster would refuse keys not named in KEYS).
# KEYS: credential; ARGV: key prefix, now ms, fresh-for ms, lock ms (0: take none),
#       lock token, "1" to read the app data too
# Returns {entry, session fields, app fields, lock state: false | 1 (taken) | 0 (busy)}
_LOOKUP = """
local entry = redis.call('GET', KEYS[1])
if not entry then return {false} end
local sid, validated_at = string.match(entry, '^(%S+) (%d+)$')
if not sid then return {entry} end
local base = ARGV[1] .. '{' .. sid .. '}:'
local fields = redis.call('HGETALL', base .. 'session')
if #fields == 0 then return {entry, false} end
local app = false
if ARGV[6] == '1' then app = redis.call('HGETALL', base .. 'app') end
if ARGV[4] == '0' or tonumber(ARGV[2]) - tonumber(validated_at) < tonumber(ARGV[3]) then
  return {entry, fields, app, false}
end
if redis.call('SET', base .. 'revalidating', ARGV[5], 'NX', 'PX', ARGV[4]) then
  return {entry, fields, app, 1}
end
return {entry, fields, app, 0}
"""

# KEYS: session, app; ARGV: field, value, ...
_SET_APP = """
local expires_at = redis.call('PEXPIRETIME', KEYS[1])
if expires_at < 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV))
redis.call('PEXPIREAT', KEYS[2], expires_at)
return 1
"""

# KEYS: lock; ARGV: token
_RELEASE = _RELEASE_FIRST.format(lock=1, token=1)


def _unavailable_on_error(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as error:
            _failures.warning("redis %s failed: %s", method.__name__, type(error).__name__)
            raise StoreUnavailable(f"Redis: {type(error).__name__}") from None

    return wrapper


class RedisStore:
    """Session mirror in a standalone Redis 7.0+ (one connection pool per process)."""

    def __init__(self, url: str, keys: Keys, timeout: float, stream_maxlen: int) -> None:
        self.keys = keys
        self._stream_maxlen = stream_maxlen
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            max_connections=256,
        )
        self._lookup = self._redis.register_script(_LOOKUP)
        self._save = self._redis.register_script(_SAVE)
        self._forget = self._redis.register_script(_FORGET)
        self._release = self._redis.register_script(_RELEASE)
        self._set_app = self._redis.register_script(_SET_APP)
        self._version_checked = False

    @_unavailable_on_error
    def find_credential(self, fingerprint: str) -> CredentialEntry | Rejection | None:
        return _entry(self._redis.get(self.keys.credential(fingerprint)))

    @_unavailable_on_error
    def load(self, session_id: str, *, with_app: bool = False) -> MirroredSession | None:
        if with_app:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(self.keys.session(session_id))
            pipe.hgetall(self.keys.app(session_id))
            fields, app = pipe.execute()
        else:
            fields, app = self._redis.hgetall(self.keys.session(session_id)), {}
        return _session(fields, app) if fields else None

    @_unavailable_on_error
    def lookup(
        self, fingerprint: str, now_ms: int, fresh_for_ms: int, lock_ms: int, *, with_app: bool
    ) -> Lookup:
        token = os.urandom(12).hex() if lock_ms else ""
        args = [self.keys.prefix, now_ms, fresh_for_ms, lock_ms, token, "1" if with_app else "0"]
        raw_entry, *rest = self._lookup(keys=[self.keys.credential(fingerprint)], args=args)
        entry = _entry(raw_entry)
        if not isinstance(entry, CredentialEntry) or not rest or not rest[0]:
            return Lookup(entry)
        fields, app, lock_state = _pairs(rest[0]), _pairs(rest[1] or []), rest[2]
        session = replace(_session(fields, app), validated_at_ms=entry.validated_at_ms)
        return Lookup(
            entry,
            session,
            lock=Lock(entry.session_id, token) if lock_state == 1 else None,
            peer_busy=lock_state == 0,
        )

    @_unavailable_on_error
    def save(
        self,
        fingerprint: str,
        session: MirroredSession,
        aal2_event: dict[str, str] | None,
        now_ms: int,
        release: Lock | None = None,
    ) -> SaveResult:
        sid = session.id
        keys = [
            self.keys.session(sid),
            self.keys.app(sid),
            self.keys.aal2_marker(sid),
            self.keys.credential(fingerprint),
            self.keys.identity_sessions(session.identity_id),
            self.keys.aal2_stream,
            self.keys.revalidating(release.session_id if release else sid),
        ]
        args: list[Any] = [
            session.encode(),
            session.validated_at_ms,
            session.expires_at_ms,
            sid,
            now_ms,
            self._stream_maxlen,
            session.expires_at_ms + AAL2_MARKER_GRACE_MS,
            release.token if release else "",
        ]
        for name, value in (aal2_event or {}).items():
            args += [name, value]
        cached, event_id = self._save(keys=keys, args=args)
        return SaveResult(bool(cached), event_id.decode() if event_id else None)

    @_unavailable_on_error
    def forget(
        self,
        fingerprint: str,
        seen: MirroredSession | None,
        rejection: Rejection,
        release: Lock | None = None,
    ) -> None:
        keys = [
            self.keys.session(seen.id if seen else "-"),
            self.keys.credential(fingerprint),
            self.keys.identity_sessions(seen.identity_id if seen else "-"),
            self.keys.revalidating(release.session_id if release else "-"),
        ]
        args = [
            seen.id if seen else "",
            rejection.rejected_at_ms,
            max(rejection.keep_ms, 1),
            release.token if release else "",
        ]
        self._forget(keys=keys, args=args)

    @_unavailable_on_error
    def set_app_data(self, session_id: str, data: dict[str, str]) -> bool:
        if not data:
            raise ValueError("no fields to set")
        keys = [self.keys.session(session_id), self.keys.app(session_id)]
        args = [part for item in data.items() for part in item]
        return bool(self._set_app(keys=keys, args=args))

    @_unavailable_on_error
    def claim_revalidation(self, session_id: str, ttl_ms: int) -> Lock | None:
        lock = Lock(session_id, os.urandom(12).hex())
        key = self.keys.revalidating(session_id)
        return lock if self._redis.set(key, lock.token, nx=True, px=ttl_ms) else None

    @_unavailable_on_error
    def release_revalidation(self, lock: Lock) -> None:
        self._release(keys=[self.keys.revalidating(lock.session_id)], args=[lock.token])

    @_unavailable_on_error
    def revalidation_pending(self, session_id: str) -> bool:
        return bool(self._redis.exists(self.keys.revalidating(session_id)))

    @_unavailable_on_error
    def identity_session_ids(self, identity_id: str, now_ms: int) -> list[str]:
        key = self.keys.identity_sessions(identity_id)
        return [m.decode() for m in self._redis.zrangebyscore(key, f"({now_ms}", "+inf")]

    @_unavailable_on_error
    def aal2_events(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        entries = self._redis.xrange(self.keys.aal2_stream, count=count)
        return [
            (eid.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for eid, fields in entries
        ]

    @_unavailable_on_error
    def ping(self) -> None:
        """Reachable, and new enough for the scripts (PEXPIRETIME, PEXPIREAT GT: 7.0)."""
        if self._version_checked:
            self._redis.ping()
            return
        version = str(self._redis.info("server").get("redis_version", "0"))
        major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
        if major < MIN_REDIS_MAJOR:
            raise StoreUnavailable(f"Redis {version} is too old: the bridge needs 7.0 or later")
        self._version_checked = True

    def close(self) -> None:
        self._redis.close()


def _entry(value: bytes | None) -> CredentialEntry | Rejection | None:
    if value is None:
        return None
    text = value.decode()
    if text.startswith("-") and text[1:].isdigit():
        return Rejection(int(text[1:]))
    return CredentialEntry.decode(text)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A Lua script's HGETALL reply (a flat list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _session(fields: dict[bytes, bytes], app: dict[bytes, bytes]) -> MirroredSession:
    return MirroredSession(
        kratos=orjson.loads(fields[b"kratos"]),
        validated_at_ms=int(fields[b"validated_at"]),
        expires_at_ms=int(fields[b"expires_at"]),
        app={k.decode(errors="replace"): v.decode(errors="replace") for k, v in app.items()},
    )

"""The session registry in Redis: every key in the slot of ``<prefix>{registry}``.

Keys (``r`` = ``<prefix>{registry}:``):

- ``r:live``     sorted set, session id -> expires_at (ms); ``r:aal2`` the same, for
  sessions at aal2;
- ``r:started``  sorted set, session id -> started_at (ms), for newest-first pages;
- ``r:records``  hash, session id -> the session's record (JSON);
- ``r:gone``     sorted set, session id -> until when an ended session is not registered
  again;
- ``r:ended``    stream of ended sessions, capped at ``ENDED_STREAM_MAXLEN``;
- ``r:day:<YYYY-MM-DD>`` hash of that day's counters, ``r:ids:<YYYY-MM-DD>`` HyperLogLog
  of the identities seen that day; both expire ``retention_days`` after the day.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from bridge.store.redis.calls import SharedConnection, unavailable_on_error
from bridge.store.registry import (
    ENDED_STREAM_MAXLEN,
    GONE_UNKNOWN_MS,
    Counts,
    Page,
    Sighting,
    after_token,
    day_of,
    hour_of,
    keep_until,
    page_token,
    read_page_token,
)

_SWEEP_BATCH = 500
_SWEEP_ROUNDS = 20

# KEYS: live, started, records, aal2, gone, start day, seen-day identities, seen day
# ARGV: session id, record JSON, requests, last seen, expires_at, started_at, start hour,
#       aal, user-agent family, device kind, start day keep until, seen day keep until,
#       identity id, now
_REPORT = """
local sid, now = ARGV[1], tonumber(ARGV[14])
if redis.call('ZSCORE', KEYS[5], sid) then return 0 end
local old = redis.call('HGET', KEYS[3], sid)
-- An expired session is not registered; a registered one still gets its last requests.
if not old and tonumber(ARGV[5]) <= now then return 0 end
local record = cjson.decode(ARGV[2])
local requests = tonumber(ARGV[3])
if old then
  local before = cjson.decode(old)
  record.first_seen = before.first_seen
  record.requests = before.requests + requests
  if before.last_seen > record.last_seen then record.last_seen = before.last_seen end
  if before.expires_at > record.expires_at then record.expires_at = before.expires_at end
else
  redis.call('HINCRBY', KEYS[6], 'started', 1)
  redis.call('HINCRBY', KEYS[6], 'hour:' .. ARGV[7], 1)
  redis.call('HINCRBY', KEYS[6], 'ua:' .. ARGV[9], 1)
  redis.call('HINCRBY', KEYS[6], 'device:' .. ARGV[10], 1)
  redis.call('PEXPIREAT', KEYS[6], ARGV[11])
  redis.call('ZADD', KEYS[2], ARGV[6], sid)
end
redis.call('HSET', KEYS[3], sid, cjson.encode(record))
redis.call('ZADD', KEYS[1], 'GT', ARGV[5], sid)
if ARGV[8] == 'aal2' then
  redis.call('ZADD', KEYS[4], 'GT', ARGV[5], sid)
else
  redis.call('ZREM', KEYS[4], sid)
end
redis.call('PFADD', KEYS[7], ARGV[13])
redis.call('PEXPIREAT', KEYS[7], ARGV[12])
if requests > 0 then
  redis.call('HINCRBY', KEYS[8], 'requests', requests)
  redis.call('PEXPIREAT', KEYS[8], ARGV[12])
end
return 1
"""

# KEYS: live, started, records, aal2, gone, ended stream, today
# ARGV: stream max length, today keep until, now, batch, reason, how long an unknown
#       session stays gone, session id (none: sweep)
# Ends the one session named, or the expired ones (at their expiry); returns how many.
_END = """
local now = tonumber(ARGV[3])
local function finish(sid, reason, at)
  local stored = redis.call('HGET', KEYS[3], sid)
  if not stored then
    redis.call('ZADD', KEYS[5], 'GT', now + tonumber(ARGV[6]), sid)
    return 0
  end
  local record = cjson.decode(stored)
  redis.call('HDEL', KEYS[3], sid)
  redis.call('ZREM', KEYS[1], sid)
  redis.call('ZREM', KEYS[2], sid)
  redis.call('ZREM', KEYS[4], sid)
  redis.call('ZADD', KEYS[5], record.expires_at, sid)
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[1], '*',
    'session_id', sid, 'identity_id', record.identity_id, 'reason', reason,
    'aal', record.aal, 'started_at', string.format('%d', record.started_at),
    'ended_at', string.format('%d', at),
    'duration_ms', string.format('%d', math.max(0, at - record.started_at)),
    'requests', string.format('%d', record.requests))
  redis.call('HINCRBY', KEYS[7], 'ended:' .. reason, 1)
  redis.call('PEXPIREAT', KEYS[7], ARGV[2])
  return 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
if ARGV[7] then return finish(ARGV[7], ARGV[5], now) end
local ended = 0
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, ARGV[4])
for i = 1, #due, 2 do ended = ended + finish(due[i], 'expired', tonumber(due[i + 1])) end
return ended
"""


class RedisRegistry:
    def __init__(self, store: SharedConnection, retention_days: int) -> None:
        self.store = store
        self._retention_days = retention_days
        prefix = store.keys.prefix + "{registry}:"
        self._prefix = prefix
        self._fixed = [prefix + name for name in ("live", "started", "records", "aal2", "gone")]
        self._records = prefix + "records"
        self._ended = prefix + "ended"
        self._scripts: tuple[Any, Any] | None = None

    def _day(self, day: str) -> str:
        return f"{self._prefix}day:{day}"

    def _client(self) -> Any:
        client = self.store.client()
        if self._scripts is None:
            self._scripts = (client.register_script(_REPORT), client.register_script(_END))
        return client

    @unavailable_on_error
    def report(self, sightings: Sequence[Sighting], now_ms: int) -> None:
        client = self._client()
        report = self._scripts[0]  # type: ignore[index]
        # A cluster client pipelines no scripts: one call each, all to the registry's node.
        pipe = client if self.store.clustered else client.pipeline(transaction=False)
        for seen in sightings:
            start_day, seen_day = day_of(seen.started_at_ms), day_of(seen.last_seen_ms)
            keys = [
                *self._fixed,
                self._day(start_day),
                f"{self._prefix}ids:{seen_day}",
                self._day(seen_day),
            ]
            args = [
                seen.session_id,
                orjson.dumps(seen.record()),
                seen.requests,
                seen.last_seen_ms,
                seen.expires_at_ms,
                seen.started_at_ms,
                hour_of(seen.started_at_ms),
                seen.aal,
                seen.device.get("user_agent_family", "Other"),
                seen.device.get("device_kind", "other"),
                keep_until(start_day, self._retention_days),
                keep_until(seen_day, self._retention_days),
                seen.identity_id,
                now_ms,
            ]
            report(keys=keys, args=args, client=pipe)
        if pipe is not client:
            pipe.execute()

    @unavailable_on_error
    def end(self, session_id: str, reason: str, now_ms: int) -> bool:
        return bool(self._end(now_ms, reason, session_id))

    @unavailable_on_error
    def sweep(self, now_ms: int) -> int:
        ended = 0
        for _ in range(_SWEEP_ROUNDS):  # a backlog goes in a few batches, not one long script
            batch = int(self._end(now_ms, "expired", None))
            ended += batch
            if batch < _SWEEP_BATCH:
                break
        return ended

    @unavailable_on_error
    def active(self, now_ms: int) -> int:
        return int(self._client().zcount(self._fixed[0], f"({now_ms}", "+inf"))

    def _end(self, now_ms: int, reason: str, session_id: str | None) -> Any:
        client = self._client()
        today = day_of(now_ms)
        keys = [*self._fixed, self._ended, self._day(today)]
        args: list[Any] = [
            ENDED_STREAM_MAXLEN,
            keep_until(today, self._retention_days),
            now_ms,
            _SWEEP_BATCH,
            reason,
            GONE_UNKNOWN_MS,
        ]
        if session_id is not None:
            args.append(session_id)
        return self._scripts[1](keys=keys, args=args, client=client)  # type: ignore[index]

    @unavailable_on_error
    def count_aal2(self, method: str, at_ms: int) -> None:
        day = day_of(at_ms)
        pipe = self._client().pipeline(transaction=False)
        pipe.hincrby(self._day(day), f"aal2:{method}", 1)
        pipe.pexpireat(self._day(day), keep_until(day, self._retention_days))
        pipe.execute()

    @unavailable_on_error
    def page(self, size: int, token: str | None) -> Page:
        after = read_page_token(token)
        top = "+inf" if after is None else after[0]
        client = self._client()
        found: list[str] = []
        offset = 0
        while len(found) < size:
            ranked = client.zrevrangebyscore(
                self._fixed[1], top, "-inf", start=offset, num=size + 1, withscores=True
            )
            if not ranked:
                break
            batch = [(sid.decode(), int(score)) for sid, score in ranked]
            found += after_token(batch, after)
            offset += len(ranked)
        records = self.records(found[:size])
        more = len(found) > size
        return Page(records, page_token(records[-1]) if more and records else None)

    @unavailable_on_error
    def records(self, session_ids: Sequence[str]) -> list[dict[str, Any]]:
        if not session_ids:
            return []
        values = self._client().hmget(self._records, list(session_ids))
        return [orjson.loads(value) for value in values if value is not None]

    @unavailable_on_error
    def counts(self, days: Sequence[str], since_ms: int, now_ms: int) -> Counts:
        pipe = self._client().pipeline(transaction=False)
        for day in days:
            pipe.hgetall(self._day(day))
        for day in days:
            pipe.pfcount(f"{self._prefix}ids:{day}")
        if days:  # PFCOUNT of no key is an error
            pipe.pfcount(*[f"{self._prefix}ids:{day}" for day in days])
        else:
            pipe.echo(0)
        pipe.zcount(self._fixed[0], f"({now_ms}", "+inf")
        pipe.zcount(self._fixed[3], f"({now_ms}", "+inf")
        pipe.xrange(self._ended, min=str(since_ms), count=ENDED_STREAM_MAXLEN)
        results = pipe.execute()
        count = len(days)
        per_day = {
            day: {k.decode(): int(v) for k, v in fields.items()}
            for day, fields in zip(days, results[:count], strict=True)
        }
        uniques = dict(zip(days, results[count : 2 * count], strict=True))
        ended = [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in results[2 * count + 3]
        ]
        return Counts(
            per_day,
            uniques,
            int(results[2 * count]),
            results[2 * count + 1],
            results[2 * count + 2],
            ended,
        )

"""The Redis store's Lua scripts. Each touches the keys of one hash slot (the layout and
the invariants they keep are in ``bridge.store.base``), so the same script runs on a
standalone Redis, Sentinel's master and a Cluster."""

from __future__ import annotations

from bridge.store.base import ENDED

# Releasing a lock the caller holds (KEYS[n] = the lock, ARGV[m] = its token, '' for none).
_RELEASE_FIRST = """
if ARGV[{token}] ~= '' and redis.call('GET', KEYS[{lock}]) == ARGV[{token}] then
  redis.call('DEL', KEYS[{lock}])
end
"""

# Expiry of a key that only ever grows (a fresh key has none: -1).
_EXPIRE_NOT_BEFORE = """
local function expire_not_before(key, at)
  local current = redis.call('PEXPIRETIME', key)
  if current == -1 or current < tonumber(at) then redis.call('PEXPIREAT', key, at) end
end
"""

# Credential slot. KEYS: pointer; ARGV: session id, validated_at, expires_at
# Returns 0, or the time of the newer rejection that wins and how long it is kept.
POINTER_SAVE = """
local entry = redis.call('GET', KEYS[1])
local validated_at = tonumber(ARGV[2])
if entry and string.sub(entry, 1, 1) == '-' then
  local rejected_at = tonumber(string.sub(entry, 2))
  if validated_at < rejected_at then return {rejected_at, redis.call('PTTL', KEYS[1])} end
elseif entry then
  local known = tonumber(string.match(entry, ' (%d+)$'))
  if known and known > validated_at then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'PXAT', ARGV[3])
return 0
"""

# Session slot. KEYS: session, app, credentials, aal2 marker, lock to release
# ARGV: kratos json, validated_at, expires_at, fingerprint, lock token,
#       aal2 marker expires_at, "1" when the session is at aal2, a new CSRF token
# Returns {state, keys in other slots that must now live as long, the session's expiry,
# its CSRF token}: state -1 (a newer rejection: nothing written), 0, or 1 (the AAL2
# event is not recorded). When the expiry moved later (Kratos extended the session), the
# other credentials' fingerprints and the upgrade id follow, so their keys can be kept as
# long. The CSRF token is the new one only when this save created the session key.
SESSION_SAVE = (
    _RELEASE_FIRST.format(lock=5, token=5)
    + _EXPIRE_NOT_BEFORE
    + """
local validated_at = tonumber(ARGV[2])
local ended = tonumber(redis.call('HGET', KEYS[3], '"""
    + ENDED
    + """'))
if ended and validated_at < ended then return {-1, {}, 0, ''} end
local known = redis.call('HGET', KEYS[3], ARGV[4])
if not known or string.sub(known, 1, 1) == '-' or tonumber(known) <= validated_at then
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[2])
end
expire_not_before(KEYS[3], ARGV[3])
local stored = redis.call('HMGET', KEYS[1], 'validated_at', 'expires_at')
local moved = stored[2] and tonumber(stored[2]) < tonumber(ARGV[3])
if not stored[1] or tonumber(stored[1]) <= validated_at then
  redis.call('HSET', KEYS[1], 'kratos', ARGV[1], 'validated_at', ARGV[2],
             'expires_at', ARGV[3])
  redis.call('HSETNX', KEYS[1], 'csrf', ARGV[8])
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
  redis.call('PEXPIREAT', KEYS[2], ARGV[3])
else
  moved = false
end
local follow = {}
if moved then
  for _, name in ipairs(redis.call('HKEYS', KEYS[3])) do
    if name ~= ARGV[4] and name ~= '"""
    + ENDED
    + """' then table.insert(follow, name) end
  end
end
local expires_at = tonumber(redis.call('HGET', KEYS[1], 'expires_at'))
local csrf = redis.call('HGET', KEYS[1], 'csrf') or ''
local marker = redis.call('GET', KEYS[4])
if marker then
  redis.call('PEXPIREAT', KEYS[4], ARGV[6], 'GT')
  if moved then table.insert(follow, '=' .. marker) end
  return {0, follow, expires_at, csrf}
end
if ARGV[7] ~= '1' then return {0, follow, expires_at, csrf} end
return {1, follow, expires_at, csrf}
"""
)

# Identity slot. KEYS: index; ARGV: session id, expires_at, now
IDENTITY_ADD = """
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[1], last[2]) end
return 0
"""

# Stream slot. KEYS: stream, upgrade key; ARGV: max length, keep upgrade key until (at
# least), fields...
# Returns {stream entry id, 1 if appended now, replicas connected to this master}.
PUBLISH = """
local id = redis.call('GET', KEYS[2])
local appended = 0
if not id then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
  appended = 1
end
-- Always a write, also when the event is there: WAIT (Redis 7.2+) counts this
-- connection's writes only, and the marker must wait for the event to be replicated.
local keep = math.max(tonumber(ARGV[2]), redis.call('PEXPIRETIME', KEYS[2]))
redis.call('SET', KEYS[2], id, 'PXAT', keep)
local replicas = string.match(redis.call('INFO', 'replication'), 'connected_slaves:(%d+)')
return {id, appended, tonumber(replicas) or 0}
"""

# Credential slot. KEYS: pointer; ARGV: rejected_at, keep ms
# Returns {1 if recorded, the session id the pointer named or false}.
POINTER_FORGET = """
local entry = redis.call('GET', KEYS[1])
local rejected_at = tonumber(ARGV[1])
local sid = false
if entry and string.sub(entry, 1, 1) == '-' then
  if tonumber(string.sub(entry, 2)) > rejected_at then return {0, false} end
elseif entry then
  local known
  sid, known = string.match(entry, '^(%S+) (%d+)$')
  if known and tonumber(known) > rejected_at then return {0, sid} end
end
redis.call('SET', KEYS[1], '-' .. ARGV[1], 'PX', ARGV[2])
return {1, sid}
"""

# Session slot. KEYS: session, app, credentials, lock to release
# ARGV: fingerprint, rejected_at, remember until (ms), lock token
# The app data goes with the mirror: a session Kratos turned down keeps none.
SESSION_FORGET = (
    _RELEASE_FIRST.format(lock=4, token=4)
    + _EXPIRE_NOT_BEFORE
    + """
local rejected_at = tonumber(ARGV[2])
local known = redis.call('HGET', KEYS[3], ARGV[1])
if known and string.sub(known, 1, 1) ~= '-' and tonumber(known) > rejected_at then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[1], '-' .. ARGV[2])
local ended = tonumber(redis.call('HGET', KEYS[3], '"""
    + ENDED
    + """'))
if not ended or ended < rejected_at then
  redis.call('HSET', KEYS[3], '"""
    + ENDED
    + """', ARGV[2])
end
redis.call('DEL', KEYS[1], KEYS[2])
expire_not_before(KEYS[3], ARGV[3])
return 1
"""
)

# Session slot. KEYS: session, app, credentials; ARGV: ended_at, remember until (ms)
# Returns 1 when there was a mirror to drop.
SESSION_END = (
    _EXPIRE_NOT_BEFORE
    + """
local ended = tonumber(redis.call('HGET', KEYS[3], '"""
    + ENDED
    + """'))
if not ended or ended < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[3], '"""
    + ENDED
    + """', ARGV[1])
end
expire_not_before(KEYS[3], ARGV[2])
return redis.call('DEL', KEYS[1], KEYS[2]) > 0 and 1 or 0
"""
)

# A session's last use (see ``bridge.store.base``: ``p{sid}:used``). ``use`` records ``at``
# (ms, text) unless the last recorded use is more than ``idle`` ms older (0: no check),
# which marks the session idle for good. Returns 0 (recorded), 1 (found idle now) or
# 2 (idle before). The record expires with the session key (it is not written while that
# key is gone and no record is there).
_USE = """
local function use(used_key, session_key, at, idle)
  local used = redis.call('GET', used_key)
  if used == 'idle' then return 2 end
  if used and idle > 0 and tonumber(at) - tonumber(used) > idle then
    redis.call('SET', used_key, 'idle', 'KEEPTTL')
    return 1
  end
  if used and tonumber(used) >= tonumber(at) then return 0 end
  local expires_at = redis.call('PEXPIRETIME', session_key)
  if expires_at > 0 then
    expires_at = math.max(expires_at, redis.call('PEXPIRETIME', used_key))
    redis.call('SET', used_key, at, 'PXAT', expires_at)
  elseif used then
    redis.call('SET', used_key, at, 'KEEPTTL')
  end
  return 0
end
"""

# Session slot. KEYS: last use, session; ARGV: at, idle limit ms (0: record only)
USE = _USE + "return use(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]))"

# Session slot: one round trip for a request this process's copy cannot answer.
# KEYS: session, app, credentials, lock, last use
# ARGV: fingerprint, now ms, fresh-for ms, lock ms (0: take none), lock token, "1" for app,
#       idle limit ms (0: none)
# Returns {credential entry, session fields, app fields, lock: false | 1 (taken) | 0 (busy)},
# or {'idle', 1 | 2} for a session found idle (``use``).
LOOKUP = (
    _USE
    + """
if ARGV[7] ~= '0' then
  local idle = use(KEYS[5], KEYS[1], ARGV[2], tonumber(ARGV[7]))
  if idle ~= 0 then return {'idle', idle} end
end
local entry = redis.call('HGET', KEYS[3], ARGV[1])
if not entry then return {false} end
if string.sub(entry, 1, 1) == '-' then return {entry} end
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {entry, false} end
local app = false
if ARGV[6] == '1' then app = redis.call('HGETALL', KEYS[2]) end
if ARGV[4] == '0' or tonumber(ARGV[2]) - tonumber(entry) < tonumber(ARGV[3]) then
  return {entry, fields, app, false}
end
if redis.call('SET', KEYS[4], ARGV[5], 'NX', 'PX', ARGV[4]) then
  return {entry, fields, app, 1}
end
return {entry, fields, app, 0}
"""
)

# Session slot. KEYS: session, app
# ARGV: max bytes, number of fields to set n, n names and values in turn, names to delete
# Returns {0} (no session), {-1, the size it would have had}, or {1, the app hash after}.
# Field by field, never the hash as a whole: writers of other fields lose nothing.
UPDATE_APP = """
local expires_at = redis.call('PEXPIRETIME', KEYS[1])
if expires_at < 0 then return {0} end
local last_set = 3 + 2 * tonumber(ARGV[2])
local count, adds = redis.call('HLEN', KEYS[2]), 0
for i = 4, last_set, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then adds = adds + 1 end
end
if adds > 0 and count + adds > tonumber(ARGV[3]) then return {-2, count + adds} end
local app, before = {}, 0
local stored = redis.call('HGETALL', KEYS[2])
for i = 1, #stored, 2 do
  app[stored[i]] = stored[i + 1]
  before = before + #stored[i] + #stored[i + 1]
end
for i = 4, last_set, 2 do app[ARGV[i]] = ARGV[i + 1] end
for i = last_set + 1, #ARGV do app[ARGV[i]] = nil end
local after = 0
for name, value in pairs(app) do after = after + #name + #value end
if after > tonumber(ARGV[1]) and after > before then return {-1, after} end
for i = 4, last_set, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
for i = last_set + 1, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
redis.call('PEXPIREAT', KEYS[2], expires_at)
return {1, redis.call('HGETALL', KEYS[2])}
"""

# Session slot. KEYS: session, app. Returns false (no session) or the app hash.
LOAD_APP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HGETALL', KEYS[2])
"""

# KEYS: lock; ARGV: token
RELEASE = _RELEASE_FIRST.format(lock=1, token=1)

# Device stream slot. KEYS: change key, stream, the session's count; ARGV: keep until,
# maxlen, most per session, field, value, ...
DEVICE_CHANGE = """
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[3]) then return 0 end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PXAT', ARGV[1]) then return 0 end
if redis.call('INCR', KEYS[3]) == 1 then redis.call('PEXPIREAT', KEYS[3], ARGV[1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
return 1
"""

# Session slot. KEYS: aal2 marker; ARGV: upgrade id, keep until (at least)
MARK = """
local keep = math.max(tonumber(ARGV[2]), redis.call('PEXPIRETIME', KEYS[1]))
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', keep)
return 1
"""

# Ended stream slot. KEYS: stream, the session's key; ARGV: max length, keep key until,
# field, value, ... Returns the entry id when appended, false when the end is there.
RECORD_ENDED = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'PXAT', ARGV[2])
return id
"""

"""Lua scripts of the redis storage backend.

Every change to the store is one script, so redis applies it atomically: the
script checks its conditions, moves the revision counter, writes the key and
appends the change to the change stream. Read scripts write nothing.

Every script receives the same five keys first (see
`fleetkit.plugins.redis.KeyNames`), then the keys it works on, and the
namespace (the configured prefix) as ARGV[1]. Write scripts also receive the
change stream's length limit as ARGV[2]. The keys of leases found while
sweeping are built from the namespace inside the script. A single redis
server allows that, but redis cluster does not.

Layout under the namespace ``N`` (a prefix such as ``/fleetkit/``):

- ``N#meta``: hash with ``revision`` (the store revision) and ``epoch`` (the
  server time of the first write, to notice a store that lost its data);
- ``N#index``: sorted set of all live keys, score 0, for prefix listing;
- ``N#changes``: stream of changes, entry id ``<revision>-<n>`` for the n-th
  key changed at that revision, fields ``t`` (``put``/``delete``), ``k`` (key),
  ``n`` (number of keys changed at that revision) and ``v`` (value, puts only);
- ``N#leases``: sorted set of lease ids, scored by deadline in server milliseconds;
- ``N#lease-ttl``: hash of lease id to TTL in milliseconds;
- ``N#lease/<id>``: set of the keys attached to a lease;
- ``Nkv/<key>``: hash of one key: ``v`` value, ``c`` create revision,
  ``m`` mod revision, ``l`` lease id (``0`` for none).

A script that fails halfway keeps its earlier writes (redis has no rollback),
so the scripts check everything that can fail before they write.
"""

from __future__ import annotations

# Leases ended per sweep; a script that finds more leaves the rest to the next one.
SWEEP_BATCH = 64

_COMMON = r"""
local META, INDEX, CHANGES, LEASES, TTLS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local NS = ARGV[1]

local function int(number)
  return string.format('%d', number)
end

local function data_key(key)
  return NS .. 'kv/' .. key
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A key without lease is alive; a leased key lives while its deadline is in the future.
local function lease_alive(lease, now)
  if not lease or lease == '0' then
    return true
  end
  local deadline = redis.call('ZSCORE', LEASES, lease)
  return deadline ~= false and tonumber(deadline) > now
end
"""

_WRITE = _COMMON + r"""
local HISTORY = ARGV[2]

local function members_key(lease)
  return NS .. '#lease/' .. lease
end

local function next_revision()
  local revision = redis.call('HINCRBY', META, 'revision', 1)
  if revision == 1 then
    local t = redis.call('TIME')
    redis.call('HSET', META, 'epoch', t[1] .. '.' .. t[2])
  end
  return revision
end

local function emit(revision, seq, count, kind, key, value)
  local id = int(revision) .. '-' .. int(seq)
  if kind == 'put' then
    redis.call('XADD', CHANGES, 'MAXLEN', '~', HISTORY, id, 't', 'put', 'k', key, 'n', int(count), 'v', value)
  else
    redis.call('XADD', CHANGES, 'MAXLEN', '~', HISTORY, id, 't', 'delete', 'k', key, 'n', int(count))
  end
end

local function forget(key)
  redis.call('DEL', data_key(key))
  redis.call('ZREM', INDEX, key)
end

-- Remove a lease and its keys; the keys are deleted at one new revision.
local function end_lease(lease)
  local members = members_key(lease)
  local keys = redis.call('SMEMBERS', members)
  redis.call('DEL', members)
  redis.call('ZREM', LEASES, lease)
  redis.call('HDEL', TTLS, lease)
  if #keys == 0 then
    return
  end
  table.sort(keys)
  local revision = next_revision()
  for i, key in ipairs(keys) do
    forget(key)
    emit(revision, i - 1, #keys, 'delete', key)
  end
end

local function sweep(now)
  local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', int(now), 'LIMIT', 0, __SWEEP_BATCH__)
  for _, lease in ipairs(expired) do
    end_lease(lease)
  end
  return #expired
end

-- End the lease of the key stored at `hash_key` if it expired, however many others wait.
local function settle(hash_key, now)
  local lease = redis.call('HGET', hash_key, 'l')
  if lease and not lease_alive(lease, now) then
    end_lease(lease)
  end
end

-- Returns nil when the fence holds, else the fence key's create revision ('0' when absent).
local function broken_fence(fence_key, fence_revision)
  if fence_revision == '' then
    return nil
  end
  local created = redis.call('HGET', fence_key, 'c') or '0'
  if created ~= fence_revision then
    return created
  end
  return nil
end

local function prepare(target, fence_key, fence_revision, now)
  settle(target, now)
  if fence_revision ~= '' then
    settle(fence_key, now)
  end
  sweep(now)
end
""".replace("__SWEEP_BATCH__", str(SWEEP_BATCH))

# Put or compare-and-swap. KEYS[6] is the key's hash and KEYS[7] the fence key's hash. ARGV[3..7] are the
# key, value, lease, expected mod revision ('-1' for none) and fence create revision ('' for none).
# The reply is {'ok', revision}, {'mismatch'}, {'fenced', current create revision} or {'nolease'}.
PUT = _WRITE + r"""
local key, value, lease, expected, fence_revision = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local target, fence_key = KEYS[6], KEYS[7]
local now = now_ms()
prepare(target, fence_key, fence_revision, now)

local broken = broken_fence(fence_key, fence_revision)
if broken then
  return {'fenced', broken}
end
local current = redis.call('HMGET', target, 'c', 'm', 'l')
if expected ~= '-1' and (current[2] or '0') ~= expected then
  return {'mismatch'}
end
if lease ~= '0' and not lease_alive(lease, now) then
  return {'nolease'}
end

local revision = next_revision()
local old_lease = current[3] or '0'
if old_lease ~= lease then
  if old_lease ~= '0' then
    redis.call('SREM', members_key(old_lease), key)
  end
  if lease ~= '0' then
    redis.call('SADD', members_key(lease), key)
  end
end
redis.call('HSET', target, 'v', value, 'c', current[1] or int(revision), 'm', int(revision), 'l', lease)
redis.call('ZADD', INDEX, 0, key)
emit(revision, 0, 1, 'put', key, value)
return {'ok', revision}
"""

# Delete. KEYS[6] is the key's hash and KEYS[7] the fence key's hash. ARGV[3..5] are the key, expected
# mod revision ('-1' for none) and fence create revision ('' for none).
# The reply is {'ok', revision}, {'absent'}, {'mismatch'} or {'fenced', current create revision}.
DELETE = _WRITE + r"""
local key, expected, fence_revision = ARGV[3], ARGV[4], ARGV[5]
local target, fence_key = KEYS[6], KEYS[7]
local now = now_ms()
prepare(target, fence_key, fence_revision, now)

local broken = broken_fence(fence_key, fence_revision)
if broken then
  return {'fenced', broken}
end
local current = redis.call('HMGET', target, 'm', 'l')
if not current[1] then
  return {'absent'}
end
if expected ~= '-1' and current[1] ~= expected then
  return {'mismatch'}
end

if current[2] and current[2] ~= '0' then
  redis.call('SREM', members_key(current[2]), key)
end
forget(key)
local revision = next_revision()
emit(revision, 0, 1, 'delete', key)
return {'ok', revision}
"""

# Grant. ARGV[3] is the lease id and ARGV[4] the TTL in milliseconds. The reply is 1, or 0 when the id is taken.
GRANT = _WRITE + r"""
local lease, ttl = ARGV[3], tonumber(ARGV[4])
local now = now_ms()
sweep(now)
if redis.call('ZSCORE', LEASES, lease) then
  return 0
end
redis.call('ZADD', LEASES, int(now + ttl), lease)
redis.call('HSET', TTLS, lease, int(ttl))
return 1
"""

# Refresh. ARGV[3] is the lease id. The reply is the TTL in milliseconds, or -1 when the lease is gone.
REFRESH = _WRITE + r"""
local lease = ARGV[3]
local now = now_ms()
local deadline = redis.call('ZSCORE', LEASES, lease)
if deadline and tonumber(deadline) <= now then
  end_lease(lease)
  deadline = false
end
sweep(now)
if not deadline then
  return -1
end
local ttl = tonumber(redis.call('HGET', TTLS, lease))
redis.call('ZADD', LEASES, 'XX', int(now + ttl), lease)
return ttl
"""

# Revoke. ARGV[3] is the lease id. The reply is 1 when the lease existed, else 0.
REVOKE = _WRITE + r"""
local lease = ARGV[3]
local now = now_ms()
local existed = redis.call('ZSCORE', LEASES, lease)
if existed then
  end_lease(lease)
end
sweep(now)
if existed then
  return 1
end
return 0
"""

# Sweep. The reply is {leases ended, milliseconds until the next deadline (-1 when no lease is left)}.
SWEEP = _WRITE + r"""
local now = now_ms()
local ended = sweep(now)
local first = redis.call('ZRANGE', LEASES, 0, 0, 'WITHSCORES')
if first[2] then
  return {ended, math.max(0, tonumber(first[2]) - now)}
end
return {ended, -1}
"""

# Get. KEYS[6] is the key's hash. The reply is {value, create revision, mod revision, lease} or nil.
GET = _COMMON + r"""
local item = redis.call('HMGET', KEYS[6], 'v', 'c', 'm', 'l')
if not item[1] or not lease_alive(item[4], now_ms()) then
  return false
end
return item
"""

# List. ARGV[2] and ARGV[3] are the ZRANGEBYLEX bounds.
# The reply is {revision, then key, value, create revision, mod revision, lease for each key}.
LIST = _COMMON + r"""
local now = now_ms()
local result = {redis.call('HGET', META, 'revision') or '0'}
for _, key in ipairs(redis.call('ZRANGEBYLEX', INDEX, ARGV[2], ARGV[3])) do
  local item = redis.call('HMGET', data_key(key), 'v', 'c', 'm', 'l')
  if item[1] and lease_alive(item[4], now) then
    table.insert(result, key)
    table.insert(result, item[1])
    table.insert(result, item[2])
    table.insert(result, item[3])
    table.insert(result, item[4])
  end
end
return result
"""

# Position of the store. The reply is {revision, epoch ('' before the first write),
# id of the oldest change ('' when there is none)}.
POSITION = _COMMON + r"""
local meta = redis.call('HMGET', META, 'revision', 'epoch')
local oldest = redis.call('XRANGE', CHANGES, '-', '+', 'COUNT', 1)
local oldest_id = ''
if oldest[1] then
  oldest_id = oldest[1][1]
end
return {meta[1] or '0', meta[2] or '', oldest_id}
"""

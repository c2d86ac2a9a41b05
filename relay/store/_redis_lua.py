"""Lua scripts of the Redis store: every state change of a delivery is one atomic script.

Keys (``P`` is the configured prefix; one Redis primary, so scripts may derive keys from it):

    P:seq           counter: delivery ids in arrival order (``Job.id``, dead-letter ids)
    P:d:<seq>       hash: one delivery (token, kind, data, times, attempts, state, reason, entry)
    P:q:<token>     list: the token's open deliveries, oldest first; the first one is the token's *head*
    P:stream        stream + consumer group ``relay``: heads that are due; each instance is a consumer
    P:retry         zset: heads scheduled for a retry (score = due time)
    P:parked        zset: heads waiting for an operator or the registry (reason unroutable/config_error)
    P:pending       zset: every pending delivery (score = due time): ``next_due`` and stats
    P:inflight      zset: claimed deliveries (score = wall time of the claim or last heartbeat)
    P:dead          zset: dead letters (score = seq)
    P:dd:<key>      string with TTL: dedupe key (value = end of its window)
    P:devices, P:deadtok, P:counters   hashes
    P:apnsenv       hash: APNs device token -> environment found by a sandbox fallback
    P:cursor        XAUTOCLAIM scan position

Only a token's head is ever in the stream or a schedule, so two instances can never hold two deliveries
of one token: per-device order is a property of the data, not of a lock. An entry leaves the consumer's
pending list (``XACK``) only in the same script that records where the delivery went next (an end
state, or a schedule), so a crash at any point loses nothing.
"""

from __future__ import annotations

GROUP = "relay"

_PRELUDE = """
local P = ARGV[1]
local STREAM = P .. ':stream'
local GROUP = 'relay'
local function fmt(x) return string.format('%.17g', x) end
local function key(seq) return P .. ':d:' .. seq end
local function zset_for(reason)
  if reason == 'unroutable' or reason == 'config_error' then return P .. ':parked' end
  return P .. ':retry'
end
-- Make a token's new head claimable: into the stream when due, else onto its schedule.
local function schedule(seq, now)
  local h = key(seq)
  local at = tonumber(redis.call('HGET', h, 'next_at'))
  if at > now then
    redis.call('ZADD', zset_for(redis.call('HGET', h, 'reason')), at, seq)
    redis.call('HSET', h, 'entry', '')
  else
    redis.call('HSET', h, 'entry', redis.call('XADD', STREAM, '*', 'seq', seq))
  end
end
-- Fencing: true only while `entry` is the delivery's current entry AND consumer `me` holds it.
local function holds(seq, entry, me)
  if redis.call('HGET', key(seq), 'entry') ~= entry then return false end
  return #redis.call('XPENDING', STREAM, GROUP, entry, entry, 1, me) > 0
end
local function drop(entry)
  redis.call('XACK', STREAM, GROUP, entry)
  redis.call('XDEL', STREAM, entry)
end
"""

# ARGV: P, now, window, then per item: dedupe_key, token, kind, data, expires_at, delivery_id
ENQUEUE = _PRELUDE + """
local now, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local out, accepted = {}, 0
for i = 4, #ARGV, 6 do
  local fresh = true
  if window > 0 then
    local k = P .. ':dd:' .. ARGV[i]
    local seen = redis.call('GET', k)
    if seen and tonumber(seen) >= now then
      fresh = false
    else
      redis.call('SET', k, fmt(now + window), 'PX', math.max(1, math.ceil(window * 1000)))
    end
  end
  if fresh then
    local seq = tostring(redis.call('INCR', P .. ':seq'))
    local token = ARGV[i + 1]
    redis.call('HSET', key(seq), 'delivery_id', ARGV[i + 5], 'token', token, 'kind', ARGV[i + 2],
      'data', ARGV[i + 3], 'received_at', ARGV[2], 'expires_at', ARGV[i + 4], 'next_at', ARGV[2],
      'attempts', 0, 'state', 'pending', 'entry', '')
    redis.call('ZADD', P .. ':pending', now, seq)
    if redis.call('RPUSH', P .. ':q:' .. token, seq) == 1 then schedule(seq, now) end
    accepted = accepted + 1
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if accepted > 0 then redis.call('HINCRBY', P .. ':counters', 'accepted', accepted) end
if #out > accepted then redis.call('HINCRBY', P .. ':counters', 'duplicates', #out - accepted) end
return out
"""

# ARGV: P, me, now, limit, idle_ms, wall. Returns [seq, entry, delivery_id, token, kind, data,
# received_at, expires_at, attempts] per claimed delivery.
CLAIM = _PRELUDE + """
local me, now, limit, wall = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[6]
for _, z in ipairs({P .. ':retry', P .. ':parked'}) do
  for _, seq in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, limit)) do
    redis.call('ZREM', z, seq)
    redis.call('HSET', key(seq), 'entry', redis.call('XADD', STREAM, '*', 'seq', seq))
  end
end
local entries = {}
-- A dead consumer's entries (idle past claim_idle; live ones heartbeat theirs) become ours.
local cursor = redis.call('GET', P .. ':cursor') or '0-0'
local stolen = redis.call('XAUTOCLAIM', STREAM, GROUP, me, ARGV[5], cursor, 'COUNT', limit)
redis.call('SET', P .. ':cursor', stolen[1])
for _, e in ipairs(stolen[2]) do if e then entries[#entries + 1] = e end end
if #entries < limit then
  local fresh = redis.call('XREADGROUP', 'GROUP', GROUP, me, 'COUNT', limit - #entries, 'STREAMS', STREAM, '>')
  if fresh then for _, e in ipairs(fresh[1][2]) do entries[#entries + 1] = e end end
end
local jobs = {}
for _, e in ipairs(entries) do
  local id, seq = e[1], e[2][2]
  local h = key(seq)
  if redis.call('HGET', h, 'entry') == id then
    redis.call('HSET', h, 'state', 'inflight')
    redis.call('ZREM', P .. ':pending', seq)
    redis.call('ZADD', P .. ':inflight', wall, seq)
    local f = redis.call('HMGET', h, 'delivery_id', 'token', 'kind', 'data', 'received_at', 'expires_at', 'attempts')
    jobs[#jobs + 1] = {seq, id, f[1], f[2], f[3], f[4], f[5], f[6], f[7]}
  else
    drop(id)  -- stale entry (its delivery moved on): never deliver it
  end
end
return jobs
"""

# ARGV: P, me, seq, entry, end, reason, now, keep_seconds
FINISH = _PRELUDE + """
local me, seq, entry, done, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[7])
if not holds(seq, entry, me) then return 0 end
drop(entry)
local h = key(seq)
redis.call('HSET', h, 'state', done, 'reason', ARGV[6], 'finished_at', ARGV[7], 'entry', '')
redis.call('HINCRBY', h, 'attempts', 1)
redis.call('ZREM', P .. ':inflight', seq)
redis.call('HINCRBY', P .. ':counters', done, 1)
local q = P .. ':q:' .. redis.call('HGET', h, 'token')
if redis.call('LINDEX', q, 0) == seq then
  redis.call('LPOP', q)
  local nxt = redis.call('LINDEX', q, 0)
  if nxt then schedule(nxt, now) end
else
  redis.call('LREM', q, 1, seq)
end
if done == 'dead_letter' then
  redis.call('ZADD', P .. ':dead', tonumber(seq), seq)
else
  redis.call('HDEL', h, 'data')
  redis.call('EXPIRE', h, ARGV[8])
end
return 1
"""

# ARGV: P, me, seq, entry, at, reason, attempts_increment
RETRY = _PRELUDE + """
local me, seq, entry, at, reason = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if not holds(seq, entry, me) then return 0 end
drop(entry)
local h = key(seq)
redis.call('HSET', h, 'state', 'pending', 'next_at', at, 'reason', reason, 'entry', '')
redis.call('HINCRBY', h, 'attempts', tonumber(ARGV[7]))
redis.call('ZREM', P .. ':inflight', seq)
redis.call('ZADD', P .. ':pending', at, seq)
redis.call('ZADD', zset_for(reason), at, seq)
return 1
"""

# ARGV: P, now, all ('1' | '0'), tokens...
WAKE = _PRELUDE + """
local now, n = ARGV[2], 0
local function wake(seq)
  redis.call('ZADD', P .. ':parked', now, seq)
  redis.call('ZADD', P .. ':pending', now, seq)
  redis.call('HSET', key(seq), 'next_at', now)
  n = n + 1
end
if ARGV[3] == '1' then
  for _, seq in ipairs(redis.call('ZRANGEBYSCORE', P .. ':parked', '(' .. now, '+inf')) do wake(seq) end
else
  for i = 4, #ARGV do
    local head = redis.call('LINDEX', P .. ':q:' .. ARGV[i], 0)
    local at = head and redis.call('ZSCORE', P .. ':parked', head)
    if at and tonumber(at) > tonumber(now) then wake(head) end
  end
end
return n
"""

# ARGV: P, now, all ('1' | '0'), ids...
RETRY_DEAD = _PRELUDE + """
local now, n = tonumber(ARGV[2]), 0
local ids = {}
if ARGV[3] == '1' then ids = redis.call('ZRANGE', P .. ':dead', 0, -1) else
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
end
for _, seq in ipairs(ids) do
  if redis.call('ZREM', P .. ':dead', seq) == 1 then
    local h = key(seq)
    local f = redis.call('HMGET', h, 'received_at', 'expires_at', 'token')
    local received, expires = tonumber(f[1]), tonumber(f[2])
    -- A retried dead letter is a fresh delivery: a new lifetime, the same apns-id for tracing.
    redis.call('HSET', h, 'state', 'pending', 'next_at', ARGV[2], 'reason', 'retried',
      'expires_at', fmt(math.max(expires, now + (expires - received))))
    redis.call('HDEL', h, 'finished_at')
    redis.call('ZADD', P .. ':pending', now, seq)
    redis.call('HINCRBY', P .. ':counters', 'dead_letter', -1)
    if redis.call('RPUSH', P .. ':q:' .. f[3], seq) == 1 then schedule(seq, now) end
    n = n + 1
  end
end
return n
"""

# ARGV: P, me, wall, then pairs seq, entry. Resets the idle time of entries still ours; returns lost seqs.
HEARTBEAT = _PRELUDE + """
local me, lost = ARGV[2], {}
for i = 4, #ARGV, 2 do
  local seq, entry = ARGV[i], ARGV[i + 1]
  if holds(seq, entry, me) then
    redis.call('XCLAIM', STREAM, GROUP, me, 0, entry, 'JUSTID')
    redis.call('ZADD', P .. ':inflight', 'XX', ARGV[3], seq)
  else
    lost[#lost + 1] = seq
  end
end
return lost
"""

# ARGV: P, me, then pairs seq, entry. A clean shutdown hands its in-flight work back at once.
RELEASE = _PRELUDE + """
local me, n = ARGV[2], 0
for i = 3, #ARGV, 2 do
  local seq, entry = ARGV[i], ARGV[i + 1]
  if holds(seq, entry, me) then
    drop(entry)
    local h = key(seq)
    redis.call('HSET', h, 'state', 'pending', 'entry', redis.call('XADD', STREAM, '*', 'seq', seq))
    redis.call('ZREM', P .. ':inflight', seq)
    redis.call('ZADD', P .. ':pending', redis.call('HGET', h, 'next_at'), seq)
    n = n + 1
  end
end
if #redis.call('XPENDING', STREAM, GROUP, '-', '+', 1, me) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', STREAM, GROUP, me)
end
return n
"""

# ARGV: P, me, gc_ms. Forgets consumers (crashed instances) with nothing pending, idle for gc_ms.
REAP = _PRELUDE + """
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', STREAM, GROUP)) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] ~= ARGV[2] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', STREAM, GROUP, info['name'])
    n = n + 1
  end
end
return n
"""

"""Lua scripts of the Redis store around the queue: wake, dead letters, heartbeats, recovery and migration.

The keys and the rules (one atomic script per state change, only a token's head in a stream or schedule,
fencing by entry and consumer) are those of :mod:`relay.store._redis_lua`, whose prelude these share.
"""

from __future__ import annotations

from relay.store._redis_lua import PRELUDE

# ARGV: P, now, batch, n_reasons, reasons..., n_apps (-1 = every app), apps..., n_tokens (-1 = by schedule),
# tokens... Makes waiting heads due now (straight into their stream); returns how many.
WAKE = PRELUDE + """
local now, batch, n = tonumber(ARGV[2]), tonumber(ARGV[3]), 0
local i = 4
local reasons, want_reason = {}, {}
for j = i + 1, i + tonumber(ARGV[i]) do reasons[#reasons + 1] = ARGV[j]; want_reason[ARGV[j]] = true end
i = i + tonumber(ARGV[i]) + 1
local napps = tonumber(ARGV[i])
local list, want_app = {}, nil
if napps >= 0 then
  want_app = {}
  for j = i + 1, i + napps do list[#list + 1] = ARGV[j]; want_app[ARGV[j]] = true end
  i = i + napps + 1
else
  list = apps()
  i = i + 1
end
local function wake(seq, z, app)
  redis.call('ZREM', z, seq)
  redis.call('HSET', key(seq), 'next_at', fmt(now))
  redis.call('ZADD', P .. ':pending', now, seq)
  push(seq, app)
  n = n + 1
end
if tonumber(ARGV[i]) >= 0 then
  for j = i + 1, #ARGV do
    local head = redis.call('LINDEX', P .. ':q:' .. ARGV[j], 0)
    if head then
      local f = redis.call('HMGET', key(head), 'wait', 'app', 'state', 'entry')
      local wait, app = f[1] or 'retry', f[2] or ''
      if f[3] == 'pending' and f[4] == '' and want_reason[wait] and (not want_app or want_app[app]) then
        local z = sched(wait, app)
        local at = redis.call('ZSCORE', z, head)
        if at and tonumber(at) > now then wake(head, z, app) end
      end
    end
  end
else
  for _, reason in ipairs(reasons) do
    for _, app in ipairs(list) do
      local z = sched(reason, app)
      if n < batch then
        for _, seq in ipairs(redis.call('ZRANGEBYSCORE', z, '(' .. fmt(now), '+inf', 'LIMIT', 0, batch - n)) do
          wake(seq, z, app)
        end
      end
    end
  end
end
return n
"""

# ARGV: P, now, keep, all ('1' | '0'), ids...
RETRY_DEAD = PRELUDE + """
local now, keep, n = tonumber(ARGV[2]), tonumber(ARGV[3]), 0
local ids = {}
if ARGV[4] == '1' then ids = redis.call('ZRANGE', P .. ':dead', 0, -1) else
  for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
end
for _, seq in ipairs(ids) do
  if redis.call('ZREM', P .. ':dead', seq) == 1 then
    local h = key(seq)
    local f = redis.call('HMGET', h, 'received_at', 'expires_at', 'token', 'rid', 'mid')
    local received, expires = tonumber(f[1]), tonumber(f[2])
    -- A retried dead letter is a fresh delivery: a new lifetime, the same apns-id for tracing.
    local lifetime = math.max(expires, now + (expires - received))
    redis.call('HSET', h, 'state', 'pending', 'next_at', ARGV[2], 'reason', 'retried', 'expires_at', fmt(lifetime))
    redis.call('HDEL', h, 'finished_at', 'wait', 'stream')  -- a retried event stands alone
    redis.call('PERSIST', h)
    redis.call('ZADD', P .. ':pending', now, seq)
    redis.call('HINCRBY', P .. ':counters', 'dead_letter', -1)
    trace(seq, f[4], f[5], keep + lifetime - now)
    if redis.call('RPUSH', P .. ':q:' .. f[3], seq) == 1 then schedule(seq, now) end
    n = n + 1
  end
end
return n
"""

# ARGV: P, me, wall, then pairs seq, entry. Resets the idle time of entries still ours; returns lost seqs.
HEARTBEAT = PRELUDE + """
local me, lost = ARGV[2], {}
for i = 4, #ARGV, 2 do
  local seq, entry = ARGV[i], ARGV[i + 1]
  local app = held(seq, entry, me)
  if app then
    redis.call('XCLAIM', stream(app), GROUP, me, 0, entry, 'JUSTID')
    redis.call('ZADD', P .. ':inflight', 'XX', ARGV[3], seq)
  else
    lost[#lost + 1] = seq
  end
end
return lost
"""

# Put a claimed delivery back into its stream (a new entry: the old holder's late record is fenced off).
_GIVE_BACK = """
local function give_back(seq, app, entry)
  drop(app, entry)
  redis.call('ZREM', leases(app), seq)
  local h = key(seq)
  redis.call('HSET', h, 'state', 'pending')
  push(seq, app)
  redis.call('ZREM', P .. ':inflight', seq)
  redis.call('ZADD', P .. ':pending', redis.call('HGET', h, 'next_at'), seq)
end
"""

# ARGV: P, me, then pairs seq, entry. A clean shutdown hands its in-flight work back at once.
RELEASE = PRELUDE + _GIVE_BACK + """
local me, n = ARGV[2], 0
for i = 3, #ARGV, 2 do
  local seq, entry = ARGV[i], ARGV[i + 1]
  local app = held(seq, entry, me)
  if app then
    give_back(seq, app, entry)
    n = n + 1
  end
end
for _, app in ipairs(apps()) do
  local ok, mine = pcall(redis.call, 'XPENDING', stream(app), GROUP, '-', '+', 1, me)
  if ok and #mine == 0 then redis.pcall('XGROUP', 'DELCONSUMER', stream(app), GROUP, me) end
end
return n
"""

# ARGV: P, me, idle_ms, app, cursor, count. One step of recovery in one app's stream: entries whose holder
# stopped renewing them for claim_idle (a process that is gone) go back into the stream. Returns
# [next cursor, how many].
RECOVER = PRELUDE + _GIVE_BACK + """
local me, app = ARGV[2], ARGV[4]
local r = redis.call('XAUTOCLAIM', stream(app), GROUP, me, ARGV[3], ARGV[5], 'COUNT', ARGV[6])
local n = 0
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local id, seq = e[1], e[2][2]
    if redis.call('HGET', key(seq), 'entry') == id then
      give_back(seq, app, id)
      n = n + 1
    else
      drop(app, id)
    end
  end
end
if n > 0 then redis.call('HINCRBY', P .. ':counters', 'redelivered', n) end
return {r[1], n}
"""

# ARGV: P, now, app, batch. Claims of one app past their lease (by the callers' clock: a holder that hung or
# vanished, on any host) go back into the stream; returns how many.
LAPSED = PRELUDE + _GIVE_BACK + """
local app, n = ARGV[3], 0
local lz = leases(app)
for _, seq in ipairs(redis.call('ZRANGEBYSCORE', lz, '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))) do
  local entry = redis.call('HGET', key(seq), 'entry')
  if entry and entry ~= '' then
    give_back(seq, app, entry)
    n = n + 1
  else
    redis.call('ZREM', lz, seq)
  end
end
if n > 0 then redis.call('HINCRBY', P .. ':counters', 'redelivered', n) end
return n
"""

# ARGV: P, me, gc_ms. Forgets consumers (gone processes) with nothing pending, idle for gc_ms.
REAP = PRELUDE + """
local n = 0
for _, app in ipairs(apps()) do
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', stream(app), GROUP)
  if ok then
    for _, c in ipairs(consumers) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      if info['name'] ~= ARGV[2] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[3]) then
        redis.call('XGROUP', 'DELCONSUMER', stream(app), GROUP, info['name'])
        n = n + 1
      end
    end
  end
end
return n
"""

# ARGV: P, batch. The one-stream layout (P:stream for every app, P:retry and P:parked with free-text
# reasons) to this one: its stream is the hint-less stream, its schedules move to the typed ones. Returns
# how many schedule members it moved (0 when nothing is left to migrate).
MIGRATE = PRELUDE + """
if redis.call('EXISTS', P .. ':stream') == 1 and redis.call('SADD', P .. ':apps', '') == 1 then
  redis.pcall('XGROUP', 'CREATE', P .. ':stream', GROUP, '0', 'MKSTREAM')
end
local typed = {}
for _, reason in ipairs(REASONS) do typed[reason] = true end
local n = 0
for _, z in ipairs({P .. ':retry', P .. ':parked'}) do
  local flat = redis.call('ZRANGE', z, 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
  for j = 1, #flat, 2 do
    local seq, at = flat[j], flat[j + 1]
    local h = key(seq)
    local f = redis.call('HMGET', h, 'reason', 'app')
    local wait = 'retry'
    if f[1] and typed[f[1]] then wait = f[1] end
    redis.call('HSET', h, 'wait', wait)
    park(seq, wait, f[2] or '', at)
    redis.call('ZREM', z, seq)
    n = n + 1
  end
end
return n
"""

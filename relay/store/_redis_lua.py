"""Lua scripts of the Redis store's queue: every state change of a delivery is one atomic script.

Keys (``P`` is the configured prefix; one Redis primary, so scripts may derive keys from it; ``[:app]`` is
``:<app>`` for a delivery with an app hint and nothing for one without):

    P:seq                 counter: delivery ids in arrival order (``Job.id``, dead-letter ids)
    P:d:<seq>             hash: one delivery (token, kind, data, app, rid, mid, times, attempts, state,
                          wait, reason, entry, owner); a finished one expires ``keep_finished`` after its end
    P:q:<token>           list: the token's open deliveries, oldest first; the first one is the token's *head*
    P:apps                set: app hints seen ("" = none); each has a stream with the consumer group ``relay``
    P:stream[:app]        stream: the app's heads that are due; each delivering process is a consumer
    P:cursor[:app]        XAUTOCLAIM scan position in that stream
    P:wait:<reason>[:app] zset: the app's heads waiting for a typed reason (score = due time)
    P:pending             zset: every pending delivery (score = due time): ``next_due`` and stats
    P:inflight            zset: claimed deliveries (score = wall time of the claim or last heartbeat)
    P:lease[:app]         zset: the app's claimed deliveries (score = end of the claim's lease, callers' clock)
    P:dead                zset: dead letters (score = seq)
    P:t:<token>           list: the token's recently finished seqs, newest first (its open ones: P:q), capped, TTL
    P:r:<request id>, P:m:<message id>   zsets: recent seqs of a webhook / a message, capped, with a TTL
    P:dd:<key>            string with TTL: dedupe key (value = end of its window)
    P:es:<stream>         hash with TTL: an event stream's last event (fp, until = end of its resend window,
                          last = its seq); kept until that event has ended (see relay.store._sqlite_events)
    P:counters            hash: end-state counters
    P:devices, P:deadtok, P:apnsenv, P:device:epoch, P:device:changes   see :mod:`relay.store._redis_devices`

Only a token's head is ever in a stream or a schedule, so two instances can never hold two deliveries of
one token: per-device order is a property of the data, not of a lock. An entry leaves the consumer's
pending list (``XACK``) only in the same script that records where the delivery went next (an end state,
or a schedule), so a crash at any point loses nothing. One stream per app lets a claim skip an app that is
at its limit without reading (and so holding) any of its entries.
"""

from __future__ import annotations

from relay.outcome import WaitReason

GROUP = "relay"
TOKEN_CAP = 100  # recent deliveries kept in a token's index
TRACE_CAP = 1000  # recent deliveries kept in a request id's or message id's index

PRELUDE = f"""
local P = ARGV[1]
local GROUP = '{GROUP}'
local REASONS = {{{", ".join(repr(reason.value) for reason in WaitReason)}}}
local function fmt(x) return string.format('%.17g', x) end
local function key(seq) return P .. ':d:' .. seq end
local function sfx(app) if not app or app == '' then return '' end return ':' .. app end
local function stream(app) return P .. ':stream' .. sfx(app) end
local function sched(reason, app) return P .. ':wait:' .. reason .. sfx(app) end
local function leases(app) return P .. ':lease' .. sfx(app) end
-- The apps with a stream (P:apps, "" = no hint), sorted so that every claim visits them in one order.
local function apps()
  local list = redis.call('SMEMBERS', P .. ':apps')
  table.sort(list)
  return list
end
-- Claims look at the apps in P:apps: an app's stream and group are made when it is first used.
local seen = {{}}
local function known(app)
  if seen[app] then return end
  seen[app] = true
  if redis.call('SADD', P .. ':apps', app) == 1 then
    redis.pcall('XGROUP', 'CREATE', stream(app), GROUP, '0', 'MKSTREAM')
  end
end
-- A new entry for a delivery in its app's stream; returns the entry id.
local function append(seq, app)
  known(app)
  return redis.call('XADD', stream(app), '*', 'seq', seq)
end
-- Make a delivery claimable now.
local function push(seq, app)
  redis.call('HSET', key(seq), 'entry', append(seq, app))
end
-- Wait on the schedule of its reason and app until `at`.
local function park(seq, reason, app, at)
  known(app)
  redis.call('ZADD', sched(reason, app), at, seq)
  redis.call('HSET', key(seq), 'entry', '')
end
-- Make a token's new head claimable: into its app's stream when due, else onto its reason's schedule.
local function schedule(seq, now)
  local f = redis.call('HMGET', key(seq), 'next_at', 'app', 'wait')
  if tonumber(f[1]) > now then
    park(seq, f[3] or 'retry', f[2] or '', f[1])
  else
    push(seq, f[2] or '')
  end
end
-- Fencing: the delivery's current entry is `entry` and consumer `me` holds it (every change of holder, a
-- claim or a takeover, is made by these scripts, which record it as `owner`). Returns the app, or nil.
local function held(seq, entry, me)
  local f = redis.call('HMGET', key(seq), 'entry', 'owner', 'app')
  if f[1] ~= entry or f[2] ~= me then return nil end
  return f[3] or ''
end
local function drop(app, entry)
  redis.call('XACK', stream(app), GROUP, entry)
  redis.call('XDEL', stream(app), entry)
end
-- Tracing indexes: capped zsets of recent seqs that live at least `ttl` seconds more.
local function index(k, seq, cap, ttl)
  ttl = math.ceil(ttl)
  if redis.call('ZADD', k, seq, seq) == 1 and redis.call('ZCARD', k) > cap then
    redis.call('ZREMRANGEBYRANK', k, 0, -(cap + 1))
  end
  if redis.call('TTL', k) < ttl then redis.call('EXPIRE', k, ttl) end
end
-- At acceptance: the request and message ids (a token's open deliveries are found in its queue P:q).
local function trace(seq, rid, mid, ttl)
  if rid and rid ~= '' then index(P .. ':r:' .. rid, seq, {TRACE_CAP}, ttl) end
  if mid and mid ~= '' then index(P .. ':m:' .. mid, seq, {TRACE_CAP}, ttl) end
end
-- At an end: into the token's list of finished deliveries (a token's end in order: the newest is first);
-- every index outlives the record.
local function linger(seq, token, rid, mid, keep)
  local t = P .. ':t:' .. token
  if redis.call('LPUSH', t, seq) > {TOKEN_CAP} then redis.call('LTRIM', t, 0, {TOKEN_CAP} - 1) end
  if redis.call('TTL', t) < keep then redis.call('EXPIRE', t, math.ceil(keep)) end
  for _, k in ipairs({{rid and rid ~= '' and P .. ':r:' .. rid, mid and mid ~= '' and P .. ':m:' .. mid}}) do
    if k and redis.call('TTL', k) < keep then index(k, seq, {TRACE_CAP}, keep) end
  end
end
-- An ended delivery leaves its token's queue (the next one, if it was the head, is scheduled) and lingers.
local function leave(seq, token, rid, mid, now, keep)
  local q = P .. ':q:' .. token
  if redis.call('LINDEX', q, 0) == seq then
    redis.call('LPOP', q)
    local nxt = redis.call('LINDEX', q, 0)
    if nxt then schedule(nxt, now) end
  else
    redis.call('LREM', q, 1, seq)
  end
  linger(seq, token, rid, mid, keep)
end
-- End a queued (pending) delivery unsent, as `done`: out of its stream or schedule and its token's queue
-- (whose next delivery becomes the head). Returns {{seq, token, app, rid, received_at, attempts}}, or nil.
local function retire(seq, done, why, now, keep)
  local h = key(seq)
  local f = redis.call('HMGET', h, 'state', 'entry', 'app', 'token', 'rid', 'mid', 'received_at', 'attempts')
  if f[1] ~= 'pending' then return nil end
  local app = f[3] or ''
  if f[2] and f[2] ~= '' then drop(app, f[2]) end
  for _, reason in ipairs(REASONS) do redis.call('ZREM', sched(reason, app), seq) end
  redis.call('ZREM', P .. ':pending', seq)
  redis.call('HSET', h, 'state', done, 'reason', why, 'finished_at', fmt(now), 'entry', '')
  redis.call('HDEL', h, 'wait', 'data')
  redis.call('EXPIRE', h, math.max(1, math.ceil(keep)))
  redis.call('HINCRBY', P .. ':counters', done, 1)
  leave(seq, f[4], f[5], f[6], now, keep)
  return {{seq, f[4], f[3] or '', f[5] or '', f[7], f[8]}}
end
local SUPERSEDED = 'superseded'
local SUPERSEDED_WHY = 'superseded by a later event for this token and agent'
"""

# ARGV: P, now, window, keep, then per item: dedupe_key, token, kind, data, expires_at, delivery_id, app,
# request_id, message_id ("" = none for the last three), stream key, fingerprint, event window ("" for a message).
# Returns {flags (1 accepted, 0 duplicate), superseded deliveries (see retire)}.
ENQUEUE = PRELUDE + """
local now, window, keep = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out, gone, accepted = {}, {}, 0
for i = 5, #ARGV, 12 do
  local fresh = true
  local sk = ARGV[i + 9]
  local es = P .. ':es:' .. sk
  if sk ~= '' then
    -- An event: a resend only when it repeats its stream's last event within that event's window.
    local last = redis.call('HMGET', es, 'fp', 'until', 'last')
    if last[1] == ARGV[i + 10] and tonumber(last[2]) > now then
      fresh = false
    elseif last[3] then
      local ended = retire(last[3], SUPERSEDED, SUPERSEDED_WHY, now, keep)
      if ended then gone[#gone + 1] = ended end
    end
  elseif window > 0 then
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
    local token, app, rid, mid = ARGV[i + 1], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8]
    local entry = ''  -- a token's first open delivery is its head: claimable at once
    if redis.call('RPUSH', P .. ':q:' .. token, seq) == 1 then entry = append(seq, app) end
    local fields = {'delivery_id', ARGV[i + 5], 'token', token, 'kind', ARGV[i + 2], 'data', ARGV[i + 3],
      'received_at', ARGV[2], 'expires_at', ARGV[i + 4], 'next_at', ARGV[2], 'attempts', 0, 'state', 'pending',
      'entry', entry}
    if app ~= '' then fields[#fields + 1] = 'app'; fields[#fields + 1] = app end
    if rid ~= '' then fields[#fields + 1] = 'rid'; fields[#fields + 1] = rid end
    if mid ~= '' then fields[#fields + 1] = 'mid'; fields[#fields + 1] = mid end
    if sk ~= '' then fields[#fields + 1] = 'stream'; fields[#fields + 1] = sk end
    redis.call('HSET', key(seq), unpack(fields))
    trace(seq, rid, mid, keep + math.max(0, tonumber(ARGV[i + 4]) - now))
    redis.call('ZADD', P .. ':pending', now, seq)
    if sk ~= '' then
      -- The stream lives until its last event has surely ended (a retry checks it), at least its window.
      local ew = tonumber(ARGV[i + 11])
      redis.call('HSET', es, 'fp', ARGV[i + 10], 'until', fmt(now + ew), 'last', seq)
      local life = math.max(ew, tonumber(ARGV[i + 4]) - now) + 60
      redis.call('PEXPIRE', es, math.max(1, math.ceil(life * 1000)))
    end
    accepted = accepted + 1
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if accepted > 0 then redis.call('HINCRBY', P .. ':counters', 'accepted', accepted) end
if #out > accepted then redis.call('HINCRBY', P .. ':counters', 'duplicates', #out - accepted) end
return {out, gone}
"""

# ARGV: P, me, now, limit, idle_ms, wall, lease, then pairs app, cap. Returns [seq, entry, delivery_id, token, kind,
# data, received_at, expires_at, attempts, app, rid, mid] per claimed delivery.
#
# Each app's stream (whose app is not at its cap) gets a fair share of the limit per pass; a stream that
# filled its share may get more of what the others left in the next pass. A capped app's stream, schedules
# and stalled entries are not touched at all.
CLAIM = PRELUDE + """
local me, now, limit, idle, wall = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local lease_end = now + tonumber(ARGV[7])
local caps = {}
for i = 8, #ARGV, 2 do caps[ARGV[i]] = tonumber(ARGV[i + 1]) end
local active = {}
for _, app in ipairs(apps()) do
  local left = math.min(caps[app] or limit, limit)
  if app == '' then left = limit end
  if left > 0 then active[#active + 1] = {app = app, left = left} end
end
local jobs, stolen, remaining, first = {}, 0, limit, true
-- One read entry: a job when it is still its delivery's current entry, else a stale entry to drop.
local function take(app, e, from_dead)
  local id, seq = e[1], e[2][2]
  local h = key(seq)
  local f = redis.call('HMGET', h, 'entry', 'delivery_id', 'token', 'kind', 'data', 'received_at', 'expires_at',
    'attempts', 'app', 'rid', 'mid')
  if f[1] ~= id then
    drop(app, id)
    return 0
  end
  redis.call('HSET', h, 'state', 'inflight', 'owner', me)
  redis.call('ZREM', P .. ':pending', seq)
  redis.call('ZADD', P .. ':inflight', wall, seq)
  redis.call('ZADD', leases(app), lease_end, seq)
  jobs[#jobs + 1] = {seq, id, f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11]}
  if from_dead then stolen = stolen + 1 end
  return 1
end
while remaining > 0 and #active > 0 do
  local share, again = math.max(1, math.floor(remaining / #active)), {}
  for _, s in ipairs(active) do
    local want = math.min(share, s.left, remaining)
    if want > 0 then
      local st, got = stream(s.app), 0
      if first then
        -- Due schedules into the stream (never more than this claim could take of the app).
        for _, reason in ipairs(REASONS) do
          local z = sched(reason, s.app)
          for _, seq in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, want)) do
            redis.call('ZREM', z, seq)
            push(seq, s.app)
          end
        end
        -- A claim past its lease (its holder hung or gone, by the callers' clock) becomes ours ...
        local lz = leases(s.app)
        for _, seq in ipairs(redis.call('ZRANGEBYSCORE', lz, '-inf', '(' .. fmt(now), 'LIMIT', 0, want)) do
          redis.call('ZREM', lz, seq)
          local entry = redis.call('HGET', key(seq), 'entry')
          if entry and entry ~= '' then
            local e = redis.call('XCLAIM', st, GROUP, me, 0, entry)[1]
            if e and e[2] then got = got + take(s.app, e, true) end
          end
        end
        -- ... and so do a dead consumer's entries (idle past claim_idle; live ones heartbeat theirs).
        if got < want then
          local ck = P .. ':cursor' .. sfx(s.app)
          local cursor = redis.call('GET', ck) or '0-0'
          local r = redis.call('XAUTOCLAIM', st, GROUP, me, idle, cursor, 'COUNT', want - got)
          if r[1] ~= cursor then redis.call('SET', ck, r[1]) end
          for _, e in ipairs(r[2]) do if e and e[2] then got = got + take(s.app, e, true) end end
        end
      end
      local full = got >= want
      if not full then
        local asked = want - got
        local fresh = redis.call('XREADGROUP', 'GROUP', GROUP, me, 'COUNT', asked, 'STREAMS', st, '>')
        local entries = fresh and fresh[1][2] or {}
        full = #entries == asked  -- the stream may hold more for a later pass
        for _, e in ipairs(entries) do got = got + take(s.app, e, false) end
      end
      s.left = s.left - got
      if full and s.left > 0 then again[#again + 1] = s end
      remaining = remaining - got
    end
  end
  active, first = again, false
end
if stolen > 0 then redis.call('HINCRBY', P .. ':counters', 'redelivered', stolen) end
return jobs
"""

# ARGV: P, me, seq, entry, end, reason, now, keep_seconds
FINISH = PRELUDE + """
local me, seq, entry, done, now, keep = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[7]), tonumber(ARGV[8])
local h = key(seq)
local f = redis.call('HMGET', h, 'entry', 'owner', 'app', 'token', 'rid', 'mid', 'attempts')
if f[1] ~= entry or f[2] ~= me then return 0 end
local app = f[3] or ''
drop(app, entry)
redis.call('ZREM', leases(app), seq)
redis.call('ZREM', P .. ':inflight', seq)
redis.call('HSET', h, 'state', done, 'reason', ARGV[6], 'finished_at', ARGV[7], 'entry', '',
  'attempts', tonumber(f[7]) + 1)
redis.call('HINCRBY', P .. ':counters', done, 1)
leave(seq, f[4], f[5], f[6], now, keep)
if done == 'dead_letter' then
  redis.call('ZADD', P .. ':dead', tonumber(seq), seq)
  redis.call('HDEL', h, 'wait')
else
  redis.call('HDEL', h, 'wait', 'data')
  redis.call('EXPIRE', h, math.max(1, math.ceil(keep)))
end
return 1
"""

# ARGV: P, me, seq, entry, at, wait reason, detail, attempts increment, app given ('1' | '0'), app, now, keep.
# Returns 1 (waits), 2 (ended superseded: a later event of its stream came while it was in flight), 0 (not ours).
RETRY = PRELUDE + """
local me, seq, entry, at, wait = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local app = held(seq, entry, me)
if not app then return 0 end
local h = key(seq)
drop(app, entry)
redis.call('ZREM', leases(app), seq)
if ARGV[9] == '1' then
  app = ARGV[10]
  if app == '' then redis.call('HDEL', h, 'app') else redis.call('HSET', h, 'app', app) end
end
redis.call('HSET', h, 'state', 'pending', 'next_at', at, 'wait', wait, 'reason', ARGV[7])
redis.call('HINCRBY', h, 'attempts', tonumber(ARGV[8]))
redis.call('ZREM', P .. ':inflight', seq)
redis.call('ZADD', P .. ':pending', at, seq)
local sk = redis.call('HGET', h, 'stream')
if sk then
  local last = redis.call('HGET', P .. ':es:' .. sk, 'last')
  if last and tonumber(last) > tonumber(seq) then
    redis.call('HSET', h, 'entry', '')
    retire(seq, SUPERSEDED, SUPERSEDED_WHY, tonumber(ARGV[11]), tonumber(ARGV[12]))
    return 2
  end
end
park(seq, wait, app, at)
return 1
"""

"""The Redis backend's Lua scripts: each one read-check-write step runs atomically on the server.

Why scripts: N workers race for the same session, requestId and bucket; a script is one atomic step, so
no check can be overtaken by another worker between reading and writing. Time comes from the server's
`TIME` (one clock for the whole fleet). Every key a script writes gets a TTL.

Bounds (`max_sessions`, `dedupe_max_entries`, `dedupe_max_bytes`) hold per project for the whole fleet:
each project has a sorted-set index (sessions by last use, answered requestIds by answer time), trimmed
oldest first inside the script that adds to it, so a bound costs no extra round trip and no worker can
see it exceeded. Only answered requestIds enter the index: a running claim is never evicted.
"""

from __future__ import annotations

# A session lock is a FIFO queue of tokens (a Redis list); its head holds the turn. Each token has an
# "alive" key `{queue}:a:{token}` whose lease its worker renews; a head whose alive key expired (its
# worker died) is popped by whoever looks next, so a crash never blocks a session for good. A waiter
# blocks on its own wake key `{queue}:w:{token}` (BLPOP, bounded), pushed when it becomes the head.
_HEAD = """
local function wake(q, lease_ms)
  local head = redis.call('LINDEX', q, 0)
  if head then
    redis.call('RPUSH', q .. ':w:' .. head, '1')
    redis.call('PEXPIRE', q .. ':w:' .. head, lease_ms)
  end
end
local function head_is(q, token, lease_ms)
  local purged = false
  for _ = 1, 64 do
    local head = redis.call('LINDEX', q, 0)
    if not head then return -1 end
    if head == token then return 1 end
    if redis.call('EXISTS', q .. ':a:' .. head) == 1 then
      if purged then wake(q, lease_ms) end
      if redis.call('LPOS', q, token) then return 0 end
      return -1
    end
    redis.call('LPOP', q)
    purged = true
  end
  return 0
end
"""

LOCK_ENTER = (
    _HEAD
    + """
-- KEYS[1] queue; ARGV token, lease_ms, idle_ms -> 1 holder, 0 waiting
redis.call('SET', KEYS[1] .. ':a:' .. ARGV[1], ARGV[1], 'PX', ARGV[2])
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return head_is(KEYS[1], ARGV[1], ARGV[2])
"""
)

LOCK_TRY = (
    _HEAD
    + """
-- KEYS[1] queue; ARGV token, lease_ms -> 1 holder, 0 waiting, -1 lost (our lease lapsed: enter again)
return head_is(KEYS[1], ARGV[1], ARGV[2])
"""
)

LOCK_LEAVE = (
    _HEAD
    + """
-- KEYS[1] queue; ARGV token, lease_ms: leave, and wake the next in line
local was_head = redis.call('LINDEX', KEYS[1], 0) == ARGV[1]
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('DEL', KEYS[1] .. ':a:' .. ARGV[1], KEYS[1] .. ':w:' .. ARGV[1])
if was_head then wake(KEYS[1], ARGV[2]) end
return 1
"""
)

# Leases this worker holds (alive keys, requestId claims): renewed only while they still hold our value.
RENEW = """
-- KEYS lease keys; ARGV[1] lease_ms, ARGV[1 + i] the value KEYS[i] must hold
-- -> {how many were lost, server seconds, server microseconds} (the worker tracks the server's clock)
local lost = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
  else
    lost = lost + 1
  end
end
local t = redis.call('TIME')
return {lost, t[1], t[2]}
"""

_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Turns are list items "<tokens>\\n<json [user, assistant, requestId]>"; history is trimmed by tokens (newest
# kept), as in memory. A turn is recorded at most once per requestId (`{session}/ids`: the requestIds
# recorded, newest kept), only while the writer still holds the session's turn (its lock token at the
# queue's head, its alive key not lapsed: a resumed paused worker is fenced out), and only before the
# attempt's deadline on the server's clock (a write that timed out on the worker's side and runs late,
# after a stall, cannot land once the worker told its client the turn failed). The session then becomes
# the newest in its project's index; the least recently used beyond max_sessions are deleted, except one
# whose lock queue exists (its turn is running: the cap is soft then, as in memory).
APPEND = (
    _NOW_MS
    + """
-- KEYS[1] turns, KEYS[2] system prompt, KEYS[3] the project's session index (session key -> last use ms),
-- KEYS[4] the session's lock queue, KEYS[5] the session's recorded requestIds (zset: id -> ms)
-- ARGV item, max_tokens, ttl_ms, has_prompt, prompt, max_turns, session key, max_sessions, fence token
-- ('' = none), requestId, deadline server ms (0 = none)
-- -> kept turns (recorded) | -1 recorded before | -2 fenced out (lock lost) | -3 deadline passed
local now = now_ms()
if redis.call('ZSCORE', KEYS[5], ARGV[10]) then return -1 end
if ARGV[9] ~= '' then
  if redis.call('LINDEX', KEYS[4], 0) ~= ARGV[9] or redis.call('EXISTS', KEYS[4] .. ':a:' .. ARGV[9]) == 0 then
    return -2
  end
end
if tonumber(ARGV[11]) > 0 and now > tonumber(ARGV[11]) then return -3 end
redis.call('ZADD', KEYS[5], now, ARGV[10])
redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -(2 * tonumber(ARGV[6]) + 1))
redis.call('PEXPIRE', KEYS[5], ARGV[3])
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[6]), -1)
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local total, keep = 0, 0
for i = #items, 1, -1 do
  total = total + (tonumber(string.match(items[i], '^(%d+)\\n')) or 0)
  if total > tonumber(ARGV[2]) then break end
  keep = keep + 1
end
if keep == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('LTRIM', KEYS[1], -keep, -1)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[3])
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local idx = KEYS[3]
redis.call('ZREMRANGEBYSCORE', idx, '-inf', now - tonumber(ARGV[3]))  -- idle past their TTL: gone already
redis.call('ZADD', idx, now, ARGV[7])
local skipped = 0
while redis.call('ZCARD', idx) - skipped > tonumber(ARGV[8]) do
  local s = redis.call('ZRANGE', idx, skipped, skipped)[1]
  if not s then break end
  if redis.call('EXISTS', s .. '/q') == 1 then
    skipped = skipped + 1
  else
    redis.call('DEL', s .. '/t', s .. '/p', s .. '/ids')
    redis.call('ZREM', idx, s)
  end
end
redis.call('PEXPIRE', idx, ARGV[3])
return keep
"""
)

# A requestId key holds "c:<token>" while claimed (leased) and "d:<token>|<final reply>" once answered (the
# token says whose answer it is, so a retried COMPLETE recognises its own; finals are JSON, tokens hold no
# "|"; a value without a token, "d:{...", is read as the final alone).
CLAIM = """
-- KEYS[1] request key; ARGV token, lease_ms -> {'new'} | {'in_flight'} | {'done', final}
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return {'new'}
end
if string.sub(v, 1, 2) == 'd:' then
  local bar = string.find(v, '|', 3, true)
  if string.sub(v, 3, 3) == '{' or not bar then return {'done', string.sub(v, 3)} end
  return {'done', string.sub(v, bar + 1)}
end
return {'in_flight'}
"""

# An answer enters its project's index (request key -> answer ms) with its size (a hash, and their
# total); then the oldest answered entries go while over max_entries or max_bytes (an answer larger than
# max_bytes alone is not cached). A key is deleted only if it still holds an answer ("d:"), so even a
# stale index entry can never remove a running claim.
COMPLETE = (
    _NOW_MS
    + """
-- KEYS[1] request key, KEYS[2] index (zset), KEYS[3] sizes (hash: request key -> bytes), KEYS[4] their total
-- ARGV token, final, window_ms, max_entries, max_bytes -> 1 cached, 0 another worker holds it now
local v = redis.call('GET', KEYS[1])
local value, window = 'd:' .. ARGV[1] .. '|' .. ARGV[2], tonumber(ARGV[3])
if v == value then return 1 end  -- cached by an earlier attempt of ours (its reply was lost)
if v and v ~= 'c:' .. ARGV[1] then return 0 end
local size = string.len(KEYS[1]) + string.len(value)
local idx, sizes, now = KEYS[2], KEYS[3], now_ms()
local total = tonumber(redis.call('GET', KEYS[4])) or 0
local function forget(m)
  total = total - (tonumber(redis.call('HGET', sizes, m)) or 0)
  redis.call('HDEL', sizes, m)
  redis.call('ZREM', idx, m)
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', idx, '-inf', now - window, 'LIMIT', 0, 1000)) do
  forget(m)  -- past the window: the key itself expired already
end
forget(KEYS[1])  -- answered again after it lapsed: counted once
if size > tonumber(ARGV[5]) then
  redis.call('DEL', KEYS[1])  -- larger than the whole bound: not cached (it would push out every other)
else
  redis.call('SET', KEYS[1], value, 'PX', window)
  redis.call('ZADD', idx, now, KEYS[1])
  redis.call('HSET', sizes, KEYS[1], size)
  total = total + size
end
while total > tonumber(ARGV[5]) or redis.call('ZCARD', idx) > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', idx, 0, 0)[1]
  if not oldest then break end
  forget(oldest)
  local held = redis.call('GET', oldest)
  if held and string.sub(held, 1, 2) == 'd:' then redis.call('DEL', oldest) end
end
if redis.call('ZCARD', idx) == 0 or total < 0 then total = 0 end
redis.call('SET', KEYS[4], total, 'PX', window)
redis.call('PEXPIRE', idx, window)
redis.call('PEXPIRE', sizes, window)
return 1
"""
)

ABANDON = """
-- KEYS[1] request key; ARGV token -> 1 given back (or nobody holds it), 0 another worker holds or answered it
local v = redis.call('GET', KEYS[1])
if v == 'c:' .. ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
if v then return 0 end
return 1
"""

# The UTC day of a time on the server's clock, `YYYY-MM-DD` (days from civil, H. Hinnant): usage counters and
# daily quotas turn over at the server's midnight, whatever the workers' clocks say.
_UTC_DAY = """
local function utc_day(secs)
  local z = math.floor(secs / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02d', y, m, d)
end
local function counted_as(clients, client, max_clients)
  if client == '*' or redis.call('SISMEMBER', clients, client) == 1 then return client end
  if redis.call('SCARD', clients) >= max_clients then return '(other)' end
  return client
end
"""

# Quotas, then token buckets: every quota and bucket is checked before any bucket is spent (a refused
# request takes nothing). A quota reads today's counters of its client (or `*`, the project's own).
TAKE = (
    _UTC_DAY
    + """
-- KEYS buckets; ARGV[1] key prefix, ARGV[2] max clients per day, ARGV[3] number of quotas q, then per quota
-- project, client, token limit, request limit (-1: none); then rate_per_s, burst per bucket
-- -> {0} taken, {1, retry ms} rate limited, {2, ms to the server's midnight, quota number} quota used up
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ns, max_clients, q = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local day = utc_day(math.floor(now))
for i = 1, q do
  local o = 4 + (i - 1) * 4
  local base = ns .. ARGV[o] .. '/u/' .. day
  local who = counted_as(base .. '/clients', ARGV[o + 1], max_clients)
  local c = redis.call('HMGET', base .. '/c/' .. who, 'prompt_tokens', 'completion_tokens', 'requests')
  local tokens = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0)
  local tlim, rlim = tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
  if (tlim >= 0 and tokens >= tlim) or (rlim >= 0 and (tonumber(c[3]) or 0) >= rlim) then
    return {2, math.ceil((86400 - now % 86400) * 1000), i}
  end
end
local first = 4 + q * 4
local levels = {}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[first + 2 * i - 2]), tonumber(ARGV[first + 2 * i - 1])
  local b = redis.call('HMGET', key, 'tokens', 'stamp')
  local level = burst
  if b[1] and b[2] then level = math.min(burst, tonumber(b[1]) + (now - tonumber(b[2])) * rate) end
  if level < 1 then return {1, math.ceil((1 - level) / rate * 1000)} end
  levels[i] = level
end
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[first + 2 * i - 2]), tonumber(ARGV[first + 2 * i - 1])
  redis.call('HSET', key, 'tokens', tostring(levels[i] - 1), 'stamp', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
end
return {0}
"""
)

# Usage counters: a batch of finished requests, each counted for its day (the server's day of "now minus its
# age") and the running total, under its client (or `(other)` past max clients) and `*` (the project's own).
# A worker's batches carry consecutive sequence numbers; one already applied (a retry after a timeout whose
# first attempt landed) is skipped, so every count is applied exactly once.
USAGE_ADD = (
    _UTC_DAY
    + """
-- ARGV: key prefix, worker incarnation, last seq of the batch, retention ms, max clients, n, then per entry
-- project, client, age ms, requests, prompt_tokens, completion_tokens, cached_tokens, errors, refused
-- -> entries applied
local ns, last = ARGV[1], tonumber(ARGV[3])
local retention, max_clients, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local fields = {'requests', 'prompt_tokens', 'completion_tokens', 'cached_tokens', 'errors', 'refused'}
local seqkey = ns .. 'u/seq/' .. ARGV[2]
local hwm = tonumber(redis.call('GET', seqkey) or '-1')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local applied = 0
for i = 0, n - 1 do
  if last - n + 1 + i > hwm then
    local o = 7 + i * 9
    local day = utc_day(math.floor((now - tonumber(ARGV[o + 2])) / 1000))
    for _, scope in ipairs({day, 'total'}) do
      local base = ns .. ARGV[o] .. '/u/' .. scope
      local who = counted_as(base .. '/clients', ARGV[o + 1], max_clients)
      if who ~= '(other)' then redis.call('SADD', base .. '/clients', who) end
      redis.call('PEXPIRE', base .. '/clients', retention)
      for _, key in ipairs({who, '*'}) do
        local h = base .. '/c/' .. key
        for f = 1, 6 do
          local v = tonumber(ARGV[o + 2 + f])
          if v ~= 0 then redis.call('HINCRBY', h, fields[f], v) end
        end
        redis.call('HINCRBY', h, 'requests', 0)
        redis.call('PEXPIRE', h, retention)
      end
    end
    applied = applied + 1
  end
end
redis.call('SET', seqkey, tostring(math.max(hwm, last)), 'PX', retention)
return applied
"""
)

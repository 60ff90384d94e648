"""The Redis backend's Lua scripts: each one read-check-write step runs atomically on the server.

Why scripts: N workers race for the same session, requestId and bucket; a script is one atomic step, so
no check can be overtaken by another worker between reading and writing. Time comes from the server's
`TIME` (one clock for the whole fleet). Every key a script writes gets a TTL.
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
-- KEYS lease keys; ARGV[1] lease_ms, ARGV[1 + i] the value KEYS[i] must hold -> how many were lost
local lost = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
  else
    lost = lost + 1
  end
end
return lost
"""

# Turns are list items "<tokens>\\n<json>"; history is trimmed by tokens (newest kept), as in memory.
APPEND = """
-- KEYS[1] turns, KEYS[2] system prompt; ARGV item, max_tokens, ttl_ms, has_prompt, prompt, max_turns
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
return keep
"""

# A requestId key holds "c:<token>" while claimed (leased) and "d:<final reply>" once answered.
CLAIM = """
-- KEYS[1] request key; ARGV token, lease_ms -> {'new'} | {'in_flight'} | {'done', final}
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return {'new'}
end
if string.sub(v, 1, 2) == 'd:' then return {'done', string.sub(v, 3)} end
return {'in_flight'}
"""

COMPLETE = """
-- KEYS[1] request key; ARGV token, final, window_ms -> 1 cached, 0 another worker holds it now
local v = redis.call('GET', KEYS[1])
if v and v ~= 'c:' .. ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'd:' .. ARGV[2], 'PX', ARGV[3])
return 1
"""

ABANDON = """
-- KEYS[1] request key; ARGV token
if redis.call('GET', KEYS[1]) == 'c:' .. ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# Token buckets: every bucket is checked before any is spent (a refused request takes nothing).
TAKE = """
-- KEYS buckets; ARGV rate_per_s, burst per bucket -> 0 taken, else retry-after in ms
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local b = redis.call('HMGET', key, 'tokens', 'stamp')
  local level = burst
  if b[1] and b[2] then level = math.min(burst, tonumber(b[1]) + (now - tonumber(b[2])) * rate) end
  if level < 1 then return math.ceil((1 - level) / rate * 1000) end
  levels[i] = level
end
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  redis.call('HSET', key, 'tokens', tostring(levels[i] - 1), 'stamp', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
end
return 0
"""

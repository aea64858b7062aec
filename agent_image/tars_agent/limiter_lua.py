"""Server-side scripts of the shared limiter: the Lua twin of tars_agent.gcra.

Every decision runs inside one script on the Redis server's clock
(redis.call('TIME')), so all agent processes see one clock and one state and a
decision cannot interleave with another. Keep the arithmetic in the same order
as gcra.py: tests compare both on the same inputs.
"""

_COMMON = """
local function effective(limit, burst, ov)
  if ov == nil or ov >= limit then return limit, burst end
  local l = math.max(ov, 2)
  local b = math.max(math.floor(burst * l / limit), 1)
  return l, math.min(b, l - 1)
end
local function increment(cost, limit, burst, window)
  return math.ceil(cost * window / (limit - burst))
end
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- HGET answers false (not nil) for a missing field
local function override(key, name)
  local raw = redis.call('HGET', key, name)
  if raw then return tonumber(raw) end
  return nil
end
local function fmt(n) return string.format('%.0f', n) end
"""

# KEYS: pause, overrides, tat_1..tat_n
# ARGV: priority, reserve_fraction, n, then n x (name, limit, window_us, burst, cost)
# Returns {admitted, retry_after_us, now_us, denied_by (0-based, -1), too_large, tat_1..tat_n}
ACQUIRE = (
    _COMMON
    + """
local now = server_now()
local n = tonumber(ARGV[3])
local tats = {}
for i = 1, n do tats[i] = tonumber(redis.call('GET', KEYS[2 + i]) or '0') end
local function reply(admitted, wait, denied, too_large)
  local out = {admitted, wait, now, denied, too_large}
  for i = 1, n do out[5 + i] = fmt(tats[i]) end
  return out
end
local pause_until = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < pause_until then return reply(0, pause_until - now, -1, 0) end
local critical = ARGV[1] == 'critical'
local reserve = tonumber(ARGV[2])
local new_tats = {}
local worst_wait, worst_index, too_large = 0, -1, 0
for i = 1, n do
  local base = 3 + (i - 1) * 5
  local name = ARGV[base + 1]
  local ov = override(KEYS[2], name)
  local limit, burst = effective(tonumber(ARGV[base + 2]), tonumber(ARGV[base + 4]), ov)
  local window = tonumber(ARGV[base + 3])
  local cost = tonumber(ARGV[base + 5])
  local inc = increment(cost, limit, burst, window)
  local usable = burst
  if not critical then usable = math.min(math.max(burst * (1.0 - reserve), cost), burst) end
  local tau = math.ceil(usable * window / (limit - burst))
  if inc > tau then too_large = 1 end
  local new_tat = math.max(tats[i], now) + inc
  local wait = new_tat - now - tau
  if wait > worst_wait then worst_wait = wait; worst_index = i - 1 end
  new_tats[i] = new_tat
end
if too_large == 1 then return reply(0, 0, -1, 1) end
if worst_wait > 0 then return reply(0, worst_wait, worst_index, 0) end
for i = 1, n do
  tats[i] = new_tats[i]
  -- the key vanishes once the bucket is full again: a missing tat means a full bucket
  redis.call('SET', KEYS[2 + i], fmt(tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1000)
end
return reply(1, 0, -1, 0)
"""
)

# KEYS: overrides, tat.  ARGV: name, limit, window_us, burst, delta (actual - reserved units)
# Returns {now_us, new_tat}
RECONCILE = (
    _COMMON
    + """
local now = server_now()
local ov = override(KEYS[1], ARGV[1])
local limit, burst = effective(tonumber(ARGV[2]), tonumber(ARGV[4]), ov)
local window = tonumber(ARGV[3])
local delta = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
local new_tat
if delta >= 0 then
  new_tat = math.max(tat, now) + increment(delta, limit, burst, window)
else
  new_tat = math.max(tat - math.floor(-delta * window / (limit - burst)), now)
end
if new_tat > now then
  redis.call('SET', KEYS[2], fmt(new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[2])
end
return {now, fmt(new_tat)}
"""
)

# KEYS: pause.  ARGV: pause_us.  Extends (never shortens) the budget-wide pause.
# Returns the pause end in server microseconds.
PAUSE = (
    _COMMON
    + """
local now = server_now()
local until_us = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current >= until_us then return fmt(current) end
redis.call('SET', KEYS[1], fmt(until_us), 'PX', math.ceil(tonumber(ARGV[1]) / 1000) + 1)
return fmt(until_us)
"""
)

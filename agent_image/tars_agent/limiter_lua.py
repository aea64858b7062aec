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

# KEYS: pause, overrides, used (hash), agents (sorted set), queue (hash), tat_1..tat_n
# ARGV: reserve_fraction, n, n x (name, limit, window_us, burst), agent member ('' = none),
#       agent ttl_us, m, then m ops of 3 + 2n fields each: code, a, b, x_1..x_n, y_1..y_n
#   r: reserve   a = priority, b = max_ahead_us, x = costs, y_1 = deadline_us
#   R: the same, for a caller refused before for its horizon (takes no new ticket)
#   c: confirm   x = costs, y = the tats the reservation left (given back when paused)
#   g: give back x = costs, y = the tats the reservation left
#   k: charge    x = units
#   e: empty     x = 1 for each bucket the upstream reported empty
#   p: pause     a = pause_us (and every bucket empty)
# Returns {now, pause_until, agents (-1 = not asked), used_1..n, tat_1..n,
#          then per op: status, value, limiting, tat_1..n}  (see gcra.run_batch)
BATCH = (
    _COMMON
    + """
local now = server_now()
local n = tonumber(ARGV[2])
local reserve = tonumber(ARGV[1])
local limit, burst, window = {}, {}, {}
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local ov = override(KEYS[2], ARGV[base + 1])
  limit[i], burst[i] = effective(tonumber(ARGV[base + 2]), tonumber(ARGV[base + 4]), ov)
  window[i] = tonumber(ARGV[base + 3])
end
local p = 2 + 4 * n
local function tolerance(i, critical, cost)
  local usable = burst[i]
  if not critical then usable = math.min(math.max(burst[i] * (1.0 - reserve), cost), burst[i]) end
  return math.ceil(usable * window[i] / (limit[i] - burst[i]))
end
local function inc(i, cost) return increment(cost, limit[i], burst[i], window[i]) end
local agents = -1
if ARGV[p + 1] ~= '' then
  local ttl = tonumber(ARGV[p + 2])
  redis.call('ZADD', KEYS[4], now, ARGV[p + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl)
  redis.call('PEXPIRE', KEYS[4], math.ceil(ttl / 1000))
  agents = redis.call('ZCARD', KEYS[4])
end
local tats, used = {}, {}
for i = 1, n do
  local raw = redis.call('GET', KEYS[5 + i])
  if raw then
    tats[i] = tonumber(raw)
  else  -- gcra.fresh_tat
    local room = math.max(math.floor(burst[i] / 2), 1)
    tats[i] = math.max(now + tolerance(i, true, 0) - inc(i, room), now)
  end
  local name = ARGV[2 + (i - 1) * 4 + 1]
  local u = redis.call('HMGET', KEYS[3], name .. ':u', name .. ':t')
  used[i] = 0
  if u[1] then  -- gcra.decay
    used[i] = tonumber(u[1]) * math.exp(-math.max(now - tonumber(u[2]), 0) / window[i])
  end
end
local pause_until = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause_until <= now then pause_until = 0 end
local m = tonumber(ARGV[p + 3])
local width = 3 + 2 * n
local out = {}
local changed = false
local function give_back(o)
  for i = 1, n do
    if tats[i] == tonumber(ARGV[o + 3 + n + i]) then
      tats[i] = tats[i] - inc(i, tonumber(ARGV[o + 3 + i])); changed = true
    end
  end
end
local function empty(i)
  local e = now + tolerance(i, true, 0)
  if e > tats[i] then tats[i] = e; changed = true end
end
for j = 1, m do
  local o = p + 3 + (j - 1) * width
  local code = ARGV[o + 1]
  local status, value, limiting = 1, 0, -1
  if code == 'r' or code == 'R' then  -- gcra.reserve
    local critical = ARGV[o + 2] == 'critical'
    local slot = math.max(now, pause_until)
    local too_large = false
    local incs = {}
    for i = 1, n do
      local cost = tonumber(ARGV[o + 3 + i])
      incs[i] = inc(i, cost)
      local tau = tolerance(i, critical, cost)
      if incs[i] > tau then too_large = true end
      local earliest = tats[i] + incs[i] - tau
      if earliest > slot then slot = earliest; limiting = i - 1 end
    end
    if too_large then
      status, value, limiting = 2, now, -1
    elseif slot - now > tonumber(ARGV[o + 3]) then
      status, value = 0, slot
      local deadline = math.max(tonumber(ARGV[o + 3 + n + 1]), tonumber(ARGV[o + 3]))
      if code == 'r' and tonumber(ARGV[o + 3]) < deadline then  -- refused for its horizon: a ticket
        local spacing = 0
        for i = 1, n do spacing = math.max(spacing, incs[i]) end
        local last = tonumber(redis.call('HGET', KEYS[5], ARGV[o + 2]) or '0')
        value = math.max(slot, last + spacing)
        if value - now <= deadline then
          redis.call('HSET', KEYS[5], ARGV[o + 2], fmt(value))
          redis.call('PEXPIRE', KEYS[5], 60000)
        end
      end
    else
      value = slot
      for i = 1, n do
        tats[i] = math.max(tats[i], slot) + incs[i]
        used[i] = used[i] + tonumber(ARGV[o + 3 + i])
      end
      changed = true
    end
  elseif code == 'c' then
    if now < pause_until then
      status, value = 0, pause_until
      give_back(o)
    end
  elseif code == 'g' then
    give_back(o)
  elseif code == 'k' then  -- gcra.charge
    for i = 1, n do
      local units = tonumber(ARGV[o + 3 + i])
      if units ~= 0 then
        tats[i] = math.max(tats[i], now) + inc(i, units); changed = true
      end
      used[i] = used[i] + units
    end
  elseif code == 'e' then
    for i = 1, n do
      if ARGV[o + 3 + i] == '1' then empty(i) end
    end
  else  -- 'p'
    local pause_us = tonumber(ARGV[o + 2])
    if now + pause_us > pause_until then
      pause_until = now + pause_us
      redis.call('SET', KEYS[1], fmt(pause_until), 'PX', math.ceil(pause_us / 1000) + 1)
    end
    for i = 1, n do empty(i) end
  end
  out[#out + 1] = status
  out[#out + 1] = fmt(value)
  out[#out + 1] = limiting
  for i = 1, n do out[#out + 1] = fmt(tats[i]) end
end
local head = {now, fmt(pause_until), agents}
for i = 1, n do
  local name = ARGV[2 + (i - 1) * 4 + 1]
  if changed then
    -- kept a window (at least a second) after the bucket is full again: a missing tat means
    -- a cold start or a budget unused that long
    local keep_ms = math.max(math.ceil((tats[i] - now + window[i]) / 1000), 1000)
    redis.call('SET', KEYS[5 + i], fmt(tats[i]), 'PX', keep_ms)
  end
  redis.call('HSET', KEYS[3], name .. ':u', string.format('%.17g', used[i]), name .. ':t', now)
  head[#head + 1] = string.format('%.17g', used[i])
end
redis.call('PEXPIRE', KEYS[3], 3600000)
for i = 1, n do head[#head + 1] = fmt(tats[i]) end
for k = 1, #out do head[#head + 1] = out[k] end
return head
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
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')  -- missing: full (a refund/charge needs no more)
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

"""Server-side scripts of the shared limiter: the Lua twin of tars_agent.gcra.

Every decision runs inside one script on the Redis server's clock
(redis.call('TIME')), so all agent processes see one clock and one state and a
decision cannot interleave with another. Keep the arithmetic in the same order
as gcra.py: tests compare both on the same inputs.
"""

from tars_agent.gcra import LEASE_MIN

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
local function fmt(n) return string.format('%.0f', n) end
-- The budget's state, one string (gcra.State, gcra.decode_state): format, pause_until,
-- queue_expires, the tickets of critical high normal low, overrides_expire, then per limit:
-- name tat tat_expires used used_at override
local function load(key)
  local s = {pause = 0, queue_exp = 0, queue = {0, 0, 0, 0}, ov_exp = 0, names = {}, b = {}}
  local raw = redis.call('GET', key)
  if not raw then return s end
  local f = {}
  for w in string.gmatch(raw, '%S+') do f[#f + 1] = w end
  if f[1] ~= 's1' then return s end  -- another format: start afresh
  s.pause, s.queue_exp, s.ov_exp = tonumber(f[2]), tonumber(f[3]), tonumber(f[8])
  for c = 1, 4 do s.queue[c] = tonumber(f[3 + c]) end
  for k = 9, #f, 6 do
    s.names[#s.names + 1] = f[k]
    s.b[f[k]] = {tat = tonumber(f[k + 1]), exp = tonumber(f[k + 2]), used = tonumber(f[k + 3]),
                 at = tonumber(f[k + 4]), ov = tonumber(f[k + 5])}
  end
  return s
end
-- kept until the last of its parts expires, and at least an hour (gcra.keep_ms)
local function store(key, s, now)
  local out = {'s1', fmt(s.pause), fmt(s.queue_exp)}
  for c = 1, 4 do out[#out + 1] = fmt(s.queue[c]) end
  out[#out + 1] = fmt(s.ov_exp)
  local keep = 3600000
  for _, e in ipairs({s.pause, s.queue_exp, s.ov_exp}) do
    keep = math.max(keep, math.ceil((e - now) / 1000))
  end
  for _, name in ipairs(s.names) do
    local b = s.b[name]
    out[#out + 1] = name
    out[#out + 1] = fmt(b.tat)
    out[#out + 1] = fmt(b.exp)
    out[#out + 1] = string.format('%.17g', b.used)
    out[#out + 1] = fmt(b.at)
    out[#out + 1] = fmt(b.ov)
    keep = math.max(keep, math.ceil((b.exp - now) / 1000))
  end
  redis.call('SET', key, table.concat(out, ' '), 'PX', keep)
end
"""

# KEYS: state (string), agents (sorted set)
# ARGV: reserve_fraction, lease_us (0: no leases), n, n x (name, limit, window_us, burst),
#       agent member ('' = none), agent ttl_us, prune ('1': drop the agents not heard of),
#       pause channel, m, then m ops of 4 + 2n fields each: code, a, b, c, x_1..x_n, y_1..y_n
#   r: reserve   a = priority, b = max_ahead_us, x = costs, y_1 = deadline_us
#   R: the same, for a caller refused before for its horizon (takes no new ticket)
#   l: lease     c = admissions wanted, x = costs of each (gcra.lease)
#   c: confirm   x = costs, y = the tats the reservation left (given back when paused)
#   g: give back x = costs, y = the tats the reservation left
#   k: charge    x = units
#   e: empty     x = 1 for each bucket the upstream reported empty
#   p: pause     a = pause_us (and every bucket empty); a longer pause is published
#   o: override  a = ttl_us, x = the tighter limits (0 = none)
# Returns {now, pause_until, agents (-1 = not asked), used_1..n, tat_1..n,
#          then per op: status, value, limiting, tat_1..n}  (see gcra.run_batch); integers but
#          used_i (a float, as a string)
# Commands: TIME, GET, and SET only when something changed; a heartbeat adds ZADD and ZCOUNT.
BATCH = (
    _COMMON
    + f"local LEASE_MIN = {LEASE_MIN}\n"
    + """local now = server_now()
local n = tonumber(ARGV[3])
local reserve = tonumber(ARGV[1])
local lease_us = tonumber(ARGV[2])
local s = load(KEYS[1])
local ov_live = now < s.ov_exp
local names, base, ovs = {}, {}, {}
local limit, burst, window = {}, {}, {}
for i = 1, n do
  local a = 3 + (i - 1) * 4
  names[i] = ARGV[a + 1]
  base[i] = s.b[names[i]]
  ovs[i] = 0
  if ov_live and base[i] then ovs[i] = base[i].ov end
  local ov = nil
  if ovs[i] ~= 0 then ov = ovs[i] end
  limit[i], burst[i] = effective(tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4]), ov)
  window[i] = tonumber(ARGV[a + 3])
end
local p = 3 + 4 * n
local function tolerance(i, critical, cost)
  local usable = burst[i]
  if not critical then usable = math.min(math.max(burst[i] * (1.0 - reserve), cost), burst[i]) end
  return math.ceil(usable * window[i] / (limit[i] - burst[i]))
end
local function inc(i, cost) return increment(cost, limit[i], burst[i], window[i]) end
local agents = -1
if ARGV[p + 1] ~= '' then
  local ttl = tonumber(ARGV[p + 2])
  local added = redis.call('ZADD', KEYS[2], now, ARGV[p + 1])
  if ARGV[p + 3] == '1' then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
  end
  if added == 1 or ARGV[p + 3] == '1' then  -- a new agent, or now and then: kept a while
    redis.call('PEXPIRE', KEYS[2], math.ceil(ttl / 1000) * 4)
  end
  agents = redis.call('ZCOUNT', KEYS[2], '(' .. fmt(now - ttl), '+inf')
end
local tats, first, used = {}, {}, {}
for i = 1, n do
  local b = base[i]
  if b and now < b.exp then
    tats[i] = b.tat
  else  -- gcra.fresh_tat
    local room = math.max(math.floor(burst[i] / 2), 1)
    tats[i] = math.max(now + tolerance(i, true, 0) - inc(i, room), now)
  end
  first[i] = tats[i]
  used[i] = 0
  if b then  -- gcra.decay
    used[i] = b.used * math.exp(-math.max(now - b.at, 0) / window[i])
  end
end
local pause_until = s.pause
if pause_until <= now then pause_until = 0 end
local queue = {0, 0, 0, 0}
if now < s.queue_exp then queue = s.queue end
local CLASS = {critical = 1, high = 2, normal = 3, low = 4}
local m = tonumber(ARGV[p + 5])
local width = 4 + 2 * n
local out = {}
local touched = false
local function give_back(o)
  for i = 1, n do
    if tats[i] == tonumber(ARGV[o + 4 + n + i]) then
      tats[i] = tats[i] - inc(i, tonumber(ARGV[o + 4 + i]))
    end
  end
end
local function empty(i)
  local e = now + tolerance(i, true, 0)
  if e > tats[i] then tats[i] = e end
end
for j = 1, m do
  local o = p + 5 + (j - 1) * width
  local code = ARGV[o + 1]
  local status, value, limiting = 1, 0, -1
  if code == 'r' or code == 'R' then  -- gcra.reserve
    local critical = ARGV[o + 2] == 'critical'
    local slot = math.max(now, pause_until)
    local too_large = false
    local incs = {}
    for i = 1, n do
      local cost = tonumber(ARGV[o + 4 + i])
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
      local deadline = math.max(tonumber(ARGV[o + 4 + n + 1]), tonumber(ARGV[o + 3]))
      if code == 'r' and tonumber(ARGV[o + 3]) < deadline then  -- refused for its horizon: a ticket
        local spacing = 0
        for i = 1, n do spacing = math.max(spacing, incs[i]) end
        local c = CLASS[ARGV[o + 2]]
        value = math.max(slot, queue[c] + spacing)
        if value - now <= deadline then
          queue[c] = value
          s.queue_exp, touched = now + 60000000, true
        end
      end
    else
      value = slot
      for i = 1, n do
        tats[i] = math.max(tats[i], slot) + incs[i]
        used[i] = used[i] + tonumber(ARGV[o + 4 + i])
      end
      touched = true
    end
  elseif code == 'l' then  -- gcra.lease: none while paused or while any class holds a ticket ahead
    status = 0
    local calm = lease_us > 0 and pause_until <= now
    for c = 1, 4 do
      if queue[c] > now then calm = false end
    end
    if calm then
      local granted = tonumber(ARGV[o + 4])
      local incs = {}
      for i = 1, n do
        local cost = tonumber(ARGV[o + 4 + i])
        incs[i] = inc(i, cost)
        if incs[i] > 0 then
          local start = math.max(tats[i], now + lease_us)
          local half = math.floor(tolerance(i, false, cost) / 2)
          granted = math.min(granted, math.floor((now + half - start) / incs[i]))
        end
      end
      if granted >= LEASE_MIN then
        status, value, touched = 3, granted, true
        for i = 1, n do
          if incs[i] > 0 then tats[i] = math.max(tats[i], now + lease_us) + granted * incs[i] end
          used[i] = used[i] + granted * tonumber(ARGV[o + 4 + i])
        end
      end
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
      local units = tonumber(ARGV[o + 4 + i])
      if units ~= 0 then tats[i] = math.max(tats[i], now) + inc(i, units) end
      used[i] = used[i] + units
    end
    touched = true
  elseif code == 'e' then
    for i = 1, n do
      if ARGV[o + 4 + i] == '1' then empty(i) end
    end
  elseif code == 'o' then
    for i = 1, n do
      local v = tonumber(ARGV[o + 4 + i])
      if v ~= 0 then ovs[i] = v end
    end
    s.ov_exp, touched = now + tonumber(ARGV[o + 2]), true
  else  -- 'p'
    local pause_us = tonumber(ARGV[o + 2])
    if now + pause_us > pause_until then
      pause_until, touched = now + pause_us, true
      -- the agents' callers sleeping on a reservation hear of it at once (limiter.py)
      redis.call('PUBLISH', ARGV[p + 4], fmt(pause_until))
    end
    for i = 1, n do empty(i) end
  end
  out[#out + 1] = status
  out[#out + 1] = value
  out[#out + 1] = limiting
  for i = 1, n do out[#out + 1] = tats[i] end
end
local changed = false
for i = 1, n do
  if tats[i] ~= first[i] then changed = true end
end
if changed or touched then
  local state = {pause = pause_until, queue_exp = s.queue_exp, queue = queue, ov_exp = s.ov_exp,
                 names = {}, b = {}}
  for i = 1, n do
    local b = base[i] or {tat = 0, exp = 0}
    local tat, exp = b.tat, b.exp
    if changed then
      -- kept a window (at least a second) after the bucket is full again: a bucket with no
      -- state is a cold start or a budget unused that long
      local keep_ms = math.max(math.ceil((tats[i] - now + window[i]) / 1000), 1000)
      tat, exp = tats[i], now + keep_ms * 1000
    end
    state.names[i] = names[i]
    state.b[names[i]] = {tat = tat, exp = exp, used = used[i], at = now, ov = ovs[i]}
  end
  for _, name in ipairs(s.names) do  -- another agent's limits (a configuration being rolled out)
    if not state.b[name] then
      local b = s.b[name]
      if not ov_live then b.ov = 0 end
      state.names[#state.names + 1] = name
      state.b[name] = b
    end
  end
  store(KEYS[1], state, now)
end
-- integers as Lua numbers: Redis replies them as integers, exact below 2^53 (a string.format
-- each cost more than the rest of a reservation)
local head = {now, pause_until, agents}
for i = 1, n do head[#head + 1] = string.format('%.17g', used[i]) end
for i = 1, n do head[#head + 1] = tats[i] end
for k = 1, #out do head[#head + 1] = out[k] end
return head
"""
)

# KEYS: state.  ARGV: name, limit, window_us, burst, delta (actual - reserved units)
# Returns {now_us, new_tat}
RECONCILE = (
    _COMMON
    + """
local now = server_now()
local s = load(KEYS[1])
local name = ARGV[1]
local b = s.b[name]
if not b then
  b = {tat = 0, exp = 0, used = 0, at = 0, ov = 0}
  s.names[#s.names + 1] = name
  s.b[name] = b
end
local ov = nil
if now < s.ov_exp and b.ov ~= 0 then ov = b.ov end
local limit, burst = effective(tonumber(ARGV[2]), tonumber(ARGV[4]), ov)
local window = tonumber(ARGV[3])
local delta = tonumber(ARGV[5])
local tat = 0  -- no state: full (a refund/charge needs no more)
if now < b.exp then tat = b.tat end
local new_tat
if delta >= 0 then
  new_tat = math.max(tat, now) + increment(delta, limit, burst, window)
else
  new_tat = math.max(tat - math.floor(-delta * window / (limit - burst)), now)
end
if new_tat > now then
  b.tat, b.exp = new_tat, now + (math.ceil((new_tat - now) / 1000) + 1000) * 1000
else  -- no state: the next batch starts the bucket afresh
  b.tat, b.exp = 0, 0
end
store(KEYS[1], s, now)
return {now, fmt(new_tat)}
"""
)

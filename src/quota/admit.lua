-- knoq-gateway: one quota decision, atomic on the Redis server.
-- The same arithmetic as src/quota/window.rs (sliding logs, calendar months
-- with their margin spill) and src/quota/store.rs (cool-downs, a clock that
-- never runs back), so N replicas together admit what one gateway would.
--
-- KEYS[1]  the account's hash: 'latest' (ms) and 'cool:<bucket>' (ms)
-- KEYS[2]  this admission's id: set once it is recorded (idempotent retries)
-- KEYS[3..] one per window, in the order the windows follow in ARGV
-- ARGV[1]  'acquire' | 'check' | 'cool' | 'record'
--          ('record': write back an admission a replica made on its own
--          share while Redis was away, at its time, without any check)
-- ARGV[2]  now in ms, or '' for the server's TIME (for 'record': the
--          admission's time, on the server's clock)
-- ARGV[3]  margin (ms)
-- ARGV[4]  bucket index
-- ARGV[5]  admission id (acquire) or cool-down length in ms (cool)
-- ARGV[6]  number of windows n, then per window: kind ('s'|'m'), limit, period ms
--
-- Returns {0, wait_ms, which, now} when refused (which: 0 for a cool-down,
-- else the window's 1-based index); {1, now} for a passed check or a
-- recorded cool-down; {1 or 2, now, remaining_1, reset_1, ...} when
-- admitted (2: this id was admitted before, nothing recorded again);
-- {1 or 2, now} for 'record'.

local op, margin, bucket = ARGV[1], tonumber(ARGV[3]), ARGV[4]
local DAY = 86400000
local floor = math.floor

local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[2])
end
local latest = tonumber(redis.call('HGET', KEYS[1], 'latest') or '0')
if latest > now and op ~= 'record' then now = latest end

-- Calendar months, UTC (Howard Hinnant's civil-date algorithms).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function month_index(ms)
  local z = floor(ms / DAY) + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return (y - 1970) * 12 + (m - 1)
end

local function month_start(index)
  return days_from_civil(1970 + floor(index / 12), index % 12 + 1, 1) * DAY
end

-- A month ledger: the recorded month, its count, and the admissions of its
-- last margin that Knoq may count in the next month.
local function month_ledger(key)
  local v = redis.call('HMGET', key, 'month', 'count', 'spill')
  return tonumber(v[1] or '0'), tonumber(v[2] or '0'), tonumber(v[3] or '0')
end

local function month_counts(key, index)
  local month, count, spill = month_ledger(key)
  if month == index then return count end
  if month + 1 == index then return spill end
  return 0
end

local n = tonumber(ARGV[6])
local windows = {}
for i = 1, n do
  local base = 6 + (i - 1) * 3
  windows[i] = { key = KEYS[2 + i], kind = ARGV[base + 1],
                 limit = tonumber(ARGV[base + 2]), span = tonumber(ARGV[base + 3]) + margin }
end

-- Forget what can no longer count; then: nil if admitted, else the moment
-- (ms) it would be, if nothing else is admitted meanwhile.
local function blocked_until(w)
  if w.kind == 's' then
    redis.call('ZREMRANGEBYSCORE', w.key, '-inf', now - w.span)
    local live = redis.call('ZCARD', w.key)
    if live < w.limit then return nil end
    local oldest = redis.call('ZRANGE', w.key, live - w.limit, live - w.limit, 'WITHSCORES')
    return tonumber(oldest[2]) + w.span
  end
  local current = month_index(now)
  local nxt = month_start(current + 1)
  if month_counts(w.key, current) >= w.limit then return nxt end
  if now + margin >= nxt and month_counts(w.key, current + 1) >= w.limit then
    return nxt + margin
  end
  return nil
end

local function record(w, id)
  if w.kind == 's' then
    redis.call('ZADD', w.key, now, id)
    redis.call('ZREMRANGEBYRANK', w.key, 0, -(w.limit + 1))
    redis.call('PEXPIRE', w.key, w.span)
    return
  end
  local current = month_index(now)
  local month, count, spill = month_ledger(w.key)
  -- A written-back admission of a month the ledger has left behind.
  if month > current then return end
  if month ~= current then
    if current == month + 1 then count = spill else count = 0 end
    spill = 0
    month = current
  end
  count = count + 1
  if now + margin >= month_start(current + 1) then spill = spill + 1 end
  redis.call('HSET', w.key, 'month', month, 'count', count, 'spill', spill)
  redis.call('PEXPIRE', w.key, month_start(current + 2) - now + margin)
end

-- (remaining, ms until remaining grows)
local function standing(w)
  if w.kind == 's' then
    local live = redis.call('ZCARD', w.key)
    local reset = 0
    if live > 0 then
      local oldest = redis.call('ZRANGE', w.key, 0, 0, 'WITHSCORES')
      reset = math.max(0, tonumber(oldest[2]) + w.span - now)
    end
    return math.max(0, w.limit - live), reset
  end
  local current = month_index(now)
  local used = month_counts(w.key, current)
  local remaining = math.max(0, w.limit - used)
  if remaining == w.limit then return remaining, 0 end
  return remaining, month_start(current + 1) - now
end

-- How long the account's hash must outlive its last write.
local function keep(extra)
  local longest = extra
  for i = 1, n do
    local w = windows[i]
    local span = w.span
    if w.kind == 'm' then span = 62 * DAY + margin end
    if span > longest then longest = span end
  end
  if redis.call('PTTL', KEYS[1]) < longest then
    redis.call('PEXPIRE', KEYS[1], longest)
  end
end

if op == 'cool' then
  local until_ms = now + tonumber(ARGV[5])
  local field = 'cool:' .. bucket
  local was = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  if until_ms > was then redis.call('HSET', KEYS[1], field, until_ms) end
  keep(until_ms - now)
  return { 1, now }
end

local function standings(status)
  local out = { status, now }
  for i = 1, n do
    local remaining, reset = standing(windows[i])
    out[#out + 1] = remaining
    out[#out + 1] = reset
  end
  return out
end

if op == 'acquire' and redis.call('EXISTS', KEYS[2]) == 1 then
  return standings(2)
end

if op == 'record' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return { 2, now } end
  for i = 1, n do record(windows[i], ARGV[5]) end
  keep(0)
  redis.call('SET', KEYS[2], '1', 'PX', 600000)
  return { 1, now }
end

local cooling = tonumber(redis.call('HGET', KEYS[1], 'cool:' .. bucket) or '0')
if cooling > now then
  return { 0, cooling - now, 0, now }
end

local refused, until_ms = 0, 0
for i = 1, n do
  local u = blocked_until(windows[i])
  if u and u > until_ms then refused, until_ms = i, u end
end
if refused > 0 then
  return { 0, until_ms - now, refused, now }
end
if op == 'check' then
  return { 1, now }
end

for i = 1, n do record(windows[i], ARGV[5]) end
redis.call('HSET', KEYS[1], 'latest', now)
keep(0)
redis.call('SET', KEYS[2], '1', 'PX', 600000)
return standings(1)

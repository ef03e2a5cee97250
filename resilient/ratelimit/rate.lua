-- One key's learned rate and paced departures, shared by every process (Redis's clock).
-- The law is resilient/_learned.py's, line for line; its constants are that module's,
-- written into the line below when the script is loaded (one source of truth):
--@CONSTANTS
-- KEYS[1]: the key's pause hash (lua/pause.lua; read only: 'until')
-- KEYS[2]: the rate hash {start = r0 (absent: not paced), peak = W, a, slow (0/1),
--          since, count, cuts, b0..b3 (accepted per bucket), bucket, next (the next
--          departure, Redis time)}; it expires IDLE seconds after its last write.
-- ARGV[1] op, ARGV[2] now ('' = Redis TIME; a number only in tests of the law),
-- ARGV[3] ceiling (requests/s; 'inf' for none), ARGV[4] x:
--   admit  x = max wait -> {'paused', s} | {'open', 0, cuts} (not paced) |
--                          {'go', wait, cuts, rate} (a departure slot is ours: leave in
--                          wait s) | {'late', wait, cuts, rate} (nothing reserved)
--   depart x = max wait -> as admit, without reading the pause
--   peek                -> as admit, reserving nothing (a healthy key's lease renewed in
--                          the background): {'paused', s} | {'open', 0, cuts} |
--                          {'paced', 0, cuts, rate}; writes nothing
--   cut    x = cuts the 429's request was sent after -> {cuts, rate}; a 429 to a
--                          request sent before the last cut is the same signal
--   accepted x = n      -> n answers that were not 429 (batched by each process)
--   resume              -> the probe answered (not a 429): sending resumes, the probe
--                          is its first accepted answer, the next departure is 1/r away
--   rate                -> {rate or -1, cuts}
local key = KEYS[2]
local op = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local ceiling = tonumber(ARGV[3]) or math.huge
local x = tonumber(ARGV[4] or '0') or 0
local IDLE = 3600
local WIDTH = SPAN / BUCKETS
local K = ((1.0 - BETA / PLATEAU) / CUBIC_C) ^ (1.0 / 3.0)
local SLOW_GAIN = math.log(2.0) / DOUBLING

local r = {}
do
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do r[flat[i]] = tonumber(flat[i + 1]) end
end
local function num(name) return r[name] or 0 end

local function rate()
  if not r.start then return math.huge end
  local grown
  if num('slow') == 1 then
    grown = r.start + num('count') * SLOW_GAIN
  else
    local t = math.max(0, now - num('since'))
    local d = t - K
    grown = num('peak') * (1.0 + CUBIC_C * d * d * d)
  end
  if grown < MIN_RATE then grown = MIN_RATE end
  if grown > ceiling then grown = ceiling end
  return grown
end

local function roll(index)
  local last = num('bucket')
  if index <= last then return end
  for i = last + 1, math.min(index, last + BUCKETS) do r['b' .. (i % BUCKETS)] = 0 end
  r.bucket = index
end

local function accepted(n)
  local index = math.max(0, math.floor((now - num('since')) / WIDTH))
  roll(index)
  local b = 'b' .. (index % BUCKETS)
  r[b] = num(b) + n
  r.count = num('count') + n
end

local function measured()
  local sending = now - num('since')
  if sending < MIN_SPAN then return nil end
  local index = math.floor(sending / WIDTH)
  roll(index)
  local covered = math.min(sending, (BUCKETS - 1) * WIDTH + (sending - index * WIDTH))
  local sum = 0
  for i = 0, BUCKETS - 1 do sum = sum + num('b' .. i) end
  return sum / covered
end

local function resume()
  r.since, r.count, r.bucket = now, 0, 0
  for i = 0, BUCKETS - 1 do r['b' .. i] = 0 end
end

local function cut()
  local m = measured()
  local peak, slow
  if m and m > 0 then
    peak, slow = m, 0
    if num('slow') == 1 and r.start then peak = math.max(peak, rate() / 2.0) end
  elseif r.start then
    peak, slow = num('a'), num('slow')
  else
    peak, slow = SLOW_START_MIN / BETA, 1
  end
  r.a = peak
  r.peak = math.max(PLATEAU * peak, MIN_RATE)
  r.start = math.max(math.min(BETA * peak, ceiling), MIN_RATE)
  r.slow = slow
  r.cuts = num('cuts') + 1
  resume()
end

local function save()
  local flat = {}
  for name, value in pairs(r) do
    flat[#flat + 1] = name
    flat[#flat + 1] = string.format('%.17g', value)
  end
  redis.call('HSET', key, unpack(flat))
  redis.call('EXPIRE', key, IDLE)
end

local function depart()
  if not r.start then return {'open', '0', tostring(num('cuts'))} end
  local due = math.max(now, num('next'))
  local wait = due - now
  local current = rate()
  if wait > x then
    return {'late', string.format('%.17g', wait), tostring(num('cuts')), string.format('%.17g', current)}
  end
  r.next = due + 1.0 / current
  save()
  return {'go', string.format('%.17g', wait), tostring(num('cuts')), string.format('%.17g', current)}
end

local function paused()
  local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '-1')
  if untl >= 0 then return {'paused', string.format('%.17g', math.max(0, untl - now))} end
  return nil
end

if op == 'admit' then
  return paused() or depart()
elseif op == 'peek' then
  local found = paused()
  if found then return found end
  if not r.start then return {'open', '0', tostring(num('cuts'))} end
  return {'paced', '0', tostring(num('cuts')), string.format('%.17g', rate())}
elseif op == 'depart' then
  return depart()
elseif op == 'cut' then
  if x == num('cuts') then
    cut()
    save()
  end
  return {tostring(num('cuts')), string.format('%.17g', rate())}
elseif op == 'accepted' then
  if r.start then
    accepted(x)
    save()
  end
  return 1
elseif op == 'resume' then
  if r.start then
    resume()
    accepted(1)
    r.next = now + 1.0 / rate()
    save()
  end
  return 1
elseif op == 'rate' then
  if not r.start then return {'-1', tostring(num('cuts'))} end
  return {string.format('%.17g', rate()), tostring(num('cuts'))}
end
return redis.error_reply('unknown op ' .. op)

-- One key's circuit breaker shared by every process, on Redis's clock (TIME).
-- KEYS[1]: hash {state (0 closed, 1 open, 2 half-open), epoch, until, admitted,
--   slots (the tokens of the probes admitted in this half-open epoch, space-separated),
--   gone (the last tokens released before their admission arrived), successes, streak
--   (failures in a row while closed), level (failed probes since the circuit closed),
--   and per bucket i (0..buckets-1): b<i> its number, n<i> calls, f<i> failures}.
-- ARGV: op, failure_ratio, min_calls, open_for, half_open_probes, width, buckets,
--   consecutive_failures, max_open_for, u (uniform in [0, 1): the jitter of a break), then
--   admit token           -> {0, epoch} closed | {1, epoch, transition} probe admitted,
--                            its slot named token | {-1, epoch, seconds until half-open}
--                            rejected (also a token already released: its caller is gone)
--   record epoch failed probe -> {state, transition, break seconds, reason}; an outcome
--                            of an older epoch is ignored
--   release token         -> the admission named token ended without an outcome (its
--                            caller failed, was cancelled, or never got the answer): free
--                            its slot. Not admitted (yet): remembered as gone, so an
--                            admission arriving later takes no slot. Never frees another's.
--   state                 -> {state, seconds until (half-)open ends}
-- Same rules as the in-memory circuit (resilient/_breaker.py, next_break for the break).
-- Floats travel as strings.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key, op = KEYS[1], ARGV[1]
local ratio, min_calls, open_for = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local probes, width, buckets = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local consecutive, max_open_for, u = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local h = redis.call('HMGET', key, 'state', 'epoch', 'until', 'admitted', 'successes',
                     'streak', 'level', 'slots')
local state, epoch = tonumber(h[1] or '0'), tonumber(h[2] or '0')
local untl, admitted, successes = tonumber(h[3] or '0'), tonumber(h[4] or '0'), tonumber(h[5] or '0')
local streak, level, slots = tonumber(h[6] or '0'), tonumber(h[7] or '0'), h[8] or ''
local GONE = 8  -- tokens remembered as gone
local ttl = math.ceil(width * buckets + max_open_for) + 60

local function save()
  redis.call('HSET', key, 'state', state, 'epoch', epoch, 'until', tostring(untl),
             'admitted', admitted, 'successes', successes, 'streak', streak, 'level', level,
             'slots', slots)
  redis.call('EXPIRE', key, ttl)
end

local function has(list, name)
  return string.find(' ' .. list .. ' ', ' ' .. name .. ' ', 1, true) ~= nil
end

local function clear_counts()
  for i = 0, buckets - 1 do redis.call('HDEL', key, 'b' .. i, 'n' .. i, 'f' .. i) end
end

-- next_break: open_for after the trip from closed; after a failed probe, doubled with
-- jitter up to max_open_for, never below open_for.
local function next_break()
  if level <= 0 then return open_for end
  local nominal = math.min(max_open_for, open_for * 2 ^ math.min(level, 64))
  return math.max(open_for, nominal * (0.5 + 0.5 * u))
end

local function trip(why)
  local pause = next_break()
  state, epoch, untl, admitted, successes, streak, slots = 1, epoch + 1, now + pause, 0, 0, 0, ''
  clear_counts()
  save()
  return {state, 'opened', tostring(pause), why}
end

if op == 'admit' then
  if state == 0 then return {0, epoch} end
  local token = ARGV[11]
  if state == 2 and has(slots, token) then return {1, epoch, ''} end  -- sent again
  if has(redis.call('HGET', key, 'gone') or '', token) then
    return {-1, epoch, tostring(math.max(0, untl - now))}
  end
  local transition = ''
  if state == 1 or admitted >= probes then
    if now < untl then return {-1, epoch, tostring(untl - now)} end
    transition = (state == 2) and 'half_open_again' or 'half_open'
    state, epoch, admitted, successes, slots = 2, epoch + 1, 0, 0, ''
  end
  admitted = admitted + 1
  slots = (slots == '') and token or (slots .. ' ' .. token)
  untl = now + open_for
  save()
  return {1, epoch, transition}
elseif op == 'record' then
  local e, failed, probe = tonumber(ARGV[11]), ARGV[12] == '1', ARGV[13] == '1'
  if e ~= epoch then return {state, ''} end
  if probe then
    if failed then
      level = level + 1
      return trip('a probe failed')
    end
    successes = successes + 1
    if successes >= probes then
      state, epoch, admitted, successes, streak, level, slots = 0, epoch + 1, 0, 0, 0, 0, ''
      clear_counts()
      save()
      return {state, 'closed'}
    end
    save()
    return {state, ''}
  end
  local b = math.floor(now / width)
  local i = b % buckets
  if tonumber(redis.call('HGET', key, 'b' .. i) or '-1') ~= b then
    redis.call('HSET', key, 'b' .. i, b, 'n' .. i, 0, 'f' .. i, 0)
  end
  redis.call('HINCRBY', key, 'n' .. i, 1)
  redis.call('EXPIRE', key, ttl)
  if not failed then
    if streak > 0 then redis.call('HSET', key, 'streak', 0) end
    return {state, ''}
  end
  redis.call('HINCRBY', key, 'f' .. i, 1)
  streak = redis.call('HINCRBY', key, 'streak', 1)
  if state ~= 0 then return {state, ''} end
  if streak >= consecutive then
    return trip(streak .. ' failures in a row')
  end
  local calls, fails = 0, 0
  for j = 0, buckets - 1 do
    local row = redis.call('HMGET', key, 'b' .. j, 'n' .. j, 'f' .. j)
    if tonumber(row[1] or '-1') > b - buckets then
      calls = calls + tonumber(row[2] or '0')
      fails = fails + tonumber(row[3] or '0')
    end
  end
  if calls >= min_calls and fails / calls >= ratio then
    return trip(fails .. ' of ' .. calls .. ' calls failed')
  end
  return {state, ''}
elseif op == 'release' then
  local token = ARGV[11]
  if state == 2 and has(slots, token) then
    local rest = {}
    for name in string.gmatch(slots, '%S+') do
      if name ~= token then rest[#rest + 1] = name end
    end
    redis.call('HSET', key, 'admitted', math.max(0, admitted - 1), 'slots', table.concat(rest, ' '))
  else
    local names = {}
    for name in string.gmatch(redis.call('HGET', key, 'gone') or '', '%S+') do
      names[#names + 1] = name
    end
    names[#names + 1] = token
    redis.call('HSET', key, 'gone', table.concat(names, ' ', math.max(1, #names - GONE + 1)))
    redis.call('EXPIRE', key, ttl)
  end
  return 1
elseif op == 'state' then
  return {state, tostring(math.max(0, untl - now))}
end
return redis.error_reply('unknown op ' .. op)

-- One key's circuit breaker shared by every process, on Redis's clock (TIME).
-- The Lua mirror of resilient/_circuit.py's Circuit: same fields, same steps, same replies.
-- KEYS[1]: hash {state (0 closed, 1 open, 2 half-open), epoch, until, admitted,
--   slots (the tokens of the probes admitted in this half-open epoch, space-separated),
--   gone (the last tokens released before their admission arrived), successes, streak
--   (failures in a row while closed), level (failed probes since the circuit closed),
--   and per bucket i (0..buckets-1): b<i> its number, n<i> calls, f<i> failures}.
-- ARGV: op, failure_ratio, min_calls, open_for, half_open_probes, width, buckets,
--   consecutive_failures, max_open_for, u (uniform in [0, 1): the jitter of a break), then
--   admit token     -> {verdict, epoch, seconds, state, transition}: verdict 0 closed,
--                      1 a probe (its slot named token), -1 refused for seconds (until the
--                      break ends or the probes in flight are given up; also a token
--                      already released: its caller is gone); transition '' | 'half_open'
--                      | 'half_open_again'
--   record n, then n groups (epoch, probe, k, k run lengths): the outcomes of calls
--                      admitted in epoch, in order. probe 1: one probe's outcome (runs
--                      {1}: success, {0, 1}: failure); probe 0: runs of successes,
--                      failures, successes, ... of calls admitted while closed, each
--                      counted as Circuit.record counts it. A stale epoch is ignored.
--                   -> {state, epoch, seconds left (open or half-open), then per change:
--                      'opened', break seconds, reason | 'closed', '', ''}
--   release token   -> the admission named token ended without an outcome (its caller
--                      failed, was cancelled, or never got the answer): free its slot.
--                      Not admitted (yet): remembered as gone, so an admission arriving
--                      later takes no slot. Never frees another's.
--   state           -> {state, seconds left, epoch}
-- Floats travel as strings.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key, op = KEYS[1], ARGV[1]
local ratio, min_calls, open_for = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local probes, width, buckets = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local consecutive, max_open_for, u = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local h = redis.call('HMGET', key, 'state', 'epoch', 'until', 'admitted', 'successes',
                     'streak', 'level', 'slots')
-- A new hash (first use, expired, or a Redis that lost its data) starts its epochs at
-- Redis's time in ms: a ticket admitted before can never match one of its epochs.
local fresh = not h[2]
local state, epoch = tonumber(h[1] or '0'), tonumber(h[2] or '') or math.floor(now * 1000)
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

local function left()
  if state == 0 then return '0' end
  return tostring(math.max(0, untl - now))
end

-- next_break: open_for after the trip from closed; after a failed probe, doubled with
-- jitter up to max_open_for, never below open_for.
local function next_break()
  if level <= 0 then return open_for end
  local nominal = math.min(max_open_for, open_for * 2 ^ math.min(level, 64))
  return math.max(open_for, nominal * (0.5 + 0.5 * u))
end

local changes = {}

local function open(why)
  local pause = next_break()
  state, epoch, untl, admitted, successes, streak, slots = 1, epoch + 1, now + pause, 0, 0, 0, ''
  changes[#changes + 1] = 'opened'
  changes[#changes + 1] = tostring(pause)
  changes[#changes + 1] = why
end

local function close()
  state, epoch, admitted, successes, streak, level, slots = 0, epoch + 1, 0, 0, 0, 0, ''
  for i = 0, buckets - 1 do redis.call('HDEL', key, 'b' .. i, 'n' .. i, 'f' .. i) end
  changes[#changes + 1] = 'closed'
  changes[#changes + 1] = ''
  changes[#changes + 1] = ''
end

if op == 'admit' then
  if state == 0 then
    if fresh then save() end  -- its epoch, from now on
    return {0, epoch, '0', state, ''}
  end
  local token = ARGV[11]
  if state == 2 and has(slots, token) then return {1, epoch, '0', state, ''} end  -- sent again
  if has(redis.call('HGET', key, 'gone') or '', token) then
    return {-1, epoch, left(), state, ''}
  end
  local transition = ''
  if state == 1 or admitted >= probes then
    -- a break ending within DUE_SLACK (1 us, resilient/_clock.py) counts as ended
    if now + 1e-6 < untl then return {-1, epoch, tostring(untl - now), state, ''} end
    transition = (state == 2) and 'half_open_again' or 'half_open'
    state, epoch, admitted, successes, slots = 2, epoch + 1, 0, 0, ''
  end
  admitted = admitted + 1
  slots = (slots == '') and token or (slots .. ' ' .. token)
  untl = now + open_for
  save()
  return {1, epoch, '0', state, transition}
elseif op == 'record' then
  -- the window as of now: the current bucket, and the totals of the buckets in it
  local b = math.floor(now / width)
  local i = b % buckets
  local calls, fails, n, f = 0, 0, 0, 0
  local counted = false  -- the window was read (only outcomes of a closed epoch need it)
  local dirty = false  -- a probe's success counted (not a change, still to be saved)
  local function window()
    for j = 0, buckets - 1 do
      local row = redis.call('HMGET', key, 'b' .. j, 'n' .. j, 'f' .. j)
      if tonumber(row[1] or '-1') > b - buckets then
        calls = calls + tonumber(row[2] or '0')
        fails = fails + tonumber(row[3] or '0')
        if j == i then n, f = tonumber(row[2] or '0'), tonumber(row[3] or '0') end
      end
    end
    counted = true
  end
  local at = 12
  for _ = 1, tonumber(ARGV[11]) do
    local e, probe, k = tonumber(ARGV[at]), ARGV[at + 1] == '1', tonumber(ARGV[at + 2])
    local runs = at + 3
    at = runs + k
    if e == epoch and probe then
      if state ~= 2 then  -- not a probe of this spell
      elseif k >= 2 and tonumber(ARGV[runs + 1]) > 0 then  -- the probe failed
        level = level + 1
        open('a probe failed')
      else
        successes = successes + 1
        dirty = true
        if successes >= probes then
          close()
          counted, calls, fails, n, f = true, 0, 0, 0, 0
        end
      end
    elseif e == epoch then
      if not counted then window() end
      for r = 0, k - 1 do
        local count = tonumber(ARGV[runs + r])
        if r % 2 == 0 then  -- successes
          if count > 0 and e == epoch then
            calls, n, streak = calls + count, n + count, 0
          end
        else  -- failures, one by one: the first that trips ends this epoch's outcomes
          for _ = 1, count do
            if e ~= epoch then break end
            calls, fails, n, f, streak = calls + 1, fails + 1, n + 1, f + 1, streak + 1
            if state == 0 then
              if streak >= consecutive then
                open(streak .. ' failures in a row')
              elseif calls >= min_calls and fails / calls >= ratio then
                open(fails .. ' of ' .. calls .. ' calls failed')
              end
            end
          end
        end
      end
    end
  end
  if counted and (n > 0 or f > 0) then
    redis.call('HSET', key, 'b' .. i, b, 'n' .. i, n, 'f' .. i, f)
  end
  if #changes > 0 or counted or dirty then save() end
  local reply = {state, epoch, left()}
  for j = 1, #changes do reply[#reply + 1] = changes[j] end
  return reply
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
  return {state, left(), epoch}
end
return redis.error_reply('unknown op ' .. op)

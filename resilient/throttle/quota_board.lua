-- Board up to `want` requests of a key at once (a lease), if every quota window has
-- room (atomic, on Redis's clock).
-- KEYS[1] flying: sorted set of tickets of requests in flight (boarded, not landed:
--   leased places too), scored by when their lease in Redis ends
-- KEYS[2..n-1] one moving-window list per quota (limits' layout: newest timestamp first)
-- KEYS[n] gone: sorted set of tickets taken out before their boarding arrived (see
--   quota_forget.lua), scored by when they may be dropped
-- ARGV: client, first, want, ttl (s), spare_ttl (s), used, held, poll (s), spread, then
--   amount and expiry (s) of each window. The places are named client:first,
--   client:first+1, ...; the first `used` (1 for a caller, 0 for a lease asked ahead)
--   are in flight now (leased in Redis for ttl seconds), the others are spares
--   (spare_ttl seconds, until their use re-leases them: see quota_land.lua); `held`:
--   the spares the asking process holds already (counted in flying).
-- Room in a window: room = amount - used - flying. Grants the largest k of want,
-- want/2, want/4, ... (k >= 2) with spread * (held + k) <= room + held in every window
-- (the process then holds at most 1/spread of the room it finds, its own spares
-- counted as room), else `used` (1: a caller boards alone) if room >= 1 in every
-- window; returns k after counting its k tickets in flight, else 0 if asked ahead
-- (used = 0), else {seconds until the last full window can have room, its 1-based
-- index}. room >= m in a window <=> its
-- (amount - flying - m)-th newest slot (0-based) is missing or has left the window. A
-- first ticket found gone boards nothing (its caller gave up on it: its command was
-- overtaken by its removal). Mirrors resilient/throttle/_lease.py's granted().
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local client, first, want = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, spare_ttl, used = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local held, poll, spread = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local last = #KEYS - 1  -- the last window

if redis.call('ZREM', KEYS[#KEYS], client .. ':' .. first) == 1 then return 0 end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)  -- leases of lost landings
local flying = redis.call('ZCARD', KEYS[1])

local function fits(m)  -- room >= m in every window
  for w = 2, last do
    local i = tonumber(ARGV[2 * w + 6]) - flying - m
    if i < 0 then return false end
    local slot = redis.call('LINDEX', KEYS[w], i)
    if slot and tonumber(slot) > now - tonumber(ARGV[2 * w + 7]) then return false end
  end
  return true
end

local granted, k = 0, want
while k >= 2 and granted == 0 do
  if fits(spread * (held + k) - held) then granted = k end
  k = math.floor(k / 2)
end
if granted == 0 and used == 1 and fits(1) then granted = 1 end
if granted == 0 and used == 0 then return 0 end  -- asked ahead: no wait to tell

if granted == 0 then
  local wait, which = 0, 0
  for w = 2, last do
    local amount, expiry = tonumber(ARGV[2 * w + 6]), tonumber(ARGV[2 * w + 7])
    local free, untl = amount - flying, 0
    if free <= 0 then
      untl = math.min(expiry, poll)  -- full of requests in flight: look again soon
    else
      local slot = redis.call('LINDEX', KEYS[w], free - 1)
      if slot and tonumber(slot) > now - expiry then
        untl = tonumber(slot) + expiry - now
      end
    end
    if untl > wait then
      wait, which = untl, w - 1
    end
  end
  return {tostring(wait), which}
end

local places = {}
for i = 0, granted - 1 do
  places[2 * i + 1] = now + (i < used and ttl or spare_ttl)
  places[2 * i + 2] = client .. ':' .. (first + i)
end
redis.call('ZADD', KEYS[1], unpack(places))
redis.call('EXPIRE', KEYS[1], math.ceil(ttl))
return granted

-- Board one request of a key if every quota window has room (atomic, on Redis's clock).
-- KEYS[1] flying: sorted set of tickets of requests in flight, scored by lease end
-- KEYS[2..n-1] one moving-window list per quota (limits' layout: newest timestamp first)
-- KEYS[n] gone: sorted set of tickets taken out before their boarding arrived (see
--   quota_forget.lua), scored by when they may be dropped
-- ARGV: ticket, lease (s), poll (s), then amount and expiry (s) of each window.
-- Room in a window: used + flying < amount, i.e. the (amount - flying)-th newest slot
-- is missing or older than the window. Returns 0 after counting the ticket in flight
-- (an integer: the usual reply, the cheapest to parse), else {seconds until the last
-- full window can have room, its 1-based index}. A ticket found gone boards nothing
-- (its caller gave up on it: its command was overtaken by its removal).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ticket, lease, poll = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local last = #KEYS - 1  -- the last window

if redis.call('ZREM', KEYS[#KEYS], ticket) == 1 then return 0 end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)  -- leases of lost landings
local flying = redis.call('ZCARD', KEYS[1])

local wait, which = 0, 0
for w = 2, last do
  local amount, expiry = tonumber(ARGV[2 * w]), tonumber(ARGV[2 * w + 1])
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
if wait > 0 then
  return {tostring(wait), which}
end

redis.call('ZADD', KEYS[1], now + lease, ticket)
redis.call('EXPIRE', KEYS[1], math.ceil(lease))
return 0

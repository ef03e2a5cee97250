-- A key's boarded requests ended, leased places were taken into use, and leased places
-- went unused: one call for a batch.
-- A ticket taken into use is leased for ttl seconds from now, like a request boarded
-- alone (only if it is still there: never brought back). A landed ticket leaves the
-- in-flight set and takes a slot, timestamped now (Redis time, later than the request's
-- arrival at the server), in every window (limits' moving-window layout). A ticket
-- handed back unused only leaves the in-flight set.
-- KEYS as quota_board.lua (the gone set unused).
-- ARGV: landed (n), used (m), ttl (s), then amount and expiry (s) of each window, then
--   the tickets: n landed, then m taken into use, then those handed back.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local windows = #KEYS - 2
local landed, used, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local first = 4 + 2 * windows  -- the first ticket

if used > 0 then
  local places = {}
  for i = 0, used - 1 do
    places[2 * i + 1] = now + ttl
    places[2 * i + 2] = ARGV[first + landed + i]
  end
  redis.call('ZADD', KEYS[1], 'XX', unpack(places))
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl))
end
if landed > 0 then
  redis.call('ZREM', KEYS[1], unpack(ARGV, first, first + landed - 1))
end
if #ARGV >= first + landed + used then
  redis.call('ZREM', KEYS[1], unpack(ARGV, first + landed + used, #ARGV))
end
if landed > 0 then
  local stamps, stamp = {}, tostring(now)
  for i = 1, landed do
    stamps[i] = stamp
  end
  for w = 1, windows do
    local amount, expiry = tonumber(ARGV[2 * w + 2]), tonumber(ARGV[2 * w + 3])
    redis.call('LPUSH', KEYS[w + 1], unpack(stamps))
    redis.call('LTRIM', KEYS[w + 1], 0, amount - 1)
    redis.call('EXPIRE', KEYS[w + 1], math.ceil(expiry))
  end
end
return 1

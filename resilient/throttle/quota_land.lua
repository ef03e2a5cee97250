-- A key's boarded requests ended, and leased places went unused: one call for a batch.
-- Each landed ticket leaves the in-flight set and takes a slot, timestamped now (Redis
-- time, later than the request's arrival at the server), in every window (limits'
-- moving-window layout); a ticket handed back unused only leaves the in-flight set.
-- KEYS as quota_board.lua (the gone set unused).
-- ARGV: landed (n), then amount and expiry (s) of each window, then the tickets: the
--   first n landed, the rest handed back.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local windows = #KEYS - 2
local landed = tonumber(ARGV[1])
local tickets = 2 + 2 * windows

if #ARGV >= tickets then
  redis.call('ZREM', KEYS[1], unpack(ARGV, tickets, #ARGV))
end
if landed > 0 then
  local stamps, stamp = {}, tostring(now)
  for i = 1, landed do
    stamps[i] = stamp
  end
  for w = 1, windows do
    local amount, expiry = tonumber(ARGV[2 * w]), tonumber(ARGV[2 * w + 1])
    redis.call('LPUSH', KEYS[w + 1], unpack(stamps))
    redis.call('LTRIM', KEYS[w + 1], 0, amount - 1)
    redis.call('EXPIRE', KEYS[w + 1], math.ceil(expiry))
  end
end
return 1

-- A boarded request's attempt ended: its ticket leaves the in-flight set and it takes
-- a slot, timestamped now (Redis time), in every window (limits' moving-window layout).
-- KEYS and ARGV as quota_board.lua (lease and poll unused; the gone set unused).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

redis.call('ZREM', KEYS[1], ARGV[1])
for w = 2, #KEYS - 1 do
  local amount, expiry = tonumber(ARGV[2 * w]), tonumber(ARGV[2 * w + 1])
  redis.call('LPUSH', KEYS[w], tostring(now))
  redis.call('LTRIM', KEYS[w], 0, amount - 1)
  redis.call('EXPIRE', KEYS[w], math.ceil(expiry))
end
return 1

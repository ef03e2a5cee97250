-- A boarding whose answer never reached its caller (cancelled, or the reply came after
-- the storage timeout): take out every place it may have taken. If none is there (its
-- command was overtaken), its first ticket is remembered as gone, so that boarding
-- counts nothing when it arrives.
-- KEYS[1] flying, KEYS[2] gone (as quota_board.lua); ARGV[1] ttl (s), ARGV[2..] the
-- tickets the boarding named (ARGV[2] its first).
if redis.call('ZREM', KEYS[1], unpack(ARGV, 2, #ARGV)) > 0 then return 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
redis.call('EXPIRE', KEYS[2], math.ceil(ttl))
return 0

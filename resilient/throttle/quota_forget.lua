-- A boarding whose answer never reached its caller (cancelled, or the reply came after
-- the storage timeout): take its ticket out. A ticket not there yet (its boarding command
-- was overtaken) is remembered as gone, so that boarding counts nothing when it arrives.
-- KEYS[1] flying, KEYS[2] gone (as quota_board.lua); ARGV[1] ticket, ARGV[2] lease (s).
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then return 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
redis.call('EXPIRE', KEYS[2], math.ceil(lease))
return 0

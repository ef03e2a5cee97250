-- A boarding whose answer never reached its caller (it was cancelled): remove its ticket.
-- KEYS[1] flying (as quota_board.lua); ARGV[1] ticket.
return redis.call('ZREM', KEYS[1], ARGV[1])

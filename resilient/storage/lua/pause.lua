-- One key's 429 pause shared by every process, on Redis's clock (TIME).
-- KEYS[1]: hash {until = end of the pause (Redis time, s), probe = client probing,
--                probe_until = end of that probe's lease}. No hash: not paused.
-- ARGV[1] op, ARGV[2] client, ARGV[3] seconds (delay or lease).
--   check            -> -1 if not paused, else seconds until the pause ends (0: a probe is due)
--   pause  delay     -> extend the pause to now + delay at least (a 429; from the probe it
--                       also ends the probe); returns seconds until it ends
--   claim  lease     -> {"open"} | {"paused", s} | {"busy", s} (another client probes) |
--                       {"probe"} (this client is the one probe, for at most lease s)
--   open             -> the probe's answer was not a 429: delete the pause, unless a 429
--                       extended it meanwhile
--   release          -> this client's probe ended without an answer: free the probe
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, client, seconds = ARGV[1], ARGV[2], tonumber(ARGV[3] or '0')
local key = KEYS[1]
local untl = tonumber(redis.call('HGET', key, 'until') or '-1')

if op == 'check' then
  if untl < 0 then return '-1' end
  return tostring(math.max(0, untl - now))
elseif op == 'pause' then
  untl = math.max(untl, now + seconds)
  redis.call('HSET', key, 'until', tostring(untl))
  if redis.call('HGET', key, 'probe') == client then
    redis.call('HDEL', key, 'probe', 'probe_until')
  end
  -- kept for a day past its end: a pause whose probe never answers still lifts
  redis.call('EXPIREAT', key, math.ceil(untl + 86400))
  return tostring(untl - now)
elseif op == 'claim' then
  if untl < 0 then return {'open'} end
  if untl > now then return {'paused', tostring(untl - now)} end
  local probe = redis.call('HGET', key, 'probe')
  local probe_until = tonumber(redis.call('HGET', key, 'probe_until') or '0')
  if probe and probe ~= client and probe_until > now then
    return {'busy', tostring(probe_until - now)}
  end
  redis.call('HSET', key, 'probe', client, 'probe_until', tostring(now + seconds))
  return {'probe'}
elseif op == 'open' then
  if untl >= 0 and untl <= now then redis.call('DEL', key) end
  return 1
elseif op == 'release' then
  if redis.call('HGET', key, 'probe') == client then
    redis.call('HDEL', key, 'probe', 'probe_until')
  end
  return 1
end
return redis.error_reply('unknown op ' .. op)

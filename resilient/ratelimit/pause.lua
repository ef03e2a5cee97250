-- One key's 429 pause shared by every process, on Redis's clock (TIME).
-- KEYS[1]: hash {until = end of the pause (Redis time, s), probe = the token of the claim
--                probing, probe_until = end of that claim's lease, gone = the last tokens
--                released before their claim arrived}. No hash: not paused.
-- ARGV[1] op, ARGV[2] token (a claim's name; '' for none), ARGV[3] seconds (delay or
-- lease), ARGV[4..] (claim) tokens of this client whose release never got an answer.
--   pause  delay     -> extend the pause to now + delay at least (a 429; from the probe, its
--                       token, it also ends that claim); returns seconds until it ends
--   claim  lease     -> {"open"} | {"paused", s} | {"busy", s} (another claim probes) |
--                       {"probe"} (the claim named token is the one probe, for at most
--                       lease s). The tokens in ARGV[4..] are released first.
--   open             -> the probe (token) answered, not a 429: delete the pause unless a
--                       429 extended it meanwhile; end the claim
--   release          -> the claim named token ended without an answer: free it. A claim
--                       that is not there yet is remembered as gone: if it arrives later
--                       (its command was overtaken), it probes nothing.
-- A release names its claim: it never frees another's.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, token, seconds = ARGV[1], ARGV[2], tonumber(ARGV[3] or '0')
local key = KEYS[1]
local untl = tonumber(redis.call('HGET', key, 'until') or '-1')
local GONE = 8  -- tokens remembered as gone

local function free(name)
  if name ~= '' and redis.call('HGET', key, 'probe') == name then
    redis.call('HDEL', key, 'probe', 'probe_until')
    return true
  end
  return false
end

local function is_gone(name)
  local gone = redis.call('HGET', key, 'gone')
  return gone and string.find(' ' .. gone .. ' ', ' ' .. name .. ' ', 1, true) ~= nil
end

if op == 'pause' then
  untl = math.max(untl, now + seconds)
  redis.call('HSET', key, 'until', tostring(untl))
  free(token)
  -- kept for a day past its end: a pause whose probe never answers still lifts
  redis.call('EXPIREAT', key, math.ceil(untl + 86400))
  return tostring(untl - now)
elseif op == 'claim' then
  if untl < 0 then return {'open'} end
  for i = 4, #ARGV do free(ARGV[i]) end
  if untl > now then return {'paused', tostring(untl - now)} end
  local probe = redis.call('HGET', key, 'probe')
  local probe_until = tonumber(redis.call('HGET', key, 'probe_until') or '0')
  if probe == token then return {'probe'} end  -- a claim sent again
  if (probe and probe_until > now) or is_gone(token) then
    return {'busy', tostring(math.max(0, probe_until - now))}
  end
  redis.call('HSET', key, 'probe', token, 'probe_until', tostring(now + seconds))
  return {'probe'}
elseif op == 'open' then
  if untl >= 0 and untl <= now then
    redis.call('DEL', key)
  else
    free(token)
  end
  return 1
elseif op == 'release' then
  if token ~= '' and untl >= 0 and not free(token) then
    local names = {}
    for name in string.gmatch(redis.call('HGET', key, 'gone') or '', '%S+') do
      names[#names + 1] = name
    end
    names[#names + 1] = token
    redis.call('HSET', key, 'gone', table.concat(names, ' ', math.max(1, #names - GONE + 1)))
  end
  return 1
end
return redis.error_reply('unknown op ' .. op)

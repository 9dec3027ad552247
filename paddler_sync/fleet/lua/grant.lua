-- grant: let one agent apply a desired state if fewer than the limit of others do (rolling swaps).
-- KEYS  1 PREFIX:control:grants (hash: agent id -> "EXPIRES|DESIRED_ID", expiry on the balancer's clock, s)
-- ARGV  1 agent id  2 desired id  3 limit (-1: none)  4 now (s)  5 ttl (s)
--       6.. agents that report a desired state in progress (they count even without a grant here)
-- Returns 1 when the agent holds the grant now (renewed), 0 when it must wait its turn.
local now = tonumber(ARGV[4])
local others = {}
local count = 0
local held = false
local grants = redis.call('HGETALL', KEYS[1])
for i = 1, #grants, 2 do
  local expires = tonumber(string.match(grants[i + 1], '^([^|]+)'))
  if expires <= now then
    redis.call('HDEL', KEYS[1], grants[i])
  elseif grants[i] == ARGV[1] then
    held = true
  else
    others[grants[i]] = true
    count = count + 1
  end
end
for i = 6, #ARGV do
  if ARGV[i] ~= ARGV[1] and not others[ARGV[i]] then
    others[ARGV[i]] = true
    count = count + 1
  end
end
local limit = tonumber(ARGV[3])
if not held and limit >= 0 and count >= limit then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], tostring(now + tonumber(ARGV[5])) .. '|' .. ARGV[2])
return 1

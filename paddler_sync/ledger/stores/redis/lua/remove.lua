-- remove: a server's entry goes, and its agent's record with it when the agent left (deregistered, or silent too
-- long); a router's model that is gone takes only its own entry.
-- KEYS  1 PREFIX:up:KEY   2 PREFIX:leases:KEY   3 PREFIX:draining:KEY   4 PREFIX:upstreams   5 PREFIX:agents
-- ARGV  1 the entry's key   2 '' or a time (s): remove only if no balancer heard from the agent after it
--       3 the capacity channel   4 the agent id whose record goes too, or 
-- The server's leases stay: they are requests still running there, given back by the balancers that hold them
-- (or renewed by them). Were they dropped, a server back from a silence would count them as others' load read from
-- the agent, and a take between that reading and its arrival would be missing from both. The set goes when its
-- last lease would have expired, if the server never comes back (renew.lua moves that moment on).
-- Returns 1 when removed, 0 when a balancer heard from the agent meanwhile.
if ARGV[2] ~= '' then
  local at = tonumber(redis.call('HGET', KEYS[1], 'reported_at'))
  if at and at > tonumber(ARGV[2]) then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[3])
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[2], math.floor(tonumber(last[2])) + 1) end
redis.call('SREM', KEYS[4], ARGV[1])
if ARGV[4] ~= '' then redis.call('HDEL', KEYS[5], ARGV[4]) end
redis.call('PUBLISH', ARGV[3], 'remove')
return 1

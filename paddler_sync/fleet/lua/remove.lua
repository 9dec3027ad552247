-- remove: a server's entry goes, and its agent's record with it when the agent left (deregistered, or silent too
-- long); a router's model that is gone takes only its own entry.
-- KEYS  1 PREFIX:up:KEY   2 PREFIX:leases:KEY   3 PREFIX:draining:KEY   4 PREFIX:upstreams   5 PREFIX:agents
-- ARGV  1 the entry's key   2 '' or a time (s): remove only if no balancer heard from the agent after it
--       3 the capacity channel   4 the agent id whose record goes too, or 
-- Returns 1 when removed, 0 when a balancer heard from the agent meanwhile.
if ARGV[2] ~= '' then
  local at = tonumber(redis.call('HGET', KEYS[1], 'reported_at'))
  if at and at > tonumber(ARGV[2]) then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
if ARGV[4] ~= '' then redis.call('HDEL', KEYS[5], ARGV[4]) end
redis.call('PUBLISH', ARGV[3], 'remove')
return 1

-- report: an agent's reading of its server, from whichever balancer it reports to.
-- KEYS  1 PREFIX:up:KEY   2 PREFIX:leases:KEY   3 PREFIX:draining:KEY   4 PREFIX:upstreams   5 PREFIX:agents
-- ARGV  1 the server key (the agent id)   2 its address   3 total slots   4 busy slots (as of now)
--       5 '1' when it takes requests   6 now on the balancer's clock (s)   7 the agent's record (JSON)
--       8 the capacity channel   9 '1' when its model is unloaded (sleeping)   10 the model(s) it serves (JSON)
--       11 the agent id (the record's key: a router's agent has an entry per model, AGENT/MODEL, and one record)
-- A new address starts the server afresh (its leases belonged to another server); a server back after its removal
-- (no address kept) finds the leases of its requests still running (remove.lua). Lingering slots end here:
-- the reading shows whether llama.cpp still runs them. Returns {in_flight, external}.
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
local was = redis.call('HGET', KEYS[1], 'addr')
if was and was ~= ARGV[2] then redis.call('DEL', KEYS[2], KEYS[3]) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('PERSIST', KEYS[2])  -- back after a removal: its leases live as long as their requests again
redis.call('DEL', KEYS[3])
local in_flight = redis.call('ZCARD', KEYS[2])
local external = math.max(0, tonumber(ARGV[4]) - in_flight)
redis.call('HSET', KEYS[1], 'addr', ARGV[2], 'total', ARGV[3], 'external', external, 'routable', ARGV[5],
           'reported_at', ARGV[6], 'sleeping', ARGV[9], 'serving', ARGV[10])
if ARGV[5] == '1' then redis.call('HDEL', KEYS[1], 'quarantined_until') end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[11], ARGV[7])
redis.call('PUBLISH', ARGV[8], 'report')
return {in_flight, external}

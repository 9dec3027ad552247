-- release: a lease goes (idempotent); while any worker has waiters, every worker is woken.
-- KEYS  1 PREFIX:leases:KEY   2 PREFIX:draining:KEY   3 PREFIX:waiting   4 (with tenants) PREFIX:tenant:NAME:leases
-- ARGV  1 the lease id   2 '1' when llama.cpp may still run it (the slot stays busy, lingering, until the
--       next report or the lease TTL)   3 lease TTL (ms)   4 the capacity channel
-- Returns 1 when the lease was live, 0 when it had gone (expired, or released before).
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if KEYS[4] then redis.call('ZREM', KEYS[4], ARGV[1]) end
if removed == 1 and ARGV[2] == '1' then redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) > 0 then redis.call('PUBLISH', ARGV[4], 'release') end
return removed

-- renew: push back the expiry of a worker's live leases on one server (leases already gone stay gone).
-- KEYS  1 PREFIX:leases:KEY
-- ARGV  1 lease TTL (ms)   2.. the lease ids
-- Returns how many ids were given.
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
return #ARGV - 1

-- renew: push back the expiry of a worker's live leases on one server (or of one tenant's), and put back any the
-- store lost: after a failover the new Redis master may lack the old one's last writes, and the leases this worker
-- still holds are the truth (a request still running keeps its slot). Leases the worker gave back are never sent.
-- KEYS  1 PREFIX:leases:KEY (or PREFIX:tenant:NAME:leases)
-- ARGV  1 lease TTL (ms)   2.. the lease ids
-- Returns how many ids were given.
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
-- a removed server's set expires with its last lease (remove.lua): a renewed lease moves that moment on
if redis.call('PTTL', KEYS[1]) > 0 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 1) end
return #ARGV - 1

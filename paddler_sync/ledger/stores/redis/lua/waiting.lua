-- waiting: mark (or unmark) a worker as having waiters; releases publish only while some worker has.
-- KEYS  1 PREFIX:waiting
-- ARGV  1 the worker id   2 '1' to mark, '0' to unmark   3 the mark's TTL (ms)
-- Returns 1.
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[2] == '1' then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
else redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1

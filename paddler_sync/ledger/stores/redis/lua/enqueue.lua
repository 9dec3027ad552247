-- enqueue: a numbered ticket, a waiting request's place in the queue every worker shares.
-- KEYS  1 PREFIX:tickets (the counter)   2 the queue (PREFIX:queue or PREFIX:queue:model:NAME)   3 PREFIX:waiting
-- ARGV  1 the worker id   2 the waiting mark's TTL (ms)
-- Returns the ticket's number; its name is WORKER:NUMBER. Drawing one marks the worker as having waiters.
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
local number = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], number, ARGV[1] .. ':' .. number)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
return number

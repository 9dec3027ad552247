-- quarantine: no request goes to this server until the time given (it refused a connection).
-- KEYS  1 PREFIX:up:KEY
-- ARGV  1 until, on the balancer's clock (s); the next report that says it is ready lifts it
-- Returns 1, or 0 when the server is unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'quarantined_until', ARGV[1])
return 1

-- take: one slot on the server a worker chose, only if it still has one, and only in queue order.
-- KEYS  1 PREFIX:up:KEY   2 PREFIX:leases:KEY   3 PREFIX:draining:KEY   4 the request's queue (PREFIX:queue, or
--       PREFIX:queue:model:NAME for a request naming a model)   5 PREFIX:waiting
-- ARGV  1 the server's address (it must still be this server)   2 the new lease id   3 lease TTL (ms)
--       4 now on the balancer's clock (s; quarantines are kept on it)   5 the waiter's ticket name, or ''
--       6 its number   7 the worker id   8 the waiting mark's TTL (ms)
-- Returns {outcome, total, in_flight, external, draining} (the counts as Redis has them, for the mirror);
-- outcome is a TakeOutcome: 1 TAKEN, 0 FULL, -1 GONE, -2 UNUSABLE, -3 NOT_YOUR_TURN, -4 TICKET_LOST.
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[5] ~= '' then  -- a waiter: its worker is alive; a ticket Redis lost (restarted empty) is redrawn
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[8]), ARGV[7])
  if not redis.call('ZSCORE', KEYS[4], ARGV[5]) then return {-4, 0, 0, 0, 0} end
end
local head = false
for _ = 1, 100 do  -- the oldest ticket of a live worker; a dead worker's tickets go
  local first = redis.call('ZRANGE', KEYS[4], 0, 0)
  if #first == 0 then break end
  local alive = redis.call('ZSCORE', KEYS[5], string.match(first[1], '^([^:]+):'))
  if alive and tonumber(alive) >= now then head = first[1] break end
  redis.call('ZREM', KEYS[4], first[1])
end
if head and head ~= ARGV[5] then return {-3, 0, 0, 0, 0} end
if redis.call('HGET', KEYS[1], 'addr') ~= ARGV[1] then return {-1, 0, 0, 0, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local h = redis.call('HMGET', KEYS[1], 'total', 'external', 'routable', 'quarantined_until')
local total = tonumber(h[1]) or 0
local external = tonumber(h[2]) or 0
local in_flight = redis.call('ZCARD', KEYS[2])
local draining = redis.call('ZCARD', KEYS[3])
if h[3] ~= '1' or (tonumber(h[4]) or 0) > tonumber(ARGV[4]) then
  return {-2, total, in_flight, external, draining}
end
if in_flight + external + draining >= total then return {0, total, in_flight, external, draining} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[4], ARGV[5]) end
return {1, total, in_flight + 1, external, draining}

-- snapshot: the whole fleet in one round trip, for a worker's mirror (expired leases are swept on the way).
-- KEYS  1 PREFIX:upstreams   2 PREFIX:agents
-- ARGV  1 PREFIX
-- Returns {rows, agents}: a row per server {key, addr, total, external, routable, quarantined_until,
-- in_flight, lingering, sleeping, serving}; agents flat as HGETALL gives them (id, record JSON, ...).
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local up, leases, draining = ARGV[1] .. ':up:' .. key, ARGV[1] .. ':leases:' .. key, ARGV[1] .. ':draining:' .. key
  if redis.call('EXISTS', up) == 0 then
    redis.call('SREM', KEYS[1], key)
  else
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    redis.call('ZREMRANGEBYSCORE', draining, '-inf', now)
    local h = redis.call('HMGET', up, 'addr', 'total', 'external', 'routable', 'quarantined_until', 'sleeping',
                               'serving')
    table.insert(out, {key, h[1] or '', h[2] or '0', h[3] or '0', h[4] or '0', h[5] or '',
                       redis.call('ZCARD', leases), redis.call('ZCARD', draining), h[6] or '0', h[7] or ''})
  end
end
return {out, redis.call('HGETALL', KEYS[2])}

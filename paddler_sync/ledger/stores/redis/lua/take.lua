-- take: one slot on the server a worker chose, only if it still has one, and only in queue order (with tenants,
-- in the tenant rule's order, paddler_sync/tenants/rule.py, which this script applies atomically with the take).
-- KEYS  1 PREFIX:up:KEY   2 PREFIX:leases:KEY   3 PREFIX:draining:KEY   4 the request's queue (PREFIX:queue, or
--       PREFIX:queue:model:NAME for a request naming a model; with tenants, that and :tenant:NAME)   5 PREFIX:waiting
--       with n tenants (ARGV 9): 6 PREFIX:turns (the counter of takes)   7 PREFIX:tenant_turns (tenant -> its last
--       take's turn)   7+i the queue of tenant i for this model   7+n+i tenant i's leases (PREFIX:tenant:NAME:leases);
--       then for each of the m pool servers (ARGV 11+5n): its up, leases, draining keys
-- ARGV  1 the server's address (it must still be this server)   2 the new lease id   3 lease TTL (ms)
--       4 now on the balancer's clock (s; quarantines are kept on it)   5 the waiter's ticket name, or ''
--       6 its number   7 the worker id   8 the waiting mark's TTL (ms)   9 n: tenants that may use these servers
--       (0: no tenants)   10 which of them asks (1..n)   then per tenant: name, priority, weight, reserved_slots,
--       max_slots   then m: the servers over which reservations are counted (0 when nobody reserves)
-- Returns {outcome, total, in_flight, external, draining} (the counts as Redis has them, for the mirror), and with
-- tenants, after a take, the take's turn;
-- outcome is a TakeOutcome: 1 TAKEN, 0 FULL, -1 GONE, -2 UNUSABLE, -3 NOT_YOUR_TURN, -4 TICKET_LOST,
-- -5 AT_CAP (the tenant holds its max_slots), -6 RESERVED (the free slots are others' reservations).
local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[5] ~= '' then  -- a waiter: its worker is alive; a ticket Redis lost (restarted empty) is redrawn
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[8]), ARGV[7])
  if not redis.call('ZSCORE', KEYS[4], ARGV[5]) then return {-4, 0, 0, 0, 0} end
end

local function live_head(queue)  -- the oldest ticket of a live worker, and its number; a dead worker's go
  for _ = 1, 100 do
    local first = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
    if #first == 0 then return false, 0 end
    local alive = redis.call('ZSCORE', KEYS[5], string.match(first[1], '^([^:]+):'))
    if alive and tonumber(alive) >= now then return first[1], tonumber(first[2]) end
    redis.call('ZREM', queue, first[1])
  end
  return false, 0
end

local function counts(up, leases, draining)  -- a server's total, in flight, external, draining, usable
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', draining, '-inf', now)
  local h = redis.call('HMGET', up, 'total', 'external', 'routable', 'quarantined_until')
  local usable = h[3] == '1' and (tonumber(h[4]) or 0) <= tonumber(ARGV[4])
  return tonumber(h[1]) or 0, redis.call('ZCARD', leases), tonumber(h[2]) or 0, redis.call('ZCARD', draining), usable
end

local n = tonumber(ARGV[9]) or 0
local tenant_leases, tenant_name = false, false
if n == 0 then
  local head = live_head(KEYS[4])
  if head and head ~= ARGV[5] then return {-3, 0, 0, 0, 0} end
else
  local x = tonumber(ARGV[10])
  local prio, weight, reserved, cap, held, heads, numbers, turns = {}, {}, {}, {}, {}, {}, {}, {}
  for i = 1, n do
    local b = 10 + 5 * (i - 1)
    prio[i], weight[i] = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    reserved[i], cap[i] = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
    turns[i] = tonumber(redis.call('HGET', KEYS[7], ARGV[b + 1])) or 0
    redis.call('ZREMRANGEBYSCORE', KEYS[7 + n + i], '-inf', now)
    held[i] = redis.call('ZCARD', KEYS[7 + n + i])
    heads[i], numbers[i] = live_head(KEYS[7 + i])
  end
  local free = 0
  for j = 1, tonumber(ARGV[11 + 5 * n]) or 0 do
    local k = 7 + 2 * n + 3 * (j - 1)
    local total, in_flight, external, draining, usable = counts(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3])
    if usable then free = free + math.max(0, total - in_flight - external - draining) end
  end
  local function admits(i)  -- rule.admits
    if cap[i] > 0 and held[i] >= cap[i] then return -5 end
    local kept = 0
    for r = 1, n do if r ~= i then kept = kept + math.max(0, reserved[r] - held[r]) end end
    if kept > 0 and free - 1 < kept then return -6 end
    return 0
  end
  local function ahead(i, j)  -- rule.rank, then first come
    if prio[i] ~= prio[j] then return prio[i] > prio[j] end
    if held[i] / weight[i] ~= held[j] / weight[j] then return held[i] / weight[i] < held[j] / weight[j] end
    if turns[i] ~= turns[j] then return turns[i] < turns[j] end
    return numbers[i] < numbers[j]
  end
  local verdict = admits(x)
  if verdict ~= 0 then return {verdict, 0, 0, 0, 0} end
  local best = false
  for i = 1, n do
    if heads[i] and admits(i) == 0 and (not best or ahead(i, best)) then best = i end
  end
  if best then
    if ARGV[5] == '' then  -- a new arrival goes before the waiters only when it ranks strictly ahead
      numbers[x] = math.huge
      if not ahead(x, best) then return {-3, 0, 0, 0, 0} end
    elseif best ~= x or heads[x] ~= ARGV[5] then
      return {-3, 0, 0, 0, 0}
    end
  end
  tenant_leases = KEYS[7 + n + x]
  tenant_name = ARGV[10 + 5 * (x - 1) + 1]
end

if redis.call('HGET', KEYS[1], 'addr') ~= ARGV[1] then return {-1, 0, 0, 0, 0} end
local total, in_flight, external, draining, usable = counts(KEYS[1], KEYS[2], KEYS[3])
if not usable then return {-2, total, in_flight, external, draining} end
if in_flight + external + draining >= total then return {0, total, in_flight, external, draining} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[4], ARGV[5]) end
if not tenant_leases then return {1, total, in_flight + 1, external, draining} end
redis.call('ZADD', tenant_leases, now + tonumber(ARGV[3]), ARGV[2])
local turn = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[7], tenant_name, turn)
return {1, total, in_flight + 1, external, draining, turn}

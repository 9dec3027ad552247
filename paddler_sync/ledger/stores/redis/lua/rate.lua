-- rate: a tenant's requests and tokens per minute (paddler_sync/tenants/rates.py), checked and counted at once
-- for every worker and balancer of the prefix.
-- KEYS  1 requests this minute   2 requests the minute before   3 tokens this minute   4 tokens the minute before
--       (PREFIX:rate:TENANT:KIND:MINUTE)
-- ARGV  1 requests per minute (0: no limit)   2 tokens per minute (0: no limit)   3 seconds into this minute
-- Returns {requests before, requests now, tokens before, tokens now, admitted (1 or 0)}; an admitted request is
-- counted in KEYS 1.
local function n(key) return tonumber(redis.call('GET', key)) or 0 end
local rb, rn, tb, tn = n(KEYS[2]), n(KEYS[1]), n(KEYS[4]), n(KEYS[3])
local fade = (60 - tonumber(ARGV[3])) / 60
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local admitted = 1
if rpm > 0 and rb * fade + rn + 1 > rpm then admitted = 0 end
if tpm > 0 and tb * fade + tn >= tpm then admitted = 0 end
if admitted == 1 then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], 180)
end
return {tostring(rb), tostring(rn), tostring(tb), tostring(tn), admitted}

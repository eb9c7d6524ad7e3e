-- Submit a new request: write its hash and make it pending, unless the pending pool is full.
-- KEYS: req, pending, wakeup      ARGV: rid, arrival, max_pending (0 = no limit),
--                                       then the hash's field, value pairs
-- Returns {1, pending after} when written, {0, pending now} when refused (nothing written).
-- One script, so the bound is exact: no two submissions can both see room for one.
local pending = redis.call('ZCARD', KEYS[2])
local limit = tonumber(ARGV[3])
if limit > 0 and pending >= limit then
  return {0, pending}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('LPUSH', KEYS[3], 'submit')
redis.call('LTRIM', KEYS[3], 0, 63)
return {1, pending + 1}

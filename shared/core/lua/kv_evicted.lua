-- A worker evicted requests' K/V from its pool: clear their location, but only where it
-- still names this instance (a later slice elsewhere may have moved it meanwhile).
-- KEYS: req_1..req_n      ARGV: instance_id
-- Returns how many locations were cleared.
local cleared = 0
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'kv_instance') == ARGV[1] then
    redis.call('HDEL', KEYS[i], 'kv_instance', 'kv_fence', 'kv_boot')
    cleared = cleared + 1
  end
end
return cleared

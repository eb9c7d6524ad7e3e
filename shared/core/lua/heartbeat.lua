-- Renew a live instance: refresh its fields and TTL, only while its hash is whole.
-- KEYS: instance hash
-- ARGV: ttl_ms, then field, value pairs (heartbeat_at, state, ...)
-- One script, so a beat that reaches Redis late (its client timed out; Redis was paused
-- past the TTL) cannot re-create the expired hash as a few fields without `queue`: such a
-- hash counts as dead for the scheduler while the worker would keep renewing it. A hash
-- without `queue` (left by an older, non-atomic beat) is deleted.
-- Returns 1 when renewed, 0 when the instance must register again.
if redis.call('HEXISTS', KEYS[1], 'queue') == 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1

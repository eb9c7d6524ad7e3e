-- Fail a request that is still pending, with a stated reason (e.g. it can never fit).
-- KEYS: pending, req, events      ARGV: rid, now, finish_reason, error, result_ttl,
--                                       kv_drop_head, kv_drop_tail
-- @include _kv
-- Returns 1 if the request was failed, 0 if it was no longer pending.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
kv_forget(KEYS[2], ARGV[1], ARGV[6], ARGV[7], '')
redis.call('HSET', KEYS[2], 'status', 'failed', 'finish_reason', ARGV[3], 'error', ARGV[4],
  'finished_at', ARGV[2])
redis.call('XADD', KEYS[3], '*', 'kind', 'final', 'delta', '', 'tokens', 0,
  'status', 'failed', 'finish_reason', ARGV[3], 'error', ARGV[4])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
return 1

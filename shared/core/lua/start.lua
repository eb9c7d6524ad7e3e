-- A worker starts a batch: only if it is still in flight (not swept meanwhile).
-- KEYS: inflight, batch      ARGV: batch_id, new_deadline, now
-- Returns 1 when the worker may run the slice, 0 when the batch is gone.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'running', 'started_at', ARGV[3], 'deadline', ARGV[2])
return 1

-- Cancel a request (the client or an operator withdraws it).
-- KEYS: pending, req, events      ARGV: rid, now, result_ttl, reason, kv_drop_head,
--                                       kv_drop_tail
-- A pending request ends at once: out of the pending set, status cancelled, a final event.
-- A running one is marked (cancel_requested): the commit of its current slice, or the
-- hand-back of its batch, ends it as cancelled instead of making it pending again, so it
-- stays in exactly one place meanwhile and keeps the tokens that slice generated.
-- Returns {1, 'cancelled'}, {2, 'running'} (marked), {0, <terminal status>} or {-1, ''}.
-- @include _kv
local status = redis.call('HGET', KEYS[2], 'status')
if not status then
  return {-1, ''}
end
if status == 'pending' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  kv_forget(KEYS[2], ARGV[1], ARGV[5], ARGV[6], '')
  redis.call('HSET', KEYS[2], 'status', 'cancelled', 'finish_reason', 'cancelled',
    'error', ARGV[4], 'finished_at', ARGV[2])
  redis.call('XADD', KEYS[3], '*', 'kind', 'final', 'delta', '', 'tokens', 0,
    'status', 'cancelled', 'finish_reason', 'cancelled', 'error', ARGV[4])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
  return {1, 'cancelled'}
end
if status == 'running' then
  redis.call('HSET', KEYS[2], 'cancel_requested', ARGV[4])
  return {2, 'running'}
end
return {0, status}

-- Hand a batch's requests back to pending (worker error, dead worker, missed deadline).
-- KEYS: pending, inflight, batch, instance_batches, wakeup, then per request i: req_i, events_i
-- ARGV: batch_id, now, reason, max_retries, result_ttl, count_retry (1/0), kv_drop_head,
--       kv_drop_tail, rid_1..rid_n
-- A hand-back at a clean shutdown passes count_retry=0: it is not the request's fault.
-- Each request still held by this batch gets a new fence (a late commit is then rejected)
-- and goes back to pending with its arrival time, or fails with the reason once it has been
-- requeued more than max_retries times; one whose cancellation was asked ends cancelled.
-- Whatever happens to a request, the K/V its instance may keep is forgotten (it re-prefills).
-- Returns {requeued, failed}, or {-1, 0} if the batch was no longer in flight.
-- @include _kv
local batch_id, now, reason = ARGV[1], ARGV[2], ARGV[3]
local max_retries, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local count_retry = ARGV[6] == '1'
if not redis.call('ZSCORE', KEYS[2], batch_id) then
  return {-1, 0}
end
local requeued, failed = 0, 0
local n = (#KEYS - 5) / 2
for i = 1, n do
  local req, events = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local rid = ARGV[8 + i]
  local cur = redis.call('HMGET', req, 'batch', 'status')
  if cur[1] == batch_id and cur[2] == 'running' then
    kv_forget(req, rid, ARGV[7], ARGV[8], '')
  end
  local cancel = redis.call('HGET', req, 'cancel_requested')
  if cur[1] == batch_id and cur[2] == 'running' and cancel then
    -- withdrawn while its batch ran: it ends cancelled rather than going back to pending
    redis.call('HINCRBY', req, 'fence', 1)
    redis.call('HSET', req, 'batch', '', 'status', 'cancelled', 'finish_reason', 'cancelled',
      'error', cancel, 'finished_at', now)
    redis.call('XADD', events, '*', 'kind', 'final', 'delta', '', 'tokens', 0,
      'status', 'cancelled', 'finish_reason', 'cancelled', 'error', cancel)
    redis.call('EXPIRE', req, ttl)
    redis.call('EXPIRE', events, ttl)
  elseif cur[1] == batch_id and cur[2] == 'running' then
    redis.call('HINCRBY', req, 'fence', 1)
    local retries = redis.call('HINCRBY', req, 'retries', count_retry and 1 or 0)
    redis.call('HSET', req, 'batch', '', 'last_error', reason)
    if retries > max_retries then
      local msg = 'gave up after ' .. retries .. ' failed slices; last: ' .. reason
      redis.call('HSET', req, 'status', 'failed', 'finish_reason', 'error', 'error', msg,
        'finished_at', now)
      redis.call('XADD', events, '*', 'kind', 'final', 'delta', '', 'tokens', 0,
        'status', 'failed', 'finish_reason', 'error', 'error', msg)
      redis.call('EXPIRE', req, ttl)
      redis.call('EXPIRE', events, ttl)
      failed = failed + 1
    else
      redis.call('HSET', req, 'status', 'pending')
      redis.call('ZADD', KEYS[1], redis.call('HGET', req, 'arrival'), rid)
      requeued = requeued + 1
    end
  end
end
redis.call('ZREM', KEYS[2], batch_id)
redis.call('ZREM', KEYS[4], batch_id)
redis.call('HSET', KEYS[3], 'status', 'requeued', 'requeued_at', now, 'reason', reason)
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('LPUSH', KEYS[5], 'requeue')
redis.call('LTRIM', KEYS[5], 0, 63)
return {requeued, failed}

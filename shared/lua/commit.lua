-- Fenced commit of one slice's results (docs/design.md §6.2, invariant 2).
-- KEYS: pending, inflight, batch, instance_batches, stats, instance_stats, wakeup,
--       then per request i: req_i, events_i
-- ARGV: batch_id, now, result_ttl, stats_json, n,
--       then per request i (6 each): rid, fence, new_ids_csv, finish_reason ('' = unfinished),
--                                    delta_text, final_text
-- All or nothing: if the batch is no longer in flight or any request's batch/fence/status
-- differs, nothing is written and {0, reason} is returned. Otherwise {1, finished_count}.
-- An unfinished request whose cancellation was asked (cancel.lua) ends cancelled here.
local batch_id, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = tonumber(ARGV[5])
if not redis.call('ZSCORE', KEYS[2], batch_id) then
  return {0, 'batch ' .. batch_id .. ' is not in flight'}
end
for i = 1, n do
  local a = 5 + (i - 1) * 6
  local cur = redis.call('HMGET', KEYS[6 + 2 * i], 'batch', 'fence', 'status')
  if cur[1] ~= batch_id or cur[2] ~= ARGV[a + 2] or cur[3] ~= 'running' then
    return {0, 'fence mismatch for request ' .. ARGV[a + 1]}
  end
end
local finished = 0
for i = 1, n do
  local a = 5 + (i - 1) * 6
  local req, events = KEYS[6 + 2 * i], KEYS[7 + 2 * i]
  local rid, new_ids, reason = ARGV[a + 1], ARGV[a + 3], ARGV[a + 4]
  local delta, final_text = ARGV[a + 5], ARGV[a + 6]
  local gen = redis.call('HGET', req, 'generated_ids')
  local added = 0
  if new_ids ~= '' then
    if gen == '[]' then gen = '[' .. new_ids .. ']' else gen = string.sub(gen, 1, -2) .. ',' .. new_ids .. ']' end
    local _, commas = string.gsub(new_ids, ',', '')
    added = commas + 1
  end
  local total = redis.call('HINCRBY', req, 'completion_tokens', added)
  local slices = redis.call('HINCRBY', req, 'slices', 1)
  redis.call('HSET', req, 'generated_ids', gen, 'batch', '')
  redis.call('HSETNX', req, 'first_slice_at', now)
  if reason ~= '' then
    local status = 'finished'
    redis.call('HSET', req, 'status', status, 'finish_reason', reason, 'finished_at', now,
      'text', final_text)
    redis.call('XADD', events, '*', 'kind', 'final', 'delta', delta, 'tokens', added,
      'status', status, 'finish_reason', reason)
    redis.call('EXPIRE', req, ttl)
    redis.call('EXPIRE', events, ttl)
    finished = finished + 1
  else
    local cancel = redis.call('HGET', req, 'cancel_requested')
    if cancel then  -- withdrawn while this slice ran: it ends here, with its tokens
      redis.call('HSET', req, 'status', 'cancelled', 'finish_reason', 'cancelled',
        'error', cancel, 'finished_at', now)
      redis.call('XADD', events, '*', 'kind', 'final', 'delta', delta, 'tokens', added,
        'status', 'cancelled', 'finish_reason', 'cancelled', 'error', cancel)
      redis.call('EXPIRE', req, ttl)
      redis.call('EXPIRE', events, ttl)
    else
      redis.call('HSET', req, 'status', 'pending')
      redis.call('ZADD', KEYS[1], redis.call('HGET', req, 'arrival'), rid)
      redis.call('XADD', events, '*', 'kind', 'slice', 'delta', delta, 'tokens', added,
        'slice', slices)
    end
  end
end
redis.call('ZREM', KEYS[2], batch_id)
redis.call('ZREM', KEYS[4], batch_id)
redis.call('HSET', KEYS[3], 'status', 'committed', 'committed_at', now)
redis.call('EXPIRE', KEYS[3], ttl)
local stats = cjson.decode(ARGV[4])
stats['requests_finished'] = finished
for k, v in pairs(stats) do
  redis.call('HINCRBYFLOAT', KEYS[5], k, v)
  redis.call('HINCRBYFLOAT', KEYS[6], k, v)
end
redis.call('LPUSH', KEYS[7], 'commit')
redis.call('LTRIM', KEYS[7], 0, 63)
return {1, finished}

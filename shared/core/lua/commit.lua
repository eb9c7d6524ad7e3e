-- Fenced commit of one slice's results (docs/design.md §6.2, invariant 2).
-- KEYS: pending, inflight, batch, instance_batches, stats, instance_stats, wakeup,
--       then per request i: req_i, events_i
-- ARGV: batch_id, now, result_ttl, stats_json, n, kv_boot, kv_drop_head, kv_drop_tail,
--       then per request i (8 each): rid, fence, new_ids_csv, finish_reason ('' = unfinished),
--                                    delta_text, final_text, kv_retained ('1' / '0'),
--                                    logprobs (JSON array items without brackets, '' = none)
-- Every event entry carries pos (index of its first token in the generated ids) and ids.
-- All or nothing: if the batch is no longer in flight or any request's batch/fence/status
-- differs, nothing is written and {0, reason} is returned. Otherwise {1, finished_count}.
-- An unfinished request whose cancellation was asked (cancel.lua) ends cancelled here.
-- An unfinished request whose K/V the worker kept records where it lives (this instance,
-- this slice's fence, the worker's boot); any other outcome forgets the old location.
-- @include _kv
local batch_id, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = tonumber(ARGV[5])
local kv_boot, drop_head, drop_tail = ARGV[6], ARGV[7], ARGV[8]
local instance = redis.call('HGET', KEYS[3], 'instance')
local W, B = 8, 8  -- ARGV per request, ARGV before the first request
if not redis.call('ZSCORE', KEYS[2], batch_id) then
  return {0, 'batch ' .. batch_id .. ' is not in flight'}
end
for i = 1, n do
  local a = B + (i - 1) * W
  local cur = redis.call('HMGET', KEYS[6 + 2 * i], 'batch', 'fence', 'status')
  if cur[1] ~= batch_id or cur[2] ~= ARGV[a + 2] or cur[3] ~= 'running' then
    return {0, 'fence mismatch for request ' .. ARGV[a + 1]}
  end
end
local finished = 0
for i = 1, n do
  local a = B + (i - 1) * W
  local req, events = KEYS[6 + 2 * i], KEYS[7 + 2 * i]
  local rid, new_ids, reason = ARGV[a + 1], ARGV[a + 3], ARGV[a + 4]
  local delta, final_text = ARGV[a + 5], ARGV[a + 6]
  local kv_kept = ARGV[a + 7] == '1' and reason == ''
  local logprobs = ARGV[a + 8]
  local gen = redis.call('HGET', req, 'generated_ids')
  local added = 0
  if new_ids ~= '' then
    if gen == '[]' then gen = '[' .. new_ids .. ']' else gen = string.sub(gen, 1, -2) .. ',' .. new_ids .. ']' end
    local _, commas = string.gsub(new_ids, ',', '')
    added = commas + 1
  end
  local total = redis.call('HINCRBY', req, 'completion_tokens', added)
  local pos = total - added
  if logprobs ~= '' then
    local held = redis.call('HGET', req, 'logprobs')
    if not held or held == '[]' then held = '[' .. logprobs .. ']'
    else held = string.sub(held, 1, -2) .. ',' .. logprobs .. ']' end
    redis.call('HSET', req, 'logprobs', held)
  end
  local slices = redis.call('HINCRBY', req, 'slices', 1)
  redis.call('HSET', req, 'generated_ids', gen, 'batch', '')
  redis.call('HSETNX', req, 'first_slice_at', now)
  if reason ~= '' then
    local status = 'finished'
    redis.call('HSET', req, 'status', status, 'finish_reason', reason, 'finished_at', now,
      'text', final_text)
    redis.call('XADD', events, '*', 'kind', 'final', 'delta', delta, 'tokens', added,
      'pos', pos, 'ids', new_ids,
      'status', status, 'finish_reason', reason)
    kv_forget(req, rid, drop_head, drop_tail, instance)  -- this worker keeps nothing of it
    redis.call('EXPIRE', req, ttl)
    redis.call('EXPIRE', events, ttl)
    finished = finished + 1
  else
    local cancel = redis.call('HGET', req, 'cancel_requested')
    if cancel then  -- withdrawn while this slice ran: it ends here, with its tokens
      redis.call('HSET', req, 'status', 'cancelled', 'finish_reason', 'cancelled',
        'error', cancel, 'finished_at', now)
      redis.call('XADD', events, '*', 'kind', 'final', 'delta', delta, 'tokens', added,
      'pos', pos, 'ids', new_ids,
        'status', 'cancelled', 'finish_reason', 'cancelled', 'error', cancel)
      redis.call('EXPIRE', req, ttl)
      redis.call('EXPIRE', events, ttl)
      if kv_kept then
        redis.call('SADD', drop_head .. instance .. drop_tail, rid)
      end
      kv_forget(req, rid, drop_head, drop_tail, '')
    else
      if kv_kept then
        local was = redis.call('HGET', req, 'kv_instance')
        if was and was ~= '' and was ~= instance then
          redis.call('SADD', drop_head .. was .. drop_tail, rid)
        end
        redis.call('HSET', req, 'kv_instance', instance, 'kv_fence', ARGV[a + 2],
          'kv_boot', kv_boot)
      else
        kv_forget(req, rid, drop_head, drop_tail, instance)
      end
      redis.call('HSET', req, 'status', 'pending')
      redis.call('ZADD', KEYS[1], redis.call('HGET', req, 'arrival'), rid)
      redis.call('XADD', events, '*', 'kind', 'slice', 'delta', delta, 'tokens', added,
      'pos', pos, 'ids', new_ids,
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

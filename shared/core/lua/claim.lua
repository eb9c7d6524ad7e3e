-- Claim pending requests into one slice batch, atomically.
-- KEYS: pending, inflight, batch, instance_batches, req_1..req_n
-- ARGV: batch_id, instance_id, deadline, now, batch_fields_json, estimated_s, rid_1..rid_n
-- The instance's batches zset is scored by estimated seconds: its sum is the instance's
-- expected outstanding work (max-min offloading and the horizon read it).
-- Each request still pending moves to "running" in this batch and gets a new fence;
-- requests no longer pending (cancelled, claimed elsewhere) are left out.
-- Returns a flat list {rid, fence, rid, fence, ...}; empty means no batch was created.
local batch_id, instance_id = ARGV[1], ARGV[2]
local deadline, now = ARGV[3], ARGV[4]
local claimed = {}
local members = {}
for i = 5, #KEYS do
  local rid = ARGV[i + 2]
  local req = KEYS[i]
  if redis.call('ZSCORE', KEYS[1], rid) then
    redis.call('ZREM', KEYS[1], rid)
    if redis.call('HGET', req, 'status') == 'pending' then
      local fence = redis.call('HINCRBY', req, 'fence', 1)
      redis.call('HSET', req, 'status', 'running', 'batch', batch_id)
      redis.call('HSETNX', req, 'first_claimed_at', now)
      claimed[#claimed + 1] = rid
      claimed[#claimed + 1] = fence
      members[#members + 1] = rid .. '=' .. fence
    end
  end
end
if #claimed == 0 then
  return claimed
end
redis.call('ZADD', KEYS[2], deadline, batch_id)
redis.call('ZADD', KEYS[4], ARGV[6], batch_id)
local fields = cjson.decode(ARGV[5])
redis.call('HSET', KEYS[3], 'id', batch_id, 'instance', instance_id, 'status', 'queued',
  'created_at', now, 'deadline', deadline, 'members', table.concat(members, ','))
for k, v in pairs(fields) do
  redis.call('HSET', KEYS[3], k, tostring(v))
end
return claimed

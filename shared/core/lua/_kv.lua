-- Prelude (included by the scripts that end, requeue or move a request): where a request's
-- retained K/V lives is kept in its hash (kv_instance, kv_fence, kv_boot). kv_forget clears
-- it and, unless that instance is `keep`, adds the request to the instance's kv_drop set,
-- which the worker empties into its pool before its next slice. The set's key is
-- drop_head .. instance .. drop_tail (both built by shared/core/keys.py and passed in ARGV).
local function kv_forget(req, rid, drop_head, drop_tail, keep)
  local where = redis.call('HGET', req, 'kv_instance')
  if where and where ~= '' then
    if where ~= keep then
      redis.call('SADD', drop_head .. where .. drop_tail, rid)
    end
    redis.call('HDEL', req, 'kv_instance', 'kv_fence', 'kv_boot')
  end
end
